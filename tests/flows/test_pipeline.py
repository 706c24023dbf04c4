"""The Prefect flow and the DVC CLI agree on what is up to date; independent stages overlap; failures stop
only what depends on them; the results reach the UI as artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from synthetic_project import STAGES, dvc, runs

from flows.params_file import set_params
from flows.pipeline import PipelineSettings, StageFailedError, pipeline

pytestmark = pytest.mark.usefixtures("prefect_backend")


def outcomes(table: list[dict]) -> dict[str, str]:
    return {row["stage"]: row["outcome"] for row in table}


def test_flow_then_cli_then_flow_agree(project: Path) -> None:
    assert outcomes(pipeline(workspace=str(project))) == dict.fromkeys(STAGES, "ran")
    assert "up to date" in dvc(project, "status")
    assert "Data and pipelines are up to date" in dvc(project, "repro")

    set_params(project / "params.yaml", {"make.n": 2})
    dvc(project, "repro")
    assert outcomes(pipeline(workspace=str(project))) == dict.fromkeys(STAGES, "up to date")


def test_form_settings_written_then_only_downstream_runs(project: Path) -> None:
    pipeline(workspace=str(project))
    before = len(runs(project))
    table = pipeline(workspace=str(project), settings=PipelineSettings(epochs=7))
    assert outcomes(table) == dict.fromkeys(STAGES, "up to date"), "train.epochs is read by no synthetic stage"
    assert "train:\n  epochs: 7\n" in (project / "params.yaml").read_text()
    assert "# right's multiplier" in (project / "params.yaml").read_text()
    assert len(runs(project)) == before


def test_independent_stages_overlap(project: Path) -> None:
    set_params(project / "params.yaml", {"left.sleep": 1.5, "right.sleep": 1.5})
    pipeline(workspace=str(project))
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


def test_artifacts_table_and_metrics(project: Path) -> None:
    state = pipeline(workspace=str(project), return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {"stage-results", "metrics"} <= set(by_key)
    table = by_key["stage-results"].data
    assert '"stage": "make"' in table and '"written": 1' in table
    assert "| written | 1 |" in by_key["metrics"].data
