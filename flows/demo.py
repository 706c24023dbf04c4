"""`make demo`: run the whole pipeline on the shipped samples through the Prefect flow, then say where the
tuned state and the evaluation report are and how to look at the run in the Prefect UI.

Offline and on CPU with the default params.yaml; Prefect runs an ephemeral local API whose database lives in
`$PREFECT_HOME` (the Makefile points it at the repo's git-ignored `.prefect/`), so `make ui` shows this run.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.pipeline import PARAMS_FILE, REPORT_FILE, pipeline
from tasks.common import read_params

TUNED_STATE = "reports/best-state.pth"
TRAIN_RUN = "runs/train"
DEFAULT_UI_PORT = "4200"
PROBE_TIMEOUT_S = 1.0


def running_ui_api() -> str | None:
    """The API of a `make ui` server on this machine, if one answers (then the demo run shows up there live
    and does not open the same SQLite database from a second, ephemeral server)."""
    url = f"http://127.0.0.1:{os.environ.get('UI_PORT', DEFAULT_UI_PORT)}/api"
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=PROBE_TIMEOUT_S) as resp:
            return url if resp.status == 200 else None
    except OSError:
        return None


def summary(table: list[dict], seconds: float, workspace: Path, ui_port: str) -> str:
    """The closing message: stage outcomes, output locations, next steps."""
    width = max(len(row["stage"]) for row in table)
    lines = [f"pipeline finished in {seconds:.0f} s:"]
    lines += [f"  {row['stage']:<{width}}  {row['outcome']}" for row in table]
    state, report = workspace / TUNED_STATE, workspace / REPORT_FILE
    model = (read_params(workspace / PARAMS_FILE).get("model") or {}).get("path", "models/base.pth")
    lines += [
        "",
        f"tuned state:        {state}  (+ {state.with_suffix('.json').name}; RWKV-Runner format)"
        if state.is_file() else f"tuned state:        missing ({state})",
        f"evaluation report:  {report}" if report.is_file() else f"evaluation report:  missing ({report})",
        f"training run:       {workspace / TRAIN_RUN}/ (state per epoch, metrics.csv, loss.png)",
        "",
        f"chat with it:       .venv/bin/statetune chat --model {model} --state {TUNED_STATE}",
        f"see it in the UI:   make ui   then open http://127.0.0.1:{ui_port} (flow runs, logs, artifacts; "
        "Deployments > statetune-pipeline/manual > Run to change settings)",
        "re-run (no-op):     make demo   or   . .venv/bin/activate && dvc repro",
    ]
    return "\n".join(lines)


def main() -> None:
    workspace = Path.cwd()
    ui_port = os.environ.get("UI_PORT", DEFAULT_UI_PORT)
    api = None if os.environ.get("PREFECT_API_URL") else running_ui_api()
    t0 = time.perf_counter()
    if api:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            table = pipeline(workspace=str(workspace))
    else:
        table = pipeline(workspace=str(workspace))
    print(summary(table, time.perf_counter() - t0, workspace, ui_port), file=sys.stderr)


if __name__ == "__main__":
    main()
