"""The statetune pipeline as a Prefect flow: one task per DVC stage, in DVC's order, DVC deciding what runs.

Reads top to bottom:
1. the form's settings (`PipelineSettings`, None = keep) are written into params.yaml, comments preserved;
2. the stage plan is read from DVC's stage graph (no second copy of the DAG here);
3. each stage is submitted as a task that waits only for its upstream stages, so independent stages run in
   parallel; the task runs `dvc --wait-for-lock repro --single-item <stage>`, streams its log, and reports
   ran / restored (run-cache) / up to date; network stages get retries;
4. artifacts: a table of stage results with each stage's stats, the metrics files, the evaluation report.

A stage listed in `gpu_stages` is sent to a GPU work pool instead (flows/handoff.py): the worker runs it and
pushes the run-cache, then this flow restores it with `dvc repro --pull --single-item`.

Run it: `python -m flows.pipeline` (ephemeral Prefect, the repo as workspace) or from the UI (flows/serve.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.states import State
from pydantic import BaseModel, Field

from flows.params_file import set_params
from flows.stages import DvcError, StagePlan, StageRun, all_metrics, repro_stage, stage_plan

PARAMS_FILE = "params.yaml"
REPORT_FILE = "reports/report.md"
# Stages that talk to the network (video sites, LLM APIs): transient failures are worth a retry there only.
NETWORK_STAGES = frozenset({"download", "augment"})
NETWORK_RETRIES = 2
NETWORK_RETRY_DELAY_S = 10
# "epoch 3/10", "step 40/200", "file 2/5", or a tqdm bar "…| 12/40 [00:03<…": such a stage line moves the
# stage's progress artifact.
PROGRESS_LINE = re.compile(
    r"(?i)\b(?:epoch|step|file|batch|record|video|item|chunk)s?\b\D{0,3}(\d+)\s*/\s*(\d+)|\|\s*(\d+)/(\d+)\s*\[")
PROGRESS_MIN_INTERVAL_S = 2.0
PERCENT = 100.0
STAT_COLUMNS = ("read", "written", "dropped_total", "seconds")


class PipelineSettings(BaseModel):
    """The knobs the Prefect UI shows as a form; each is written into its params.yaml key. None keeps the file."""

    sources: list[str] | None = Field(None, description="download.sources: video/playlist/RSS URLs or local paths")
    model_path: str | None = Field(None, description="model.path: base RWKV-7 .pth, e.g. models/rwkv7-g1.pth")
    epochs: int | None = Field(None, ge=1, description="train.epochs: passes over the training data")
    max_steps: int | None = Field(None, ge=1, description="train.max_steps: optimizer steps (overrides epochs)")
    augment_provider: Literal["none", "gemini", "openai"] | None = Field(
        None, description="augment.provider: none (offline), gemini or openai (API key from the environment)")
    augment_target: int | None = Field(None, ge=0, description="augment.target_count: generated dialogues wanted")

    def params_updates(self) -> dict[str, Any]:
        """`{dotted params.yaml key: value}` for the fields that are set."""
        return {PARAMS_KEYS[name]: value for name, value in self.model_dump().items() if value is not None}


PARAMS_KEYS = {
    "sources": "download.sources",
    "model_path": "model.path",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "augment_provider": "augment.provider",
    "augment_target": "augment.target_count",
}


class StageFailedError(RuntimeError):
    """One or more stages failed or could not run because an upstream stage failed."""


def progress_percent(line: str) -> float | None:
    """Percent done that a stage's log line reports, or None.

    >>> progress_percent("Epoch 1:  50%|#####     | 3/6 [00:08<00:08, 0.12it/s]")
    50.0
    """
    match = PROGRESS_LINE.search(line)
    if match is None:
        return None
    done, total = (int(g) for g in match.groups() if g is not None)
    return min(PERCENT, PERCENT * done / total) if total else None


def _artifact_key(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


class _ProgressReporter:
    """Turns a stage's "epoch 3/10"-style log lines into a progress artifact (created on the first such line)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.artifact_id = None
        self.last_update = 0.0

    def see(self, line: str) -> None:
        pct = progress_percent(line)
        if pct is None:
            return
        now = time.monotonic()
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                pct, key=_artifact_key("progress", self.stage), description=f"{self.stage}: {line[:200]}")
        elif now - self.last_update >= PROGRESS_MIN_INTERVAL_S or pct >= PERCENT:
            update_progress_artifact(self.artifact_id, pct, description=f"{self.stage}: {line[:200]}")
        else:
            return
        self.last_update = now

    def finish(self) -> None:
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, PERCENT, description=f"{self.stage}: done")


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, workspace: str, metrics: tuple[str, ...] = (), gpu_deployment: str | None = None
              ) -> StageRun:
    """Bring one DVC stage up to date (locally, or on a GPU worker when `gpu_deployment` is set)."""
    logger = get_run_logger()
    progress = _ProgressReporter(stage)

    def on_line(line: str) -> None:
        logger.info(line)
        progress.see(line)

    if gpu_deployment is not None:
        from flows.handoff import send_to_worker

        send_to_worker(stage, workspace, gpu_deployment, on_line)
    result = repro_stage(stage, workspace, on_line, pull=gpu_deployment is not None, metrics=metrics)
    progress.finish()
    logger.info("stage %s: %s in %.1f s", stage, result.outcome.value, result.seconds)
    return result


