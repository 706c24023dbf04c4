"""WKV-7 as two Triton kernels (forward, backward) with a gradient for the initial state and per-token restarts.

Boundary: `rwkv7.wkv.wkv7` without cu_seqlens (inputs `[B, T, H, N]`, initial state `[B, H, N, N]` in our
[value, key] orientation), optionally with `starts [B, T]`: True where a new sequence begins from the row's
initial state (several short dialogues packed into one row of fixed width). The recurrence is the reference's:

    S_t = S_{t-1} · diag(w_t) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ,    out_t = S_t r_t,    w_t = exp(log_decay_t)

Each value row of S evolves on its own (the transition acts on the key side), so a program owns `block_v` rows
of one (batch row, head), keeps them in registers in float32 and walks the sequence; B·H·N/block_v programs run
at once. Sums over value rows (the gradients of r, k, log decay, a, b) are written per program and added up
afterwards.

Backward walks back in time without storing every state: S_{t-1} = (S_t − (S_{t-1} a_t) b_tᵀ − v_t k_tᵀ) / w_t,
where the forward pass kept the vector S_{t-1} a_t of every step, and the state itself every `CHUNK` steps to
re-anchor the walk (RWKV-7's decay w lies in (0.545, 1), so dividing by it over CHUNK steps amplifies float32
rounding by at most 1.84^CHUNK). At a restart the state before it belongs to the previous sequence and cannot be
walked back to; it is recomputed forward from the last checkpoint (fewer than CHUNK steps). Memory kept for
backward: `sa` (float32, the size of v) and the checkpoints (`T / CHUNK` states per row and head).

Status: checked against `wkv7_reference` (outputs, final state, every input gradient and d(initial state)) in
Triton's interpreter on CPU (tests/rwkv7/test_wkv_triton.py) and on an H200 (`bench/gpu_check_wkv.py --backend
triton`: fp32 ≤ 9e-7, bf16 ≤ 4e-3 relative, with and without restarts). Training uses it with `pack`
(`TrainParams.wkv_kernel`); elsewhere `STATETUNE_WKV_BACKEND=triton` selects it. Alone it is 1.5× faster than
fla's chunk kernel, but inside a CUDA-graphed training step fla's is faster (BENCHMARKS.md, fourth session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from rwkv7.wkv import env_settings, kernel_inputs, run_padded

CHUNK = 16
T_STEP = 64  # sequence lengths are padded to a multiple of this: one compiled kernel per 64 tokens of length
# Launch settings: value rows per program, warps per program, and whether the key-side gradients are summed
# over value blocks with atomic adds (1) or written per block and added up afterwards (0: deterministic).
# STATETUNE_WKV_TRITON="block_v=16,num_warps=1,atomic=0" overrides them (bench/gpu_check_wkv.py
# --triton-configs sweeps them). H200, bf16 B8 T512 H32, forward + backward per layer, launched one by one
# (2026-11-29, calls I and J): block_v=16 num_warps=1 2.03-2.16 ms, with atomic=1 1.83 ms; block_v=64 num_warps=4
# 2.76 ms; block_v=16 num_warps=2 4.20 ms; fla 2.69-3.23 ms (but ~1.5 ms inside a CUDA graph, where its many
# launches cost nothing). Atomic sums make the float32 gradients' last bits depend on the order of the adds.
SETTINGS = {"block_v": 16, "num_warps": 1, "atomic": 1}
SETTINGS_ENV = "STATETUNE_WKV_TRITON"


def launch_settings() -> dict[str, int]:
    """The defaults in SETTINGS unless STATETUNE_WKV_TRITON names others."""
    return env_settings(SETTINGS, SETTINGS_ENV, "block_v=16,num_warps=1,atomic=0")


@triton.jit
def _load_step(w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, off, vec, vrow):
    """Inputs of one (row, step, head) in float32: the key-side vectors whole, v only this program's rows; w is
    the decay itself (exp of log_decay)."""
    w = tl.exp(tl.load(w_ptr + off + vec).to(tl.float32))
    k = tl.load(k_ptr + off + vec).to(tl.float32)
    v = tl.load(v_ptr + off + vrow).to(tl.float32)
    a = tl.load(a_ptr + off + vec).to(tl.float32)
    b = tl.load(b_ptr + off + vec).to(tl.float32)
    return w, k, v, a, b


@triton.jit
def _is_start(starts_ptr, row_base, t, RESETS: tl.constexpr):
    """Whether step t starts a sequence: always at t = 0, and where `starts` says so when RESETS."""
    if RESETS:
        return (t == 0) | (tl.load(starts_ptr + row_base + t) != 0)
    return t == 0


# Both kernels load step t ± 1 (inputs and restart flag) while computing step t (software prefetch: the loads do
# not depend on the state, so their latency hides behind the reductions of the current step).
@triton.jit
def _fwd(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, starts_ptr, out_ptr, sa_ptr, ckpt_ptr, final_ptr,
         T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, CHUNK_: tl.constexpr,
         RESETS: tl.constexpr):
    pid = tl.program_id(0)  # = batch row * H + head
    b_idx = pid // H
    h_idx = pid % H
    vrow = tl.program_id(1) * BV + tl.arange(0, BV)  # this program's value rows
    vec = tl.arange(0, N)
    tile = vrow[:, None] * N + vec[None, :]
    base = b_idx * T * H * N + h_idx * N
    off = base
    r = tl.load(r_ptr + off + vec).to(tl.float32)
    w, k, v, a, b = _load_step(w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, off, vec, vrow)
    S = tl.zeros((BV, N), dtype=tl.float32)
    start = _is_start(starts_ptr, b_idx * T, 0, RESETS)
    for t in range(T):
        t_n = t + 1 - (t + 1) // T  # step t + 1, or t itself at the end
        nxt = base + t_n * H * N
        r_n = tl.load(r_ptr + nxt + vec).to(tl.float32)
        w_n, k_n, v_n, a_n, b_n = _load_step(w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, nxt, vec, vrow)
        start_n = _is_start(starts_ptr, b_idx * T, t_n, RESETS)
        if start:
            S = tl.load(s0_ptr + pid * N * N + tile)
        sa = tl.sum(S * a[None, :], axis=1)
        S = S * w[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
        out = tl.sum(S * r[None, :], axis=1)
        tl.store(out_ptr + off + vrow, out.to(out_ptr.dtype.element_ty))
        tl.store(sa_ptr + off + vrow, sa)
        if (t + 1) % CHUNK_ == 0:
            tl.store(ckpt_ptr + (pid * (T // CHUNK_) + (t + 1) // CHUNK_ - 1) * N * N + tile, S)
        r, w, k, v, a, b, start = r_n, w_n, k_n, v_n, a_n, b_n, start_n
        off = nxt
    tl.store(final_ptr + pid * N * N + tile, S)


@triton.jit
def _bwd(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, starts_ptr, sa_ptr, ckpt_ptr, final_ptr, dout_ptr,
         dfinal_ptr, dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr,
         T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, CHUNK_: tl.constexpr,
         RESETS: tl.constexpr, ATOMIC: tl.constexpr):
    """dr, dw, dk, da, db are sums over value rows: with ATOMIC every program adds its part into one zeroed
    float32 `[B, T, H, N]` buffer, else it writes its own slice of `[N / BV, B, T, H, N]` (program_id(1) picks
    it). dv and ds0 are written whole (each program owns its rows)."""
    pid = tl.program_id(0)
    b_idx = pid // H
    h_idx = pid % H
    vrow = tl.program_id(1) * BV + tl.arange(0, BV)
    vec = tl.arange(0, N)
    tile = vrow[:, None] * N + vec[None, :]
    part = tl.program_id(1) * tl.num_programs(0) * T * N  # this block's slice of the partial sums (B·H·T·N each)
    S = tl.load(final_ptr + pid * N * N + tile)  # S_t for t = T - 1
    dS = tl.load(dfinal_ptr + pid * N * N + tile)
    dS0 = tl.zeros((BV, N), dtype=tl.float32)
    base = b_idx * T * H * N + h_idx * N
    off = base + (T - 1) * H * N
    r = tl.load(r_ptr + off + vec).to(tl.float32)
    w, k, v, a, b = _load_step(w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, off, vec, vrow)
    sa = tl.load(sa_ptr + off + vrow)
    dout = tl.load(dout_ptr + off + vrow).to(tl.float32)
    start = _is_start(starts_ptr, b_idx * T, T - 1, RESETS)
    for i in range(T):
        t = T - 1 - i
        t_n = t - 1 + (T - t) // T  # step t - 1, or t itself at the start
        nxt = base + t_n * H * N
        r_n = tl.load(r_ptr + nxt + vec).to(tl.float32)
        w_n, k_n, v_n, a_n, b_n = _load_step(w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, nxt, vec, vrow)
        sa_n = tl.load(sa_ptr + nxt + vrow)
        dout_n = tl.load(dout_ptr + nxt + vrow).to(tl.float32)
        start_n = _is_start(starts_ptr, b_idx * T, t_n, RESETS)
        if (t + 1) % CHUNK_ == 0:  # re-anchor on the exact state the forward pass kept
            S = tl.load(ckpt_ptr + (pid * (T // CHUNK_) + (t + 1) // CHUNK_ - 1) * N * N + tile)
        # out_t = S_t r_t
        dS += dout[:, None] * r[None, :]
        dr = tl.sum(S * dout[:, None], axis=0)
        # S_t = S_{t-1} diag(w) + sa bᵀ + v kᵀ, with sa = S_{t-1} a
        if start:
            S_prev = tl.load(s0_ptr + pid * N * N + tile)
        else:
            S_prev = (S - sa[:, None] * b[None, :] - v[:, None] * k[None, :]) / w[None, :]
        dv = tl.sum(dS * k[None, :], axis=1)
        dk = tl.sum(dS * v[:, None], axis=0)
        db = tl.sum(dS * sa[:, None], axis=0)
        dsa = tl.sum(dS * b[None, :], axis=1)
        dw = tl.sum(dS * S_prev, axis=0) * w  # d/d log_decay
        da = tl.sum(S_prev * dsa[:, None], axis=0)
        dS = dS * w[None, :] + dsa[:, None] * a[None, :]
        S = S_prev
        if start:  # dS is now the gradient of the initial state this sequence started from
            dS0 += dS
            dS = tl.zeros((BV, N), dtype=tl.float32)
            if RESETS:  # noqa: SIM102 - a compile-time branch around a run-time one
                if t > 0:  # the previous sequence's last state: recompute it from the last checkpoint
                    c0 = t - t % CHUNK_
                    S = tl.load(s0_ptr + pid * N * N + tile)
                    if c0 > 0:
                        S = tl.load(ckpt_ptr + (pid * (T // CHUNK_) + c0 // CHUNK_ - 1) * N * N + tile)
                    for j in range(CHUNK_ - 1):  # steps c0 … t − 1 (fewer than CHUNK)
                        s = c0 + j
                        if s < t:
                            if _is_start(starts_ptr, b_idx * T, s, RESETS):
                                S = tl.load(s0_ptr + pid * N * N + tile)
                            w_s, k_s, v_s, a_s, b_s = _load_step(w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, base + s * H * N,
                                                                 vec, vrow)
                            sa_s = tl.sum(S * a_s[None, :], axis=1)
                            S = S * w_s[None, :] + sa_s[:, None] * b_s[None, :] + v_s[:, None] * k_s[None, :]
        if ATOMIC:
            tl.atomic_add(dr_ptr + off + vec, dr, sem="relaxed")
            tl.atomic_add(dw_ptr + off + vec, dw, sem="relaxed")
            tl.atomic_add(dk_ptr + off + vec, dk, sem="relaxed")
            tl.atomic_add(da_ptr + off + vec, da, sem="relaxed")
            tl.atomic_add(db_ptr + off + vec, db, sem="relaxed")
        else:
            tl.store(dr_ptr + part + off + vec, dr)
            tl.store(dw_ptr + part + off + vec, dw)
            tl.store(dk_ptr + part + off + vec, dk)
            tl.store(da_ptr + part + off + vec, da)
            tl.store(db_ptr + part + off + vec, db)
        tl.store(dv_ptr + off + vrow, dv.to(dv_ptr.dtype.element_ty))
        r, w, k, v, a, b, sa, dout, start = r_n, w_n, k_n, v_n, a_n, b_n, sa_n, dout_n, start_n
        off = nxt
    tl.store(ds0_ptr + pid * N * N + tile, dS0)


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,  # type: ignore[override]
                s0: Tensor, starts: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T, H, N = r.shape
        settings = launch_settings()
        block_v, num_warps = settings["block_v"], settings["num_warps"]
        if N % block_v:
            raise ValueError(f"block_v={block_v} must divide the head size {N}")
        inputs, s0, flags = kernel_inputs(r, log_decay, k, v, a, b, s0, starts)
        out = torch.empty_like(inputs[0])
        sa = torch.empty(B, T, H, N, device=r.device, dtype=torch.float32)
        ckpt = torch.empty(B, H, T // CHUNK, N, N, device=r.device, dtype=torch.float32)
        final = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        grid = (B * H, N // block_v)
        _fwd[grid](*inputs, s0, flags, out, sa, ckpt, final, T, H, N, block_v, CHUNK, starts is not None,
                   num_warps=num_warps)
        ctx.save_for_backward(*inputs, s0, flags, sa, ckpt, final)
        ctx.launch = grid, block_v, num_warps, starts is not None, bool(settings["atomic"]) and grid[1] > 1
        return out, final

    @staticmethod
    def backward(ctx, dout: Tensor, dfinal: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        r, log_decay, k, v, a, b, s0, flags, sa, ckpt, final = ctx.saved_tensors
        grid, block_v, num_warps, resets, atomic = ctx.launch
        B, T, H, N = r.shape
        dout = dout.contiguous()
        dfinal = torch.zeros_like(final) if dfinal is None else dfinal.float().contiguous()
        # Gradients summed over value rows (float32): added up atomically, or per block of rows and then summed.
        shape = (B, T, H, N) if atomic else (grid[1], B, T, H, N)
        parts = [(torch.zeros if atomic else torch.empty)(shape, device=r.device, dtype=torch.float32)
                 for _ in range(5)]
        dv = torch.empty_like(v)
        ds0 = torch.empty_like(final)
        _bwd[grid](r, log_decay, k, v, a, b, s0, flags, sa, ckpt, final, dout, dfinal, *parts[:2], parts[2], dv,
                   *parts[3:], ds0, T, H, N, block_v, CHUNK, resets, atomic, num_warps=num_warps)
        dr, dw, dk, da, db = (p.to(x.dtype) if atomic else p.sum(0).to(x.dtype)
                              for p, x in zip(parts, (r, log_decay, k, a, b), strict=True))
        return dr, dw, dk, dv, da, db, ds0, None


def wkv7_triton(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                initial_state: Tensor, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`wkv7` without cu_seqlens through the Triton kernels: `(out [B, T, H, N]` in r's dtype`, final [B, H, N, N])`.

    `initial_state` is `[B or 1, H, N, N]`; with `starts [B, T]` (bool) every position flagged starts a new
    sequence from its row's initial state (the final state is then that of each row's last sequence).
    The kernels are compiled per sequence length, so T is padded up to a multiple of `T_STEP` with steps that
    change nothing (`rwkv7.wkv.run_padded`).
    """
    return run_padded(_WKV7.apply, T_STEP, r, log_decay, k, v, a, b, initial_state, starts)
