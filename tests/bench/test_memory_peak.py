"""bench/memory_peak.py: the peak of an allocator trace and what was alive then, by allocation site."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def mp(load_script):  # noqa: ANN001, ANN201 - the script module
    return load_script("memory_peak")


def _frames(*where: tuple[str, int, str]) -> list[dict[str, object]]:
    return [{"filename": f, "line": line, "name": name} for f, line, name in where]


MODEL = ("/repo/rwkv7/model.py", 120, "recur")
TUNING = ("/repo/rwkv7/tuning.py", 300, "dense_loss")
NORM = ("/venv/lib/python3.12/site-packages/torch/nn/functional.py", 2900, "layer_norm")
HEAD = ("/venv/lib/python3.12/site-packages/torch/nn/modules/linear.py", 134, "forward")


def _trace() -> list[dict[str, object]]:
    ev = lambda action, addr, size, *frames: {"action": action, "addr": addr, "size": size,  # noqa: E731
                                              "frames": _frames(*frames)}
    return [
        ev("segment_alloc", 0, 1 << 30),
        ev("alloc", 1, 100, NORM, MODEL),  # lives on
        ev("alloc", 2, 300, HEAD, TUNING),
        ev("alloc", 3, 50, NORM, MODEL),  # the peak: 450 B
        ev("free_requested", 2, 300),
        ev("free_completed", 2, 300),
        ev("alloc", 4, 200, MODEL),  # 350 B: below the peak
        ev("free_requested", 3, 50),
        ev("free_completed", 3, 50),
    ]


def test_the_peak_is_the_most_allocated_moment_with_the_blocks_alive_then(mp) -> None:  # noqa: ANN001
    peak = mp.find_peak(_trace())
    assert (peak.bytes, peak.index) == (450, 3)
    assert sorted(b["addr"] for b in peak.live) == [1, 2, 3]
    assert mp.by_site(peak.live) == [("rwkv7/tuning.py:300 dense_loss ← torch/nn/modules/linear.py forward", 300, 1),
                                     ("rwkv7/model.py:120 recur ← torch/nn/functional.py layer_norm", 150, 2)]
    # recorded without stacks: grouped by size
    bare = [{**e, "frames": []} for e in _trace()]
    assert mp.by_site(mp.find_peak(bare).live) == [("(no stack) blocks of 0.0 MB", 450, 3)]
    # traces without free_requested events count frees when they complete
    legacy = [e for e in _trace() if e["action"] != "free_requested"]
    assert mp.find_peak(legacy).bytes == 450


def test_sites_name_our_frame_and_the_allocating_one(mp) -> None:  # noqa: ANN001
    assert mp.site(_frames(MODEL)) == "rwkv7/model.py:120 recur"
    assert mp.site(_frames(NORM)) == "torch/nn/functional.py layer_norm"
    assert mp.site([]) == "(no stack)"


def test_the_script_reports_a_snapshot_file(mp, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "memory.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[], _trace()]}))
    out = subprocess.run([sys.executable, mp.__file__, str(path), "--top", "1"], capture_output=True, text=True,
                         check=True).stdout
    assert "device 1: 9 events, peak 0.0 MB allocated at event 3, 3 blocks live" in out
    assert "rwkv7/model.py:120 recur" in out  # the stack of the allocation that reached the peak
    assert "(1 more sites)" in out and "device 0" not in out
