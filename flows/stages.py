"""DVC-facing helpers for the flows: the stage graph, one `dvc repro --single-item` run, and its outcome.

Boundary: subprocesses and files only, no Prefect import, so both the flows and the tests use the same code.
DVC decides what is up to date (dvc.lock + run-cache); this module only asks it and reads its answer:

- `stage_plan(root)` reads DVC's own stage graph (`dvc.repo.Repo(root).index.graph`): the pipeline stages in a
  topological order (upstream first, ties in dvc.yaml order) with each stage's direct upstream stages.
- `run_dvc(args, root, on_line)` runs `python -m dvc …` with the interpreter's environment on PATH (so a stage's
  `python -m tasks.x` finds the same virtualenv), streaming merged stdout/stderr line by line to `on_line`.
- `repro_stage(stage, root, on_line)` runs `dvc --wait-for-lock repro --single-item <stage>` and classifies DVC's
  log: ran, restored from the run-cache, or up to date.
"""

from __future__ import annotations

import enum
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LineSink = Callable[[str], None]

# DVC's own log lines (dvc/stage/run.py, dvc/stage/cache.py, dvc/stage/__init__.py, dvc 3.x).
_RAN = "Running stage '{}'"
_RESTORED = "Stage '{}' is cached - skipping run"
_UP_TO_DATE = "Stage '{}' didn't change, skipping"
_TAIL_LINES = 20
BAR_REDRAW_INTERVAL_S = 2.0


class Outcome(str, enum.Enum):
    """What `dvc repro --single-item` did with one stage."""

    RAN = "ran"
    RESTORED = "restored"  # outputs checked out from the run-cache, command not run
    UP_TO_DATE = "up to date"


class DvcError(RuntimeError):
    """A dvc command failed; the message names the command, the directory and the last lines of its log."""


@dataclass(frozen=True)
class StagePlan:
    """Pipeline stages in run order and each stage's direct upstream stages (names as `dvc dag` prints them)."""

    order: tuple[str, ...]
    upstream: dict[str, tuple[str, ...]]
    metrics: dict[str, tuple[str, ...]] = field(default_factory=dict)  # declared metrics files per stage

    def edges(self) -> set[tuple[str, str]]:
        """`(upstream, downstream)` pairs, the direction `dvc dag --dot` draws."""
        return {(u, s) for s, ups in self.upstream.items() for u in ups}


