"""DVC semantics the flows rely on, on the synthetic project: no-op re-runs, params → downstream only, run-cache
restores, the stage plan equal to `dvc dag`, and the two-clone hand-off through a shared remote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from synthetic_project import STAGES, dvc, git, make_project, runs
from ruamel.yaml import YAML

from flows.handoff import push_inputs, run_and_push
from flows.params_file import set_params
from flows.pipeline import progress_percent, select
from flows.stages import DvcError, Outcome, classify, repro_stage, run_dvc, stage_plan


def repro_all(repo: Path) -> dict[str, Outcome]:
    """One `dvc repro` of the whole project, each stage's outcome read from its log (as the flow reads one)."""
    lines = run_dvc(["repro"], repo)
    return {stage: classify(stage, lines) for stage in STAGES}


def test_cli_repro_twice_second_is_noop(project: Path) -> None:
    dvc(project, "repro")
    assert sorted(runs(project)) == sorted(STAGES)
    out = dvc(project, "repro")
    assert "Data and pipelines are up to date" in out
    assert len(runs(project)) == len(STAGES)
    assert "up to date" in dvc(project, "status")


def test_plan_equals_dvc_dag(project: Path) -> None:
    dot = dvc(project, "dag", "--dot")
    nodes = set(re.findall(r'^"([^"]+)";$', dot, re.M))
    edges = set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M))
    plan = stage_plan(project)
    assert set(plan.order) == nodes == set(STAGES)
    assert plan.edges() == edges == {("make", "left"), ("make", "right"), ("left", "join"), ("right", "join")}
    position = {s: i for i, s in enumerate(plan.order)}
    assert all(position[u] < position[d] for u, d in edges)
    assert plan.metrics["make"] == ("stats/make.json",)


def test_outcomes_params_change_reruns_downstream_and_revert_restores(project: Path) -> None:
    assert set(repro_all(project).values()) == {Outcome.RAN}
    assert repro_all(project) == dict.fromkeys(STAGES, Outcome.UP_TO_DATE)

    set_params(project / "params.yaml", {"right.n": 3})
    before = len(runs(project))
    outcomes = repro_all(project)
    assert outcomes == {"make": Outcome.UP_TO_DATE, "left": Outcome.UP_TO_DATE,
                        "right": Outcome.RAN, "join": Outcome.RAN}
    assert runs(project)[before:] == ["right", "join"]
    assert (project / "c.txt").read_text() == "aaa"

    set_params(project / "params.yaml", {"right.n": 2})
    before = len(runs(project))
    outcomes = repro_all(project)
    assert outcomes["right"] == outcomes["join"] == Outcome.RESTORED
    assert len(runs(project)) == before, "a run-cache restore must not run the command"
    assert (project / "c.txt").read_text() == "aa"
    assert "up to date" in dvc(project, "status")


def test_stage_metrics_are_read_after_the_run(project: Path) -> None:
    plan = stage_plan(project)
    result = repro_stage("make", project, metrics=plan.metrics["make"])
    assert result.metrics == {"stats/make.json": {"stage": "make", "read": 0, "written": 1,
                                                  "dropped_total": 0, "seconds": 0.0}}


def test_classify_rejects_unknown_log() -> None:
    assert classify("a", ["Running stage 'a':", "> cmd"]) is Outcome.RAN
    assert classify("a", ["Stage 'a' didn't change, skipping"]) is Outcome.UP_TO_DATE
    with pytest.raises(DvcError, match="stage 'a'"):
        classify("a", ["Running stage 'b':"])


def test_failed_stage_raises_with_log_tail(project: Path) -> None:
    (project / "dvc.yaml").write_text((project / "dvc.yaml").read_text().replace("a.txt').read() + 'b'",
                                                                                  "missing.txt').read()"))
    repro_stage("make", project)
    with pytest.raises(DvcError, match=r"(?s)repro --single-item left.*missing\.txt"):
        repro_stage("left", project)


def test_two_clones_hand_over_a_stage_through_the_run_cache(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    coordinator = make_project(tmp_path / "coordinator", remote=remote)
    worker = tmp_path / "worker"
    git(tmp_path, "clone", "-q", str(coordinator), str(worker))
    run_dvc(["repro", "left", "right"], coordinator)
    push_inputs("join", coordinator)

    params = (coordinator / "params.yaml").read_text()
    lock = (coordinator / "dvc.lock").read_text()
    on_worker = run_and_push("join", worker, params, lock)
    assert on_worker.outcome is Outcome.RAN
    assert runs(worker) == ["join"], "the worker pulls its inputs and runs only the handed-over stage"

    back = repro_stage("join", coordinator, pull=True)
    assert back.outcome is Outcome.RESTORED
    assert "join" not in runs(coordinator)
    assert (coordinator / "d.txt").read_text() == (worker / "d.txt").read_text() == "abaa"
    yaml = YAML(typ="safe")
    lock_entry = {p: yaml.load((p / "dvc.lock").read_text())["stages"]["join"] for p in (coordinator, worker)}
    assert lock_entry[coordinator] == lock_entry[worker]


def test_targets_select_their_upstream_in_plan_order(project: Path) -> None:
    plan = stage_plan(project)
    assert select(plan, None) == list(plan.order)
    assert select(plan, ["left"]) == ["make", "left"]
    assert select(plan, ["join"])[-1] == "join" and len(select(plan, ["join"])) == len(STAGES)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['nope'\]"):
        select(plan, ["nope"])


def test_progress_read_from_stage_log_lines() -> None:
    assert progress_percent("Epoch 0:  50%|█████     | 1/2 [00:08<00:08,  0.12it/s, loss=11.30]") == 50.0
    assert progress_percent("transcribe: file 3/4 nega-articles.mp4") == 75.0
    assert progress_percent("step 0/0") is None
    assert progress_percent("saved 2026/11/29 backup") is None
