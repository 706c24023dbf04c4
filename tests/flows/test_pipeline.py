"""The Prefect flow and the DVC CLI agree on what is up to date; independent stages overlap; failures stop
only what depends on them; the results reach the UI as artifacts; the refresh records new media ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from synthetic_project import STAGES, REPO_ROOT, dvc, runs

from flows.params_file import set_params
from flows.pipeline import PipelineSettings, StageFailedError, pipeline
from flows.refresh import refresh, refresh_source_list

pytestmark = pytest.mark.usefixtures("prefect_api")


def outcomes(table: list[dict]) -> dict[str, str]:
    return {row["stage"]: row["outcome"] for row in table}


def artifacts_of(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def test_flow_then_cli_then_flow_agree_and_artifacts(project: Path) -> None:
    state = pipeline(workspace=str(project), return_state=True)
    assert outcomes(state.result()) == dict.fromkeys(STAGES, "ran")
    assert "up to date" in dvc(project, "status")
    assert "Data and pipelines are up to date" in dvc(project, "repro")
    by_key = artifacts_of(state.state_details.flow_run_id)
    assert {"stage-results", "metrics", "progress-make"} <= set(by_key)
    assert float(by_key["progress-make"].data) == 100.0
    rows = json.loads(by_key["stage-results"].data)
    assert {r["stage"]: (r["outcome"], r["written"]) for r in rows}["make"] == ("ran", 1)
    assert "| written | 1 |" in by_key["metrics"].data

    set_params(project / "params.yaml", {"make.n": 2})
    dvc(project, "repro")
    assert outcomes(pipeline(workspace=str(project))) == dict.fromkeys(STAGES, "up to date")


def test_form_settings_written_and_independent_stages_overlap(project: Path) -> None:
    set_params(project / "params.yaml", {"left.sleep": 1.5, "right.sleep": 1.5})
    pipeline(workspace=str(project), settings=PipelineSettings(epochs=7))
    text = (project / "params.yaml").read_text()
    assert "train:\n  epochs: 7\n" in text and "# right's multiplier" in text
    spans = {line.split()[0]: tuple(map(float, line.split()[1:]))
             for line in (project / "runs.log").read_text().splitlines()}
    (l0, l1), (r0, r1) = spans["left"], spans["right"]
    assert max(l0, r0) < min(l1, r1), f"left {spans['left']} and right {spans['right']} did not overlap"
    assert spans["join"][0] >= max(l1, r1)


def test_failed_stage_skips_downstream_and_reports(project: Path) -> None:
    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("open('a.txt').read() * p", "open('nope.txt').read() * p"))
    with pytest.raises(StageFailedError, match=r"\['right', 'join'\]"):
        pipeline(workspace=str(project))
    assert sorted(runs(project)) == ["left", "make"]


def test_refresh_rewrites_the_list_only_when_sources_changed(project: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the real `python -m tasks.download --list-only`
    assert refresh_source_list(project) == (False, json.loads((project / "sources.json").read_text()))
    mtime = (project / "sources.json").stat().st_mtime_ns
    dvc(project, "repro")
    before = len(runs(project))

    assert outcomes(refresh(workspace=str(project))) == dict.fromkeys(STAGES, "up to date")
    assert (project / "sources.json").stat().st_mtime_ns == mtime

    (project / "media" / "two.mp4").write_bytes(b"new video")
    refresh(workspace=str(project))
    assert json.loads((project / "sources.json").read_text())["media_ids"] == ["generic-one", "generic-two"]
    assert runs(project)[before:][0] == "make", "make depends on sources.json"
