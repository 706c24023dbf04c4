"""bench/kernel_regs.py on the CPU machine: our chunked kernels compile for the H200 and ptxas reports on them."""

from __future__ import annotations

import re

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
    assert kr.main(["--kernels", "fwd", "--warps", "4", "--T", "64", "--H", "2", "--stages", "1,3"]) == 0
    rows = [[cell.strip() for cell in line.split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| fwd |")]
    assert [(row[2], row[4]) for row in rows] == [("no", "1"), ("no", "3"), ("yes", "1"), ("yes", "3"),
                                                  ("aligned", "1"), ("aligned", "3")]
    shared = [int(row[8].split()[0]) for row in rows]
    assert shared[0] < shared[1] and shared[2] < shared[3]  # pipelined loads of later chunks wait in shared memory
    if kr.NVDISASM.is_file():  # the chunk loop's machine code: restarts add code to it
        assert 0 < plain["loop_mma"] < plain["loop_instructions"] < restarts["loop_instructions"]
        assert len(rows[0]) == 15
        assert [int(row[13]) > 0 for row in rows] == [False, True] * 3  # pipelined (stages 3): loads issued ahead


def test_the_loop_report_counts_the_longest_loop_of_disassembled_code(kr) -> None:  # noqa: ANN001
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDL R2, [R1] ;
        /*0020*/                   HMMA.1684.F32.TF32 R4, R8, R12, R4 ;
        /*0028*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
.L_x_2:
        /*0030*/                   STL [R1], R2 ;
        /*0040*/               @P1 BRA `(.L_x_2) ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
        /*0060*/                   BRA `(.L_x_3) ;
.L_x_3:
        /*0070*/                   EXIT ;
"""
    assert kr.loop_report(sass) == {"loop_instructions": 6, "loop_local_loads": 1, "loop_local_stores": 1,
                                    "loop_mma": 1, "loop_async_copies": 1}
    with pytest.raises(RuntimeError, match="no loop"):
        kr.loop_report(sass.replace("(.L_x_1)", "(.L_x_3)").replace("(.L_x_2)", "(.L_x_3)"))


def test_variants_compile_as_the_launcher_compiles_them_for_torch_tensors(kr) -> None:  # noqa: ANN001
    """16-byte-aligned pointers, as Triton's launcher marks every torch allocation: the chunk's loads are then
    16-byte copies into shared memory ahead of use (without the mark they would be 2-byte loads, one element each)."""
    ptx = kr.compile_variant(kr.wkv_chunk._bwd, restarts="aligned", warps=4, dtype="bf16", T=64, H=2,
                             arch=90).asm["ptx"]
    assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10", ptx)
    assert "ld.global.b16" not in ptx
