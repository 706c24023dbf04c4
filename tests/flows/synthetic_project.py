"""A tiny real DVC project in a temp git repo: four `python -c` stages in a diamond, plus helpers.

    sources.json ─> make ──> left ──┐
                       └──> right ──┴──> join          (right also reads params `right.n`)

Every stage command appends `<stage> <start> <end>` to `runs.log` (not a DVC output), so a test can tell a
stage that really ran from one DVC restored from its run-cache. `make` writes a stats JSON declared as metrics
and prints a progress line ("file 1/1").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = ("make", "left", "right", "join")

PARAMS = """\
# synthetic params: one section per stage
make:
  n: 1  # how many items make writes
right:
  n: 2  # right's multiplier
  sleep: 0  # seconds right waits (parallelism test)
left:
  sleep: 0  # seconds left waits (parallelism test)
download:
  sources: [media]  # listed by the real `tasks.download --list-only` (refresh test)
schedule:
  refresh_cron: "0 3 * * *"
"""
SOURCES_JSON = '{"sources": ["media"], "media_ids": ["generic-one"]}\n'



def _stage_cmd(stage: str, body: str) -> str:
    log = (f"import time, yaml; p = yaml.safe_load(open('params.yaml')); t0 = time.time(); {body}; "
           f"open('runs.log', 'a').write('{stage} %f %f\\n' % (t0, time.time()))")
    return f'python -c "{log}"'


DVC_YAML = f"""\
stages:
  make:
    cmd: {_stage_cmd("make", "print('file 1/1'); open('a.txt', 'w').write('a' * p['make']['n']); import json; "
                     "open('stats/make.json', 'w').write(json.dumps(dict(stage='make', read=0, written=p['make']['n'], "
                     "dropped_total=0, seconds=0.0)))")}
    deps: [sources.json]
    params: [make.n]
    outs: [a.txt]
    metrics: [stats/make.json]
  left:
    cmd: {_stage_cmd("left", "time.sleep(p['left']['sleep']); open('b.txt', 'w').write(open('a.txt').read() + 'b')")}
    deps: [a.txt]
    params: [left.sleep]
    outs: [b.txt]
  right:
    cmd: {_stage_cmd("right", "time.sleep(p['right']['sleep']); "
                     "open('c.txt', 'w').write(open('a.txt').read() * p['right']['n'])")}
    deps: [a.txt]
    params: [right.n, right.sleep]
    outs: [c.txt]
  join:
    cmd: {_stage_cmd("join", "open('d.txt', 'w').write(open('b.txt').read() + open('c.txt').read())")}
    deps: [b.txt, c.txt]
    outs: [d.txt]
"""


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command (dvc/git) in `cwd` with the venv first on PATH; fail the test with its output."""
    from flows.stages import dvc_env

    proc = subprocess.run(cmd, cwd=cwd, env=dvc_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def dvc(cwd: Path, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd)


def git(cwd: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd)


def runs(repo: Path) -> list[str]:
    """Stage names in the order their commands ran (from runs.log)."""
    log = repo / "runs.log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def make_project(path: Path, remote: Path | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "stats").mkdir()
    (path / "params.yaml").write_text(PARAMS)
    (path / "sources.json").write_text(SOURCES_JSON)
    (path / "media").mkdir()
    (path / "media" / "one.mp4").write_bytes(b"not really a video")
    (path / "dvc.yaml").write_text(DVC_YAML)
    (path / ".gitignore").write_text("runs.log\n")
    git(path, "init", "-q")
    dvc(path, "init", "-q")
    if remote is not None:
        dvc(path, "remote", "add", "-d", "shared", str(remote))
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "synthetic pipeline")
    return path


