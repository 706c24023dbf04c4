"""bench/kernel_regs.py on the CPU machine: our chunked kernels compile for the H200 and ptxas reports on them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kr():  # noqa: ANN201 - the script module
    spec = importlib.util.spec_from_file_location("kernel_regs", REPO / "bench" / "kernel_regs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_regs"] = module
    spec.loader.exec_module(module)
    if not module.PTXAS.is_file():
        pytest.skip(f"this Triton ships no ptxas ({module.PTXAS})")
    return module


def test_the_forward_kernel_compiles_for_sm90_and_ptxas_reports_on_it(kr,  # noqa: ANN001
                                                                       capsys: pytest.CaptureFixture) -> None:
    plain = kr.measure(kr.wkv_chunk._fwd, restarts=False, warps=8, dtype="bf16", T=64, H=2, arch=90)
    restarts = kr.measure(kr.wkv_chunk._fwd, restarts=True, warps=8, dtype="bf16", T=64, H=2, arch=90)
    for r in (plain, restarts):
        assert 32 <= r["registers"] <= 255 and r["spill_stores"] >= 0 and r["spill_loads"] >= 0 and r["shared"] > 0
    assert kr.signature(kr.wkv_chunk._bwd, "bf16")["ds0_ptr"] == "*fp32"  # states stay float32
    assert kr.main(["--kernels", "fwd", "--warps", "4", "--T", "64", "--H", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fwd |")]
    assert [line.split("|")[2].strip() for line in rows] == ["no", "yes"]
