"""bench/kernel_regs.py on the CPU machine: our chunked kernels compile for the H200 and ptxas reports on them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def kr(load_script):  # noqa: ANN001, ANN201 - the script module
    module = load_script("kernel_regs")
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
