"""Fixtures of the flow tests: a synthetic git+DVC project (synthetic_project.py) and a real Prefect server."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Offline and isolated before prefect is imported by any test module of this folder.
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="statetune-prefect-home-"))
os.environ.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
# --import-mode=importlib puts no test folder on sys.path; the helpers module is imported by name.
sys.path.insert(0, str(Path(__file__).parent))

from server_process import start_server, stop  # noqa: E402
from synthetic_project import make_project  # noqa: E402

DRAIN_TIMEOUT_S = 10
SERVER_START_TIMEOUT_S = 180  # a fresh SQLite database is migrated first: ~6 s idle, much more on a busy box


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh synthetic git+DVC project (nothing reproduced yet) with a local remote at tmp_path/remote."""
    return make_project(tmp_path / "project", remote=tmp_path / "remote")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 (free port, temp PREFECT_HOME, SQLite); yields its API URL.

    This process's Prefect client points at it for the whole session.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proc, url = start_server(tmp_path_factory.mktemp("prefect-server-home"), SERVER_START_TIMEOUT_S)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            # send the buffered run logs and events while the server is still up
            APILogWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
            EventsWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
    finally:
        stop(proc)
