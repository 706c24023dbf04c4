"""Fixtures of the flow tests: a synthetic git+DVC project (synthetic_project.py) and a real Prefect server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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

from synthetic_project import make_project  # noqa: E402

SERVER_START_TIMEOUT_S = 180  # a fresh SQLite database is migrated first: ~6 s idle, much more on a busy box


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh synthetic git+DVC project (nothing reproduced yet) with a local remote at tmp_path/remote."""
    return make_project(tmp_path / "project", remote=tmp_path / "remote")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process this test session started (by its own handle), escalating to kill after a grace time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 (free port, temp PREFECT_HOME, SQLite); yields its API URL.

    This process's Prefect client points at it for the whole session.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, proc, SERVER_START_TIMEOUT_S)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        stop(proc)
        log.close()
