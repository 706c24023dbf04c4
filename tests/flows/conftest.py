"""Fixtures of the flow tests: a synthetic git+DVC project (synthetic_project.py) and a temporary Prefect API."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Offline and isolated before prefect is imported by any test module of this folder.
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="statetune-prefect-home-"))
os.environ.pop("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)
# --import-mode=importlib puts no test folder on sys.path; the helpers module is imported by name.
sys.path.insert(0, str(Path(__file__).parent))

from synthetic_project import make_project  # noqa: E402


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh synthetic git+DVC project (nothing reproduced yet) with a local remote at tmp_path/remote."""
    return make_project(tmp_path / "project", remote=tmp_path / "remote")


@pytest.fixture(scope="session")
def prefect_backend():
    """One temporary Prefect API (SQLite) for the flow tests of this session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
