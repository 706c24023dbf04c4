"""Serve the deployments from this checkout (`make ui` starts a server and this): one process, one run at a time.

    python -m flows.serve                 # coordinator: statetune-pipeline/manual + statetune-refresh/scheduled
    python -m flows.serve --role gpu      # on a GPU machine: statetune-stage/gpu (see flows/handoff.py)

Both coordinator deployments edit the same workspace (params.yaml, dvc.lock, outputs), so each has concurrency
limit 1 and the serving process runs at most one flow run at a time (`serve(limit=1)`); DVC's own lock is the
last line of defence. The refresh schedule is `schedule.refresh_cron` in params.yaml (null = no schedule).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import RunnerDeployment

from flows.handoff import remote_stage
from flows.pipeline import PARAMS_FILE, pipeline
from flows.refresh import refresh
from tasks.common import read_params

ONE_AT_A_TIME = 1
ROLES = ("coordinator", "gpu")
API_POLL_S = 1.0


def refresh_cron(params_path: str | Path) -> str | None:
    """`schedule.refresh_cron` from params.yaml, or None when unset."""
    cron = (read_params(params_path).get("schedule") or {}).get("refresh_cron")
    return str(cron) if cron else None


def build_deployments(workspace: str | Path = ".", role: str = "coordinator") -> list[RunnerDeployment]:
    """The deployments one serving process offers for `role`; `workspace` becomes their default parameter."""
    workspace = str(Path(workspace).resolve())
    params = {"workspace": workspace}
    if role == "gpu":
        return [remote_stage.to_deployment(
            name="gpu", parameters=params, concurrency_limit=ONE_AT_A_TIME, tags=["statetune", "gpu"],
            description="Run one DVC stage here and push its outputs + run-cache (GPU hand-off)")]
    if role != "coordinator":
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return [
        pipeline.to_deployment(
            name="manual", parameters=params, concurrency_limit=ONE_AT_A_TIME, tags=["statetune"],
            description="Bring the DVC pipeline up to date; the form's settings are written into params.yaml"),
        refresh.to_deployment(
            name="scheduled", parameters=params, cron=refresh_cron(Path(workspace, PARAMS_FILE)),
            concurrency_limit=ONE_AT_A_TIME, tags=["statetune"],
            description="List the sources; record new media ids; bring the pipeline up to date"),
    ]


def wait_for_api(timeout_s: float) -> None:
    """Block until the configured Prefect API answers its health check (a server started just before us)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while (error := client.api_healthcheck()) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prefect API {client.api_url} not healthy after {timeout_s:.0f} s: {error}")
            time.sleep(API_POLL_S)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", default=".", help="the DVC project the flows run in (default: here)")
    ap.add_argument("--role", choices=ROLES, default="coordinator")
    ap.add_argument("--wait-for-api", type=float, default=0, metavar="SECONDS",
                    help="wait this long for the Prefect API to come up first (make ui starts both)")
    args = ap.parse_args(argv)
    if args.wait_for_api:
        wait_for_api(args.wait_for_api)
    serve(*build_deployments(args.workspace, args.role), limit=ONE_AT_A_TIME)


if __name__ == "__main__":
    main()
