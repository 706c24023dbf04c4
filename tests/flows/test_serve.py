"""The served deployments, end to end as the UI uses them: a real server, `python -m flows.serve` in its own
process, a run triggered through the API, and its artifacts read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from server_process import stop
from synthetic_project import REPO_ROOT, STAGES, dvc, git, runs

from flows.pipeline import pipeline

DEPLOYMENT_WAIT_S = 120
RUN_TIMEOUT_S = 240
RUNNER_POLL_S = 1  # how often the serving process looks for runs to start (default 10 s)


def wait_for_deployments(names: list[str], serving: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + DEPLOYMENT_WAIT_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert serving.poll() is None, f"flows.serve exited:\n{log.read_text()[-3000:]}"
            try:
                return {name: client.read_deployment_by_name(name) for name in names}
            except ObjectNotFound:  # until the serving process has registered them
                time.sleep(1)
    raise TimeoutError(f"deployments {names} not registered:\n{log.read_text()[-3000:]}")


def start_serving(api: str, workspace: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`python -m flows.serve --workspace <workspace> …` from this checkout, against the test server."""
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO_ROOT),
           "PREFECT_RUNNER_POLL_FREQUENCY": str(RUNNER_POLL_S)}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.serve", "--workspace", str(workspace), *extra],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_ui_style_run_of_the_served_pipeline(prefect_api: str, project: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    serving = start_serving(prefect_api, project, log)
    try:
        deployments = wait_for_deployments(
            ["statetune-pipeline/manual", "statetune-refresh/scheduled"], serving, log)
        refresh = deployments["statetune-refresh/scheduled"]
        assert [s.schedule.cron for s in refresh.schedules] == ["0 3 * * *"]
        assert deployments["statetune-pipeline/manual"].global_concurrency_limit.limit == 1

        flow_run = run_deployment("statetune-pipeline/manual", parameters={"settings": {"epochs": 4}},
                                  timeout=RUN_TIMEOUT_S, poll_interval=1)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-3000:]}"
    finally:
        stop(serving)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    by_key = {a.key: a for a in artifacts if a.key}
    rows = json.loads(by_key["stage-results"].data)
    assert {r["stage"]: r["outcome"] for r in rows} == dict.fromkeys(STAGES, "ran")
    assert "train:\n  epochs: 4\n" in (project / "params.yaml").read_text()
    assert "up to date" in dvc(project, "status")


def test_gpu_stage_runs_on_the_served_worker_and_comes_back_through_the_run_cache(
        prefect_api: str, project: Path, tmp_path: Path) -> None:
    worker = tmp_path / "worker"
    git(tmp_path, "clone", "-q", str(project), str(worker))  # same commit, same DVC remote
    log = tmp_path / "serve-gpu.log"
    serving = start_serving(prefect_api, worker, log, "--role", "gpu")
    try:
        wait_for_deployments(["statetune-stage/gpu"], serving, log)
        table = pipeline(workspace=str(project), gpu_stages=["join"])
    finally:
        stop(serving)
    assert {r["stage"]: r["outcome"] for r in table} == {**dict.fromkeys(STAGES, "ran"), "join": "restored"}
    assert runs(worker) == ["join"] and "join" not in runs(project)
    assert (project / "d.txt").read_text() == (worker / "d.txt").read_text() == "abaa"
    assert "up to date" in dvc(project, "status")
