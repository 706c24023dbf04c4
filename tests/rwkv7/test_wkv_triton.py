"""Our Triton WKV-7 kernels (step by step: backend "triton"; chunked: "chunk") against the float32 reference, run in
Triton's interpreter on CPU.

`triton.jit` decides at import whether to interpret, so each check runs in a child process started with
TRITON_INTERPRET=1; it prints the relative errors (max |triton − ref| / max |ref|) as JSON. The GPU runs the
same comparison through `bench/gpu_check_wkv.py --backend triton`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent('''
    import json, sys
    import torch
    import torch.nn.functional as F
    from rwkv7.wkv import wkv7, wkv7_reference

    B, T, H, dtype_name, strongest_decay, packed, restarts, settings, device, fast = json.loads(sys.argv[1])
    import os
    os.environ["STATETUNE_WKV_CHUNK" if fast == "chunk" else "STATETUNE_WKV_TRITON"] = settings
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    def randn(*shape):
        return torch.randn(*shape, generator=g)
    u = torch.rand(B, T, H, 64, generator=g)
    log_decay = -0.6065 * (0.999 + 0.001 * u if strongest_decay else torch.sigmoid(randn(B, T, H, 64)))
    kappa = F.normalize(randn(B, T, H, 64), dim=-1)
    iclr = torch.sigmoid(randn(B, T, H, 64))
    xs = [randn(B, T, H, 64), log_decay, randn(B, T, H, 64) * 0.5, randn(B, T, H, 64), -kappa, kappa * iclr]
    xs = [x.to(device, dtype) for x in xs]
    n_seq = 3 if packed else B
    s0 = (randn(n_seq, H, 64, 64) * 0.3).to(device)
    cu = torch.tensor([0, 5, 6, T], device=device) if packed else None
    starts = None
    if restarts:
        starts = torch.zeros(B, T, dtype=torch.bool)
        for row, positions in enumerate(restarts):
            starts[row, positions] = True
        starts = starts.to(device)
        s0 = s0[:1]  # one initial state, broadcast over the rows and shared by every sequence
    results = []
    for backend in (fast, "reference"):
        leaves = [(x.float() if backend == "reference" else x).clone().requires_grad_() for x in (*xs, s0)]
        out, final = wkv7(*leaves, cu_seqlens=cu, starts=starts, backend=backend)
        g2 = torch.Generator().manual_seed(1)
        loss = ((out.float() * torch.randn(out.shape, generator=g2).to(device)).sum()
                + (final * torch.randn(final.shape, generator=g2).to(device)).sum())
        grads = torch.autograd.grad(loss, leaves)
        results.append([out.float(), final, *(x.float() for x in grads)])
    names = ["out", "final", "dr", "dlog_decay", "dk", "dv", "da", "db", "dinitial_state"]
    print(json.dumps({n: ((a - b).abs().max() / b.abs().max()).item() for n, a, b in zip(names, *results)}))
''')


def errors(B: int, T: int, H: int, dtype: str = "float32", strongest_decay: bool = False,
           packed: bool = False, restarts: list[list[int]] | None = None, settings: str = "",
           device: str = "cpu", backend: str = "triton") -> dict[str, float]:
    """Relative errors of our kernels (`backend`: triton or chunk) vs reference; `restarts` lists, per row, the
    positions that start a new sequence; `settings` goes to STATETUNE_WKV_TRITON or STATETUNE_WKV_CHUNK (launch
    settings)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD,
                           json.dumps([B, T, H, dtype, strongest_decay, packed, restarts, settings, device, backend])],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("settings", ["block_v=64,num_warps=4", "block_v=16,num_warps=1", "block_v=16,atomic=0"])
def test_triton_kernels_match_the_reference_in_outputs_final_state_and_every_gradient(settings: str) -> None:
    """T = 37 crosses two re-anchoring checkpoints (every 16 steps) and ends between them; one program per
    head, or four that split the value rows (their key-side gradients added atomically, the default, or written
    per block and summed afterwards: atomic=0)."""
    errs = errors(B=2, T=37, H=2, settings=settings)
    assert set(errs) == {"out", "final", "dr", "dlog_decay", "dk", "dv", "da", "db", "dinitial_state"}
    assert all(e < 1e-4 for e in errs.values()), errs