@dataclass
class StageRun:
    """One stage's result: outcome, wall seconds, and its declared metrics files (stats JSON) as read after."""

    stage: str
    outcome: Outcome
    seconds: float
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def dvc_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for dvc and the stage commands it starts: this interpreter's bin dir first on PATH,
    unbuffered Python output (so logs stream), analytics off."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run_dvc(args: Sequence[str], root: str | Path, on_line: LineSink | None = None) -> list[str]:
    """Run `python -m dvc <args>` in `root`; stream each output line to `on_line`; return the lines.

    A line ended by a bare carriage return is a progress-bar redraw (tqdm, rich): those reach `on_line` at most
    once per BAR_REDRAW_INTERVAL_S and are not kept in the returned lines.
    Raises DvcError (with the tail of the log) on a non-zero exit status.
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    lines: list[str] = []
    last_redraw = 0.0
    with subprocess.Popen(cmd, cwd=root, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        # newline="": split at \n, \r\n and bare \r, and keep the terminator so redraws can be told apart.
        for raw in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
            line = raw.strip()
            if not line:
                continue
            if raw.endswith("\r"):
                now = time.monotonic()
                if now - last_redraw < BAR_REDRAW_INTERVAL_S:
                    continue
                last_redraw = now
            else:
                lines.append(line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    if rc != 0:
        tail = "\n".join(lines[-_TAIL_LINES:])
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root} (exit {rc}):\n{tail}")
    return lines


def classify(stage: str, lines: Sequence[str]) -> Outcome:
    """Outcome of one stage from DVC's log lines.

    >>> classify("a", ["Stage 'a' is cached - skipping run, checking out outputs"]).value
    'restored'
    """
    text = "\n".join(lines)
    if _RESTORED.format(stage) in text:
        return Outcome.RESTORED
    if _RAN.format(stage) in text:
        return Outcome.RAN
    if _UP_TO_DATE.format(stage) in text:
        return Outcome.UP_TO_DATE
    raise DvcError(f"stage '{stage}': dvc reported none of ran / restored / up to date:\n{text[-2000:]}")


def repro_stage(stage: str, root: str | Path, on_line: LineSink | None = None, pull: bool = False,
                metrics: Sequence[str] = ()) -> StageRun:
    """`dvc --wait-for-lock repro --single-item [--pull] <stage>` in `root`; outcome + `metrics` files after."""
    t0 = time.perf_counter()
    args = ["--wait-for-lock", "repro", "--single-item", *(["--pull"] if pull else []), stage]
    lines = run_dvc(args, root, on_line)
    outcome = classify(stage, lines)
    return StageRun(stage, outcome, round(time.perf_counter() - t0, 2), read_metrics(root, metrics))


def _repo(root: str | Path):  # noqa: ANN202  (dvc.repo.Repo; imported lazily: `import dvc` costs ~1 s)
    from dvc.repo import Repo

    return Repo(str(root))


def stage_plan(root: str | Path) -> StagePlan:
    """Pipeline stages of the DVC project at `root`, from DVC's stage graph (edges point downstream → upstream).

    Only `dvc.yaml` stages are planned; `.dvc` files (data added with `dvc add`) have no command to run.
    """
    from dvc.stage import PipelineStage

    with _repo(root) as repo:
        graph = repo.index.graph
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        names = {s: _address(s, repo.root_dir) for s in stages}
        upstream = {
            names[s]: tuple(sorted(names[u] for u in graph.successors(s) if u in names)) for s in stages
        }
        metrics = {
            names[s]: tuple(os.path.relpath(o.fs_path, repo.root_dir) for o in s.outs if o.metric) for s in stages
        }
    declared = [names[s] for s in stages]
    return StagePlan(order=tuple(_topological(declared, upstream)), upstream=upstream, metrics=metrics)


def _address(stage: Any, root_dir: str) -> str:
    """The stage's name as DVC prints it from the repo root: `name`, or `sub/dvc.yaml:name` in a subfolder."""
    rel = os.path.relpath(stage.path, root_dir)
    return stage.name if rel == "dvc.yaml" else f"{rel}:{stage.name}"


def _topological(declared: list[str], upstream: dict[str, tuple[str, ...]]) -> list[str]:
    """Kahn's order; among ready stages the one declared first goes first (stable, readable plans)."""
    done: set[str] = set()
    order: list[str] = []
    while len(order) < len(declared):
        ready = [s for s in declared if s not in done and all(u in done for u in upstream[s])]
        assert ready, f"cycle among stages {sorted(set(declared) - done)}"
        order.append(ready[0])
        done.add(ready[0])
    return order


def read_metrics(root: str | Path, paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The JSON metrics files among `paths` (relative to `root`) that exist, as `{path: object}`.

    A file that is not a JSON object is reported as `{"error": ...}` rather than raised: the stage already
    succeeded, and this is only for display (`dvc metrics show` is the strict reader).
    """
    out: dict[str, dict[str, Any]] = {}
    for rel in paths:
        path = Path(root, rel)
        if path.suffix != ".json" or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            data = {"error": f"{rel}: unreadable metrics ({e})"}
        out[rel] = data if isinstance(data, dict) else {"error": f"{rel}: not a JSON object"}
    return out


def all_metrics(root: str | Path) -> dict[str, dict[str, Any]]:
    """Every metrics file DVC knows (stage `metrics` and top-level `metrics` of dvc.yaml) that exists now:
    `{path: object}`, from `dvc metrics show --json`; a file DVC could not read maps to `{"error": ...}`."""
    text = "\n".join(run_dvc(["metrics", "show", "--json"], root))
    shown = json.loads(text[text.index("{"):]) if "{" in text else {}
    out: dict[str, dict[str, Any]] = {}
    for rev in shown.values():
        for path, entry in (rev.get("data") or {}).items():
            out[path] = entry["data"] if "data" in entry else {"error": str(entry.get("error"))}
    return out
