"""bench/train_speed.py on CPU: workloads have the promised shapes, and a row runs the real trainer end to end."""

from __future__ import annotations

import math
import time

import pytest


@pytest.fixture(scope="module")
def ts(load_script):  # noqa: ANN001, ANN201 - the script module
    return load_script("train_speed")


def test_workloads_are_long_truncated_samples_or_short_dialogues(ts) -> None:  # noqa: ANN001
    a = ts.synthetic_samples(ts.WORKLOADS["a"], 16, seed=0, vocab=65536)
    assert all(s.n_inputs == 512 and all(s.mask) for s in a)
    c = ts.synthetic_samples(ts.WORKLOADS["c"], 200, seed=0, vocab=65536)
    assert all(50 <= len(s.ids) <= 300 for s in c) and min(len(s.ids) for s in c) < 80 < 270 < max(len(s.ids) for s in c)
    assert all(not any(s.mask[:len(s.ids) // 3]) and all(s.mask[-len(s.ids) // 3:]) for s in c)
    assert a[0].ids != ts.synthetic_samples(ts.WORKLOADS["a"], 1, seed=1, vocab=65536)[0].ids


@pytest.mark.parametrize("precision,policy", [("bf16", "full"), ("int8", "full"), ("bf16", "selective")])
def test_a_cpu_row_trains_through_the_trainer_and_reports_every_field(ts, precision: str,  # noqa: ANN001
                                                                      policy: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Also: launch settings of our chunked kernels from the environment travel with the row and its file names."""
    monkeypatch.setenv("STATETUNE_WKV_CHUNK", "fwd_warps=8")
    spec = ts.Spec(model="tiny", workload="ta", precision=precision, grad_cp=True, compile=False, fla_chunk="64",
                   devices=1, steps=3, warmup=1, loss_chunk=16, device="cpu", lr=1.0, cp_policy=policy)
    row = ts.run_row(spec, time.time())
    assert row["grad_cp_policy"] == policy and row["wkv_launch"] == "fwd_warps=8"
    assert ts.row_name(spec).endswith("-fwd_warps-8")
    assert ts.row_name(spec).split("-")[3] == {"full": "cp1", "selective": "cp1s"}[policy]
    assert row["steps"] == 3 and row["tokens_per_step"] == 4 * 24 and row["tokens_per_s"] > 0
    assert math.isfinite(row["final_loss"]) and math.isfinite(row["loss_last5"]) and row["first_step_s"] > 0
    assert row["peak_process_gb"] is None and row["peak_reserved_gb"] is None and row["device"] == "cpu"
    text = ts.table([row, {**row, "error": "rc=1: boom"}])
    cp = {"full": "1 ", "selective": "1s"}[policy]
    assert f"| tiny  | ta | {precision.ljust(4)} | {cp} |" in text and "ERROR rc=1: boom" in text