def test_restarts_mid_row_match_the_reference() -> None:
    """Rows holding several sequences (restarts at 7 and 8: a one-token sequence; at 16 and 32: on a
    checkpoint; at 21: recomputed from the checkpoint at 15), every gradient incl. the shared initial state."""
    errs = errors(B=2, T=40, H=2, restarts=[[7, 8, 21, 32], [16, 39]], settings="block_v=32,num_warps=2")
    assert all(e < 1e-4 for e in errs.values()), errs


def test_walking_back_through_the_strongest_decays_stays_within_float32_limits() -> None:
    """Backward divides by the decay (≥ 0.545) between checkpoints: the worst case for its rounding."""
    errs = errors(B=1, T=96, H=1, strongest_decay=True)
    assert all(e < 2e-3 for e in errs.values()), errs


def test_bf16_inputs_and_packed_sequences_go_through_the_dispatch() -> None:
    """bf16 operands (float32 maths inside, outputs and gradients rounded to bf16), three packed sequences of
    5, 1 and 26 tokens, each from its own initial state."""
    errs = errors(B=1, T=32, H=2, dtype="bfloat16", packed=True)
    assert all(e < 1.5e-2 for e in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, limit", [("float32", 1e-4), ("bfloat16", 1.5e-2)])
def test_compiled_kernels_match_the_reference_on_the_gpu(dtype: str, limit: float) -> None:
    errs = errors(B=3, T=200, H=4, dtype=dtype, device="cuda")
    assert all(e < limit for e in errs.values()), errs


# The chunked kernels (rwkv7.wkv_chunk): chunk length 16, 32 or 64.
@pytest.mark.parametrize("settings", ["chunk=16", "chunk=32,bwd_warps=4", "chunk=64"])
def test_chunked_kernels_match_the_reference_in_outputs_final_state_and_every_gradient(settings: str) -> None:
    """T = 37 is padded to 64: three chunks of 16 with the last partly padding, or one chunk of 64."""
    errs = errors(B=2, T=37, H=2, settings=settings, backend="chunk")
    assert set(errs) == {"out", "final", "dr", "dlog_decay", "dk", "dv", "da", "db", "dinitial_state"}
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize("settings", ["seq_chunks=0", "seq_chunks=0,chunk=32", "seq_chunks=1",
                                      "seq_chunks=1,chunk=32"])
def test_chunked_kernels_restart_mid_row_like_the_reference(settings: str) -> None:
    """Restarts inside chunks (7 and 8: a one-token sequence; 21), on chunk starts (16, 32), at a row's first
    position and at its last, in rows with one and with several restarts per chunk."""
    errs = errors(B=3, T=40, H=2, restarts=[[7, 8, 21, 32], [0, 16, 39], [5]], settings=settings, backend="chunk")
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize("settings", ["seq_chunks=0", "seq_chunks=0,chunk=64"])  # too many sequences for seq_chunks
def test_chunked_kernels_restart_at_every_position_of_a_chunk(settings: str) -> None:
    """One-token sequences at positions 16-31, every position of a chunk of 16 (each segment there enters from the
    initial state), and restarts at every odd position up to a chunk's last row."""
    errs = errors(B=2, T=48, H=2, restarts=[list(range(16, 32)), list(range(1, 48, 2))], settings=settings,
                  backend="chunk")
    assert all(e < 1e-5 for e in errs.values()), errs


def test_chunked_kernels_stay_within_float32_limits_at_the_strongest_decays() -> None:
    """A chunk of 64 at the strongest decay divides by e^(-0.61·64) ≈ 1e-17 and multiplies back (the module
    docstring's argument): the worst case for its rounding."""
    errs = errors(B=1, T=128, H=1, strongest_decay=True, settings="chunk=64", backend="chunk")
    assert all(e < 1e-5 for e in errs.values()), errs


def test_chunked_kernels_take_bf16_inputs_and_packed_sequences_through_the_dispatch() -> None:
    errs = errors(B=1, T=32, H=2, dtype="bfloat16", packed=True, backend="chunk")
    assert all(e < 1.5e-2 for e in errs.values()), errs


def test_bf16_products_and_states_stay_at_the_level_of_bf16_rounding() -> None:
    """bf16 inputs: products with bfloat16 operands and bfloat16 chunk-start states (the defaults) against TF32 and
    float32 states, over 13 chunks with restarts: every error within the bf16 limit and at most ~2× the TF32 one
    (the final state, float32 and exact to 1e-7 with TF32, is held to the others' level instead)."""
    restarts = [[0, 50, 64, 130], [0]]
    fast = errors(B=2, T=200, H=2, dtype="bfloat16", restarts=restarts, backend="chunk")
    tf32 = errors(B=2, T=200, H=2, dtype="bfloat16", restarts=restarts, backend="chunk",
                  settings="bf16_dots=0,bf16_states=0")
    assert all(e < 1.5e-2 for e in fast.values()), fast
    assert all(fast[n] < 2.5 * max(tf32[n], 4e-3) for n in fast), (fast, tf32)


ROUND_CHILD = textwrap.dedent('''
    import torch, triton, triton.language as tl
    from rwkv7.wkv_chunk import _round_bf16

    @triton.jit
    def kernel(x_ptr, out_ptr, n: tl.constexpr):
        offs = tl.arange(0, n)
        tl.store(out_ptr + offs, _round_bf16(tl.load(x_ptr + offs)))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    x[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0])  # ties round to even: 1, 1 + 2**-6, -1
    out = torch.empty_like(x)
    kernel[(1,)](x, out, 4096)
    print(int((out != x.bfloat16().float()).sum()))
''')


def test_the_interpreters_bf16_products_round_like_torch() -> None:
    """Triton's interpreter multiplies bfloat16 tiles wrongly (triton 3.6), so there the kernels round the operands
    themselves (`_round_bf16`, PREC "bf16-emulated"): it must round exactly as torch's float32 -> bfloat16."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", ROUND_CHILD], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, limit", [("float32", 1e-4), ("bfloat16", 1.5e-2)])
@pytest.mark.parametrize("settings", ["seq_chunks=0", "seq_chunks=1"])
def test_compiled_chunked_kernels_match_the_reference_on_the_gpu(dtype: str, limit: float, settings: str) -> None:
    errs = errors(B=3, T=200, H=4, dtype=dtype, device="cuda", backend="chunk", settings=settings,
                  restarts=[[0, 50, 64, 130], [0], [0, 199]])
    assert all(e < limit for e in errs.values()), errs


def test_chunked_kernels_refuse_inputs_beyond_their_32_bit_offsets() -> None:
    """Checked before any memory is allocated or any kernel launched (meta tensors carry only shapes)."""
    import torch

    from rwkv7.wkv_chunk import wkv7_chunk

    B, T, H = 256, 4096, 40  # chunk-start states: 256 · 40 · 256 · 64 · 64 elements > 2³¹
    xs = [torch.empty(B, T, H, 64, device="meta") for _ in range(6)]
    with pytest.raises(ValueError, match="too large for the chunked kernels' 32-bit offsets"):
        wkv7_chunk(*xs, torch.empty(1, H, 64, 64, device="meta"))


def test_launch_settings_come_from_the_environment_and_bad_ones_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from rwkv7 import wkv_chunk, wkv_triton

    monkeypatch.setenv("STATETUNE_WKV_CHUNK", "chunk=32, bwd_warps=4")
    assert wkv_chunk.launch_settings() == {**wkv_chunk.SETTINGS, "chunk": 32, "bwd_warps": 4}
    monkeypatch.setenv("STATETUNE_WKV_TRITON", "atomic=0")
    assert wkv_triton.launch_settings() == {**wkv_triton.SETTINGS, "atomic": 0}
    for bad, message in (("chunk=24", "chunk must be 16, 32 or 64"), ("block_v=16", "expected e.g."),
                         ("chunk=x", "expected e.g.")):
        monkeypatch.setenv("STATETUNE_WKV_CHUNK", bad)
        with pytest.raises(ValueError, match=message):
            wkv_chunk.launch_settings()


def test_the_products_precision_follows_the_input_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """IEEE float32 for float32 inputs; bfloat16 operands only for bfloat16 inputs (emulated in the interpreter);
    float16 inputs, which bfloat16 would round more than their own precision, and bf16_dots=0 keep TF32."""
    import torch

    from rwkv7.wkv_chunk import _precision

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _precision(torch.float32, 1) == "ieee"
    assert _precision(torch.bfloat16, 1) == "bf16"
    assert _precision(torch.bfloat16, 0) == "tf32"
    assert _precision(torch.float16, 1) == "tf32"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _precision(torch.bfloat16, 1) == "bf16-emulated"


def test_chunk_table_starts_chunks_at_every_sequence_start() -> None:
    """seq_chunks: chunks of L tokens from each sequence's start (a row's first position starts one), the last one
    of a sequence shorter; rows padded with T; only chunks that continue a sequence get a slot of their own for
    their start state; too many sequences for the table fail loudly."""
    import torch

    from rwkv7.wkv_chunk import chunk_table

    flags = torch.zeros(2, 64, dtype=torch.int8)
    flags[0, [7, 8, 21, 40]] = 1
    flags[1, 0] = 1
    table = chunk_table(flags, 16, 8)
    assert table[:, 0].tolist() == [7, 4]  # chunks per row
    # each chunk's start (then T: padding) in the low 32 bits, the slot of its start state in the high 32 bits
    # (4: a sequence's start, which starts from the initial state; 5: padding)
    assert (table[:, 1:] & 0xFFFFFFFF).tolist() == [[0, 7, 8, 21, 37, 40, 56, 64, 64],
                                                    [0, 16, 32, 48, 64, 64, 64, 64, 64]]
    assert (table[:, 1:] >> 32).tolist() == [[4, 4, 4, 4, 0, 4, 1, 5, 5], [4, 0, 1, 2, 5, 5, 5, 5, 5]]
    flags[0, 1:12] = 1  # 15 chunks in row 0
    with pytest.raises(RuntimeError, match="a packed row of 64 tokens needs more than 8 chunks"):
        chunk_table(flags, 16, 8)


def test_a_steps_wkv_calls_share_one_chunk_table_until_the_flags_change() -> None:
    """Every layer of a step gets the same `starts` tensor: one table for all; a changed tensor (in place, as a
    CUDA graph's static input is) or another tensor gets its own."""
    import torch

    from rwkv7.wkv_chunk import step_chunk_table

    starts = torch.zeros(2, 64, dtype=torch.bool)
    starts[0, 20] = True
    first = step_chunk_table(starts, starts.to(torch.int8), 16, 12)
    assert step_chunk_table(starts, starts.to(torch.int8), 16, 12) is first
    starts[1, 30] = True  # in place: the version counter moves
    second = step_chunk_table(starts, starts.to(torch.int8), 16, 12)
    assert second is not first and second[1, 0].item() == 5  # chunks at 0, 16, 30, 46, 62
    other = starts.clone()
    assert step_chunk_table(other, other.to(torch.int8), 16, 12) is not second
    flags = other.to(torch.int8)
    assert step_chunk_table(other, flags, 32, 12) is not step_chunk_table(other, flags, 16, 12)


def test_packed_rows_with_too_many_sequences_are_refused_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a batch goes to the GPU, where the chunk table's own check would only say "device-side assert": a
    row of 40 tokens (64 as the kernels see it) holds up to 64 / 16 + 64 / 8 = 12 chunks under seq_chunks."""
    import torch

    from rwkv7.wkv_chunk import check_packed_rows

    starts = torch.zeros(2, 40, dtype=torch.bool)
    starts[:, 0] = True
    starts[1, 4:40:4] = True  # row 1: nine sequences of 4 tokens and one padded to 28: 9 + 2 = 11 chunks
    check_packed_rows(starts)
    starts[1, 2:40:4] = True  # now 19 of 2 tokens and one padded to 26: 19 + 2 = 21 chunks
    with pytest.raises(ValueError, match=r"needs 21 chunks under seq_chunks, which keeps room for 12 .*"
                                         r"STATETUNE_WKV_CHUNK=seq_chunks=0"):
        check_packed_rows(starts)
    monkeypatch.setenv("STATETUNE_WKV_CHUNK", "seq_chunks=0")  # restarts inside chunks: any row fits
    check_packed_rows(starts)
