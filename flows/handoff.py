"""Run one DVC stage on another machine (a GPU work pool) and hand its result back through the DVC run-cache.

Both machines hold a git checkout of the same commit and share a DVC remote (a local directory, or S3; see
docs/pipeline.md). The coordinator (the pipeline flow):
1. `dvc push <upstream stages>`: the stage's input data reaches the remote;
2. `run_deployment(<gpu deployment>, stage, params.yaml text, dvc.lock text)` and waits;
   the worker (`remote_stage` flow) writes both files into its workspace, runs
   `dvc repro --pull --single-item <stage>` (pulling the inputs) and `dvc push --run-cache <stage>`;
3. `dvc repro --pull --single-item <stage>` locally: DVC finds the run-cache entry the worker pushed and checks
   the outputs out ("restored") with a lock entry identical to the worker's, without running the command.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows.stages import LineSink, StageRun, repro_stage, run_dvc, stage_plan
from rwkv7.atomic import write_text

PARAMS_FILE = "params.yaml"
LOCK_FILE = "dvc.lock"


class HandoffError(RuntimeError):
    """The worker's flow run did not complete; the message names the deployment, stage and final state."""


def push_inputs(stage: str, workspace: str | Path, on_line: LineSink | None = None) -> None:
    """Push the outputs of `stage`'s upstream stages (its data inputs) to the default DVC remote."""
    upstream = stage_plan(workspace).upstream[stage]
    if upstream:
        run_dvc(["push", *upstream], workspace, on_line)


def run_and_push(stage: str, workspace: str | Path, params_yaml: str, dvc_lock: str | None,
                 on_line: LineSink | None = None) -> StageRun:
    """Worker side: adopt the coordinator's params.yaml and dvc.lock, reproduce `stage` (pulling its inputs),
    then push its outputs and run-cache entry to the remote."""
    write_text(Path(workspace, PARAMS_FILE), params_yaml)
    if dvc_lock is not None:
        write_text(Path(workspace, LOCK_FILE), dvc_lock)
    result = repro_stage(stage, workspace, on_line, pull=True)
    run_dvc(["push", "--run-cache", stage], workspace, on_line)
    return result


def send_to_worker(stage: str, workspace: str | Path, deployment: str, on_line: LineSink | None = None) -> None:
    """Coordinator side, steps 1-2 (step 3 is the caller's `repro_stage(..., pull=True)`)."""
    push_inputs(stage, workspace, on_line)
    lock = Path(workspace, LOCK_FILE)
    flow_run = run_deployment(
        deployment,
        parameters={
            "stage": stage,
            "params_yaml": Path(workspace, PARAMS_FILE).read_text(encoding="utf-8"),
            "dvc_lock": lock.read_text(encoding="utf-8") if lock.is_file() else None,
        },
        timeout=None,
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        raise HandoffError(f"{deployment}: stage '{stage}' ended {state.name if state else 'without a state'}")


@flow(name="statetune-stage")
def remote_stage(stage: str, params_yaml: str, dvc_lock: str | None = None, workspace: str = ".") -> str:
    """Worker flow (deploy it to the gpu work pool): run one stage and push its result; returns the outcome."""
    logger = get_run_logger()
    result = run_and_push(stage, workspace, params_yaml, dvc_lock, logger.info)
    logger.info("stage %s on worker: %s in %.1f s", stage, result.outcome.value, result.seconds)
    return result.outcome.value
