"""Scheduled refresh: list the configured sources (no download); when their media ids changed, record the new
list; then bring the pipeline up to date.

The list lives in `sources.json` (git-tracked, a dependency of the download stage in dvc.yaml). It is replaced
atomically and only when its content changed, so unchanged sources leave every stage up to date and the run
costs a listing plus one no-op `dvc repro -s` per stage. New videos change the file, DVC re-runs download, and
everything downstream re-runs or is restored from the run-cache as its inputs dictate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import PARAMS_FILE, PipelineSettings, pipeline
from flows.stages import dvc_env

SOURCES_FILE = "sources.json"
LIST_RETRIES = 2
LIST_RETRY_DELAY_S = 30


class SourceListError(RuntimeError):
    """Listing the sources failed; the message holds the lister's own error output."""


def list_sources(workspace: str | Path, dest: Path) -> None:
    """`python -m tasks.download --list-only` in `workspace`: writes `{"sources": [...], "media_ids": [...]}`."""
    cmd = [sys.executable, "-m", "tasks.download", "--params", PARAMS_FILE, "--list-only", "--out", str(dest)]
    proc = subprocess.run(cmd, cwd=workspace, env=dvc_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SourceListError(f"listing sources in {workspace} failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def refresh_source_list(workspace: str | Path, sources_file: str = SOURCES_FILE) -> tuple[bool, dict]:
    """List the sources into a temp file next to `sources_file`; move it into place only if the listing differs.

    Returns `(changed, listing)`.
    """
    dest = Path(workspace, sources_file)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        list_sources(workspace, tmp)
        listing = json.loads(tmp.read_text(encoding="utf-8"))
        old = json.loads(dest.read_text(encoding="utf-8")) if dest.is_file() else None
        changed = listing != old
        if changed:
            os.replace(tmp, dest)
        return changed, listing
    finally:
        tmp.unlink(missing_ok=True)


@task(name="list-sources", retries=LIST_RETRIES, retry_delay_seconds=LIST_RETRY_DELAY_S, cache_policy=NO_CACHE)
def update_sources(workspace: str, sources_file: str) -> bool:
    """Network task: refresh the tracked source list; True when it changed."""
    changed, listing = refresh_source_list(workspace, sources_file)
    get_run_logger().info("%s: %d media ids from %d sources, %s", sources_file, len(listing.get("media_ids", [])),
                          len(listing.get("sources", [])), "changed" if changed else "unchanged")
    return changed


@flow(name="statetune-refresh")
def refresh(workspace: str = ".", sources_file: str = SOURCES_FILE,
            settings: PipelineSettings = PipelineSettings()) -> list[dict]:
    """Refresh the source list, then run the pipeline (a subflow; every stage up to date when nothing changed)."""
    update_sources(workspace, sources_file)
    return pipeline(settings=settings, workspace=workspace)
