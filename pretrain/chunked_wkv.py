"""WKV-7 in chunks, in plain torch: the reference recurrence with ~T/c + c sequential steps instead of T.

Why: fla's Triton kernels need minutes of autotuning on a cold GPU (and reject mixed bf16/fp32 inputs under
autocast), and the per-token reference loop is launch-bound (3.7 s per 32k-token step on an H200). This is the
same maths as `rwkv7.wkv.wkv7_reference`, regrouped; used by pretrain.py for full-weight training only.

Per head, with the state S in [value, key] orientation and M_t = diag(d_t) + a_tᵀ b_t:
    S_t = S_{t-1} M_t + v_tᵀ k_t,    out_t = S_t r_tᵀ.
Inside a chunk starting from S_0: S_t = S_0 P_t + Z_t with P_t = M_1⋯M_t and Z_t the state from zero; both obey
the same update, so one loop over the c positions of every chunk at once runs on X_t = [P_t; Z_t]. A second loop
over the chunks carries the state: S_0(next) = S_0 P_c + Z_c. Then out_t = S_0 (P_t r_tᵀ) + Z_t r_tᵀ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

import rwkv7.model

CHUNK = 32


def wkv7_chunked(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, initial_state: Tensor,
                 chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """Inputs `[B, T, H, N]`, `initial_state [B, H, N, N]` ([value, key]); returns (out [B, T, H, N] in r's
    dtype, final state [B, H, N, N] float32). T must be a multiple of `chunk` (else falls back to one chunk)."""
    with torch.autocast(r.device.type, enabled=False):  # the recurrence needs float32 matmuls
        return _chunked(r, log_decay, k, v, a, b, initial_state, chunk)


def _chunked(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, initial_state: Tensor,
             chunk: int) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    c = chunk if T % chunk == 0 else T
    n = T // c
    dtype = r.dtype
    r, k, v, a, b = (x.float().view(B, n, c, H, N) for x in (r, k, v, a, b))
    decay = log_decay.float().exp().view(B, n, c, H, N)
    eye = torch.eye(N, device=r.device).expand(B, n, H, N, N)
    x = torch.cat((eye, torch.zeros_like(eye)), dim=-2)  # [B, n, H, 2N, N]: rows 0..N-1 = P, N..2N-1 = Z
    zeros = torch.zeros(B, n, H, N, N, device=r.device)
    ys = []
    for t in range(c):
        vk = v[:, :, t, :, :, None] * k[:, :, t, :, None, :]  # [B, n, H, N, N]
        x = (x * decay[:, :, t, :, None, :] + (x @ a[:, :, t, :, :, None]) * b[:, :, t, :, None, :]
             + torch.cat((zeros, vk), dim=-2))
        ys.append((x @ r[:, :, t, :, :, None]).squeeze(-1))  # [B, n, H, 2N]
    y = torch.stack(ys, dim=2)  # [B, n, c, H, 2N]
    transition, zero_final = x[..., :N, :], x[..., N:, :]
    state = initial_state.float()
    starts = []
    for j in range(n):
        starts.append(state)
        state = state @ transition[:, j] + zero_final[:, j]
    start = torch.stack(starts, dim=1)  # [B, n, H, N, N]
    from_start = torch.einsum("bnhvk,bnchk->bnchv", start, y[..., :N])
    out = (from_start + y[..., N:]).reshape(B, T, H, N)
    return out.to(dtype), state


def _model_wkv(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, initial_state: Tensor, *,
               cu_seqlens: Tensor | None = None, starts: Tensor | None = None, backend: str | None = None
               ) -> tuple[Tensor, Tensor]:
    if cu_seqlens is not None or starts is not None:
        raise ValueError("wkv7_chunked does not pack sequences (cu_seqlens, starts); pad a batch instead")
    return wkv7_chunked(r, log_decay, k, v, a, b, initial_state)


@contextlib.contextmanager
def use_chunked_wkv() -> Iterator[None]:
    """Within the block, `rwkv7.model` runs its WKV through `wkv7_chunked` (the function it calls is swapped
    and restored on exit; nothing else changes)."""
    original = rwkv7.model.wkv7
    rwkv7.model.wkv7 = _model_wkv
    try:
        yield
    finally:
        rwkv7.model.wkv7 = original