def select(plan: StagePlan, targets: list[str] | None) -> list[str]:
    """Stages to run: all of `plan.order`, or only `targets` and everything upstream of them (in plan order)."""
    if not targets:
        return list(plan.order)
    unknown = sorted(set(targets) - set(plan.order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {list(plan.order)}")
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo.extend(plan.upstream[stage])
    return [s for s in plan.order if s in needed]


def submit_stages(plan: StagePlan, stages: list[str], workspace: str, gpu_stages: list[str],
                  gpu_deployment: str) -> dict[str, PrefectFuture[StageRun]]:
    """Submit every stage at once, each waiting for its upstream futures: independent stages run in parallel."""
    futures: dict[str, PrefectFuture[StageRun]] = {}
    for stage in stages:
        task_fn = run_stage
        if stage in NETWORK_STAGES:
            task_fn = run_stage.with_options(retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_RETRY_DELAY_S)
        futures[stage] = task_fn.submit(
            stage, workspace, plan.metrics.get(stage, ()),
            gpu_deployment if stage in gpu_stages else None,
            wait_for=[futures[u] for u in plan.upstream[stage] if u in futures],
        )
    return futures


def results_table(stages: list[str], states: dict[str, State], runs: dict[str, StageRun]) -> list[dict[str, Any]]:
    """One row per stage: outcome (or the failed state's name), wall seconds, and its stats counts."""
    rows = []
    for stage in stages:
        run = runs.get(stage)
        row: dict[str, Any] = {"stage": stage, "outcome": run.outcome.value if run else states[stage].name,
                               "wall_s": run.seconds if run else None}
        stats = next((m for m in (run.metrics.values() if run else []) if "read" in m or "written" in m), {})
        row.update({col: stats.get(col) for col in STAT_COLUMNS})
        rows.append(row)
    return rows


def metrics_markdown(metrics: dict[str, dict[str, Any]]) -> str:
    """Metrics files (`{path: object}`) as Markdown: one section per file, one row per scalar (nested keys dotted)."""
    lines = ["# Metrics", ""]
    # training and evaluation first, then the stage stats
    for rel, data in sorted(metrics.items(), key=lambda item: "/stats/" in item[0]):
        lines += [f"## `{rel}`", "", "| key | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in _flatten(data).items()]
        lines.append("")
    return "\n".join(lines)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif not isinstance(value, list):
            out[name] = value
    return out


def publish(stages: list[str], states: dict[str, State], runs: dict[str, StageRun], workspace: str) -> None:
    """Artifacts for the UI: stage results table, metrics, and the evaluation report when there is one."""
    create_table_artifact(results_table(stages, states, runs), key="stage-results",
                          description="Each DVC stage: ran / restored (run-cache) / up to date, with its stats")
    try:
        metrics = all_metrics(workspace)
    except DvcError as e:  # the stages' own results stand; say why the metrics are missing instead
        get_run_logger().warning("metrics artifact skipped: %s", e)
        metrics = {}
    if metrics:
        create_markdown_artifact(metrics_markdown(metrics), key="metrics",
                                 description="`dvc metrics show`: stage stats, training and evaluation metrics")
    report = Path(workspace, REPORT_FILE)
    if report.is_file():
        create_markdown_artifact(report.read_text(encoding="utf-8"), key="evaluation-report",
                                 description=f"{REPORT_FILE} of this run")


@flow(name="statetune-pipeline")
def pipeline(settings: PipelineSettings = PipelineSettings(), targets: list[str] | None = None,
             gpu_stages: list[str] | None = None, gpu_deployment: str = "statetune-stage/gpu",
             workspace: str = ".") -> list[dict[str, Any]]:
    """Bring the DVC pipeline in `workspace` up to date; returns the stage results table.

    Args:
        settings: params.yaml knobs written before any stage runs (empty fields keep the file's values).
        targets: run only these stages and everything upstream of them (empty: all stages).
        gpu_stages: stages to run on the GPU deployment instead of here, e.g. ["train"] (docs/pipeline.md).
        gpu_deployment: the `statetune-stage` deployment served on the GPU machine.
        workspace: the DVC project (git checkout) to run in.
    """
    logger = get_run_logger()
    changed = set_params(Path(workspace, PARAMS_FILE), settings.params_updates())
    for key, (old, new) in changed.items():
        logger.info("params.yaml: %s: %r -> %r", key, old, new)
    plan = stage_plan(workspace)
    stages = select(plan, targets)
    logger.info("plan: %s", " -> ".join(stages))
    futures = submit_stages(plan, stages, workspace, list(gpu_stages or []), gpu_deployment)
    for future in futures.values():
        future.wait()
    states = {stage: future.state for stage, future in futures.items()}
    runs = {s: st.result() for s, st in states.items() if st.is_completed()}
    publish(stages, states, runs, workspace)
    failed = [s for s in stages if s not in runs]
    if failed:
        raise StageFailedError(f"stages not completed: {failed} (see each task's log)")
    return results_table(stages, states, runs)


if __name__ == "__main__":
    pipeline()
