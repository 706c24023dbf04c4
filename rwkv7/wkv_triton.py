"""WKV-7 as two Triton kernels (forward, backward) with a gradient for the initial state.

Boundary: the equal-length path of `rwkv7.wkv.wkv7` (inputs `[B, T, H, N]`, initial state `[B, H, N, N]` in our
[value, key] orientation); no packing. One program per (batch row, head) keeps the whole `N × N` state in
registers (float32) and walks the sequence; the recurrence is the reference's:

    S_t = S_{t-1} · diag(w_t) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ,    out_t = S_t r_t,    w_t = exp(log_decay_t)

Backward walks back in time without storing every state: S_{t-1} = (S_t − (S_{t-1} a_t) b_tᵀ − v_t k_tᵀ) / w_t,
where the forward pass kept the vector S_{t-1} a_t of every step, and the state itself every `CHUNK` steps to
re-anchor the walk (RWKV-7's decay w lies in (0.545, 1), so dividing by it over CHUNK steps amplifies float32
rounding by at most 1.84^CHUNK). Memory kept for backward: `sa` (float32, the size of v) and the
checkpoints (`T / CHUNK` states per row and head).

Status: checked against `wkv7_reference` (outputs, final state, every input gradient and d(initial state)) in
Triton's interpreter on CPU (tests/rwkv7/test_wkv_triton.py); selected with `STATETUNE_WKV_BACKEND=triton`. The
default CUDA backend stays fla until this one is measured on the GPU (`bench/gpu_check_wkv.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 16
T_STEP = 64  # sequence lengths are padded to a multiple of this: one compiled kernel per 64 tokens of length


@triton.jit
def _load_step(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, off, vec):
    """The six input vectors of one (row, step, head) in float32; w is the decay itself (exp of log_decay)."""
    r = tl.load(r_ptr + off + vec).to(tl.float32)
    w = tl.exp(tl.load(w_ptr + off + vec).to(tl.float32))
    k = tl.load(k_ptr + off + vec).to(tl.float32)
    v = tl.load(v_ptr + off + vec).to(tl.float32)
    a = tl.load(a_ptr + off + vec).to(tl.float32)
    b = tl.load(b_ptr + off + vec).to(tl.float32)
    return r, w, k, v, a, b


# Both kernels load step t ± 1 while computing step t (software prefetch: the loads do not depend on the state,
# so their latency hides behind the reductions of the current step).
@triton.jit
def _fwd(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, out_ptr, sa_ptr, ckpt_ptr, final_ptr,
         T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, CHUNK_: tl.constexpr):
    pid = tl.program_id(0)  # = b * H + h
    b_idx = pid // H
    h_idx = pid % H
    rows = tl.arange(0, N)[:, None]  # value index i
    cols = tl.arange(0, N)[None, :]  # key index j
    vec = tl.arange(0, N)
    S = tl.load(s0_ptr + pid * N * N + rows * N + cols)
    base = b_idx * T * H * N + h_idx * N
    off = base
    r, w, k, v, a, b = _load_step(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, off, vec)
    for t in range(T):
        nxt = base + (t + 1 - (t + 1) // T) * H * N  # step t + 1, or t itself at the end
        r_n, w_n, k_n, v_n, a_n, b_n = _load_step(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, nxt, vec)
        sa = tl.sum(S * a[None, :], axis=1)
        S = S * w[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
        out = tl.sum(S * r[None, :], axis=1)
        tl.store(out_ptr + off + vec, out.to(out_ptr.dtype.element_ty))
        tl.store(sa_ptr + off + vec, sa)
        if (t + 1) % CHUNK_ == 0:
            tl.store(ckpt_ptr + (pid * (T // CHUNK_) + (t + 1) // CHUNK_ - 1) * N * N + rows * N + cols, S)
        r, w, k, v, a, b = r_n, w_n, k_n, v_n, a_n, b_n
        off = nxt
    tl.store(final_ptr + pid * N * N + rows * N + cols, S)


@triton.jit
def _bwd(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, sa_ptr, ckpt_ptr, final_ptr, dout_ptr, dfinal_ptr,
         dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr,
         T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, CHUNK_: tl.constexpr):
    pid = tl.program_id(0)
    b_idx = pid // H
    h_idx = pid % H
    rows = tl.arange(0, N)[:, None]
    cols = tl.arange(0, N)[None, :]
    vec = tl.arange(0, N)
    S = tl.load(final_ptr + pid * N * N + rows * N + cols)  # S_t for t = T - 1
    dS = tl.load(dfinal_ptr + pid * N * N + rows * N + cols)
    base = b_idx * T * H * N + h_idx * N
    off = base + (T - 1) * H * N
    r, w, k, v, a, b = _load_step(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, off, vec)
    sa = tl.load(sa_ptr + off + vec)
    dout = tl.load(dout_ptr + off + vec).to(tl.float32)
    for i in range(T):
        t = T - 1 - i
        nxt = base + (t - 1 + (T - t) // T) * H * N  # step t - 1, or t itself at the start
        r_n, w_n, k_n, v_n, a_n, b_n = _load_step(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, nxt, vec)
        sa_n = tl.load(sa_ptr + nxt + vec)
        dout_n = tl.load(dout_ptr + nxt + vec).to(tl.float32)
        if (t + 1) % CHUNK_ == 0:  # re-anchor on the exact state the forward pass kept
            S = tl.load(ckpt_ptr + (pid * (T // CHUNK_) + (t + 1) // CHUNK_ - 1) * N * N + rows * N + cols)
        # out_t = S_t r_t
        dS += dout[:, None] * r[None, :]
        dr = tl.sum(S * dout[:, None], axis=0)
        # S_t = S_{t-1} diag(w) + sa bᵀ + v kᵀ, with sa = S_{t-1} a
        S_prev = (S - sa[:, None] * b[None, :] - v[:, None] * k[None, :]) / w[None, :]
        dv = tl.sum(dS * k[None, :], axis=1)
        dk = tl.sum(dS * v[:, None], axis=0)
        db = tl.sum(dS * sa[:, None], axis=0)
        dsa = tl.sum(dS * b[None, :], axis=1)
        dw = tl.sum(dS * S_prev, axis=0) * w  # d/d log_decay
        da = tl.sum(S_prev * dsa[:, None], axis=0)
        dS = dS * w[None, :] + dsa[:, None] * a[None, :]
        S = S_prev
        tl.store(dr_ptr + off + vec, dr.to(dr_ptr.dtype.element_ty))
        tl.store(dw_ptr + off + vec, dw.to(dw_ptr.dtype.element_ty))
        tl.store(dk_ptr + off + vec, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dv_ptr + off + vec, dv.to(dv_ptr.dtype.element_ty))
        tl.store(da_ptr + off + vec, da.to(da_ptr.dtype.element_ty))
        tl.store(db_ptr + off + vec, db.to(db_ptr.dtype.element_ty))
        r, w, k, v, a, b, sa, dout = r_n, w_n, k_n, v_n, a_n, b_n, sa_n, dout_n
        off = nxt
    tl.store(ds0_ptr + pid * N * N + rows * N + cols, dS)


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,  # type: ignore[override]
                s0: Tensor) -> tuple[Tensor, Tensor]:
        B, T, H, N = r.shape
        inputs = [x.contiguous() for x in (r, log_decay, k, v, a, b)]
        s0 = s0.float().contiguous()
        out = torch.empty_like(inputs[0])
        sa = torch.empty(B, T, H, N, device=r.device, dtype=torch.float32)
        ckpt = torch.empty(B, H, T // CHUNK, N, N, device=r.device, dtype=torch.float32)
        final = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        _fwd[(B * H,)](*inputs, s0, out, sa, ckpt, final, T, H, N, CHUNK)
        ctx.save_for_backward(*inputs, sa, ckpt, final)
        return out, final

    @staticmethod
    def backward(ctx, dout: Tensor, dfinal: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        r, log_decay, k, v, a, b, sa, ckpt, final = ctx.saved_tensors
        B, T, H, N = r.shape
        dout = dout.contiguous()
        dfinal = torch.zeros_like(final) if dfinal is None else dfinal.float().contiguous()
        grads = [torch.empty_like(x) for x in (r, log_decay, k, v, a, b)]
        ds0 = torch.empty_like(final)
        _bwd[(B * H,)](r, log_decay, k, v, a, b, sa, ckpt, final, dout, dfinal, *grads, ds0, T, H, N, CHUNK)
        return (*grads, ds0)


def wkv7_triton(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """`wkv7` without packing through the Triton kernels: `(out [B, T, H, N]` in r's dtype`, final [B, H, N, N])`.

    The kernels are compiled per sequence length, so T is padded up to a multiple of `T_STEP` with steps that
    change nothing: zero r, k, v, a, b and log decay 0 (decay 1) leave the state as it was, so the final state
    and every gradient are those of the unpadded sequence.
    """
    B, T = r.shape[:2]
    pad = -T % T_STEP
    inputs = [F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x for x in (r, log_decay, k, v, a, b)]
    out, final = _WKV7.apply(*inputs, initial_state.expand(B, -1, -1, -1))
    return (out[:, :T] if pad else out), final
