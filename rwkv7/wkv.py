"""The WKV-7 recurrence, in one place: a plain torch reference, the flash-linear-attention fast path, and our
own Triton kernels, which can also restart sequences mid-row (`starts`; what packed training rows need): chunked
on tensor cores (`rwkv7.wkv_chunk`, backend "chunk") and step by step (`rwkv7.wkv_triton`, backend "triton").

Boundary: tensors in, tensors out. Per head, with the state S in [value, key] orientation (rows = value dim,
columns = key dim, the BlinkDL / `rwkv` pip / RWKV-Runner convention):

    S_t = S_{t-1} (diag(exp(log_decay_t)) + a_tᵀ b_t) + v_tᵀ k_t,    out_t = S_t r_tᵀ

so for RWKV-7 the model passes a = −κ and b = κ ⊙ iclr. fla keeps its state as [key, value]; `_fla` transposes
at the boundary. The reference runs in float32 and is differentiable in every input, the initial state included.

Backend choice (one dispatch, `wkv7`): explicit `backend=` argument, else `force_backend(...)` (tests), else the
env var STATETUNE_WKV_BACKEND, else "fla" on CUDA and "reference" elsewhere. fla and Triton are imported lazily,
so this module works where they are not installed. "chunk" and "triton" run on CUDA, or on CPU in Triton's
interpreter (TRITON_INTERPRET=1, for tests); packed sequences (cu_seqlens) go through them one at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("reference", "fla", "triton", "chunk")
BACKEND_ENV = "STATETUNE_WKV_BACKEND"
# Inference calls up to this length use fla's fused recurrent kernel (decoding); longer ones the chunk kernel.
FUSED_RECURRENT_MAX_T = 64
# fla 0.6.0's chunk kernel runs 64-token chunks on tensor cores when told a lower bound of the log decay (safe
# while |bound|·33·log2(e) ≤ 124); without one it falls back to 16-token chunks, several times slower. RWKV-7's
# log decay lies in (−e^(−1/2), 0) = (−0.6065, 0); the bound sits a little below so bf16 rounding stays inside.
FLA_LOG_DECAY_BOUND = -0.61
FLA_CHUNK_ENV = "STATETUNE_FLA_CHUNK"  # "16": fla's default small chunks without the bound (for comparisons)
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("wkv_backend", default=None)


def env_settings(defaults: dict[str, int], env: str, example: str) -> dict[str, int]:
    """Integer launch settings of one of our kernels: `defaults`, overridden by `env` ("key=value,…" with keys
    from `defaults`; `example` shows the form in the error)."""
    settings = dict(defaults)
    for item in filter(None, os.environ.get(env, "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in settings or not value.strip().isdigit():
            raise ValueError(f"{env}={os.environ[env]!r}: expected e.g. {example!r}")
        settings[key.strip()] = int(value)
    return settings


def kernel_inputs(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor,
                  starts: Tensor | None) -> tuple[list[Tensor], Tensor, Tensor]:
    """What our Triton kernels read: `(r, log_decay, k, v, a, b` contiguous`, s0` float32`, restart flags` int8,
    empty without `starts`)."""
    flags = (torch.empty(0, dtype=torch.int8, device=r.device) if starts is None
             else starts.to(torch.int8).contiguous())
    return [x.contiguous() for x in (r, log_decay, k, v, a, b)], s0.float().contiguous(), flags


def run_padded(kernel: Callable[..., tuple[Tensor, Tensor]], step: int, r: Tensor, log_decay: Tensor, k: Tensor,
               v: Tensor, a: Tensor, b: Tensor, initial_state: Tensor, starts: Tensor | None
               ) -> tuple[Tensor, Tensor]:
    """Run one of our Triton kernels, `kernel(r, log_decay, k, v, a, b, state [B, H, N, N], starts)`, with T padded
    up to a multiple of `step` (they compile per length) by steps that change nothing: zero r, k, v, a, b and log
    decay 0 (decay 1) leave the state as it was, so the final state and every gradient are those of the unpadded
    sequence. Returns `(out [B, T, H, N], final [B, H, N, N])`."""
    B, T = r.shape[:2]
    pad = -T % step
    inputs = [F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x for x in (r, log_decay, k, v, a, b)]
    if starts is not None and pad:
        starts = F.pad(starts, (0, pad))
    out, final = kernel(*inputs, initial_state.expand(B, -1, -1, -1), starts)
    return (out[:, :T] if pad else out), final


class WKVBackendError(RuntimeError):
    """The requested WKV backend is unknown or cannot run here (e.g. fla without CUDA)."""


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Within the block, `wkv7` calls without an explicit `backend=` use `name` ("reference" or "fla")."""
    if name not in BACKENDS:
        raise WKVBackendError(f"unknown WKV backend {name!r}; choose one of {BACKENDS}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """Resolve the backend for tensors on `device` (see module docstring for the order of precedence)."""
    name = backend or _forced.get() or os.environ.get(BACKEND_ENV) or (
        "fla" if device.type == "cuda" else "reference")
    if name not in BACKENDS:
        raise WKVBackendError(f"unknown WKV backend {name!r} (from argument, force_backend or "
                              f"{BACKEND_ENV}); choose one of {BACKENDS}")
    if name == "fla" and device.type != "cuda":
        raise WKVBackendError(f"WKV backend 'fla' needs CUDA tensors, got device {device}")
    if name in ("triton", "chunk") and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise WKVBackendError(f"WKV backend {name!r} needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    return name


# Opaque to torch.compile: a compiled block traces up to this call and resumes after it, so fla's Triton kernels
# run as they are and the reference's loop over time is never unrolled into a graph.
@torch.compiler.disable
def wkv7(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, initial_state: Tensor, *,
         cu_seqlens: Tensor | None = None, starts: Tensor | None = None, backend: str | None = None
         ) -> tuple[Tensor, Tensor]:
    """Run WKV-7 over a batch: inputs `[B, T, H, N]`, `initial_state [S, H, N, N]` ([value, key], float32).

    Without `cu_seqlens`, S = B (or 1, broadcast). With `cu_seqlens` (LongTensor `[S+1]`, starting at 0 and
    ending at T), B must be 1 and the T tokens are S packed sequences, each starting from its own initial state.
    With `starts` (bool `[B, T]`, not with cu_seqlens) each row holds several sequences: every flagged position
    restarts from the row's initial state (shapes stay fixed whatever the data, as CUDA graphs need); the final
    state is then that of each row's last sequence. fla cannot restart mid-row: `starts` needs "reference",
    "chunk" or "triton".
    Returns `(out [B, T, H, N]` in r's dtype`, final_state [S, H, N, N]` float32`)`.
    `log_decay` = log of the per-channel decay, in (−e^(−1/2), 0) for RWKV-7; the fla path relies on
    `log_decay ≥ FLA_LOG_DECAY_BOUND`.
    """
    name = select_backend(r.device, backend)
    if starts is not None and cu_seqlens is not None:
        raise ValueError("wkv7 takes cu_seqlens or starts, not both")
    if name == "fla":
        if starts is not None:
            raise WKVBackendError("per-token restarts (starts) need the 'reference', 'chunk' or 'triton' WKV backend, "
                                  "not fla")
        return _fla(r, log_decay, k, v, a, b, initial_state, cu_seqlens)
    run = wkv7_reference if name == "reference" else _ours(name)
    if starts is not None:
        return run(r, log_decay, k, v, a, b, initial_state, starts)
    if cu_seqlens is None:
        return run(r, log_decay, k, v, a, b, initial_state)
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        out, final = run(*(x[:, start:end] for x in (r, log_decay, k, v, a, b)), initial_state[i:i + 1])
        outs.append(out)
        finals.append(final)
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)


def wkv7_reference(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                   initial_state: Tensor, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain loop over time; shapes as in `wkv7` (no cu_seqlens; `starts` restarts rows from their initial
    state). Differentiable in all inputs.

    Computes in float32 (float64 if r is float64, for gradcheck); returns out in r's dtype.
    """
    dtype = r.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    # Per-step views come from one unbind each: indexing [:, t] inside the loop would make autograd build a
    # full-size zero gradient per step (quadratic in T).
    cols = [x.to(compute).unsqueeze(-1).unbind(1) for x in (r, a, v)]  # [B, H, N, 1] per step
    rows = [x.unsqueeze(-2).unbind(1) for x in (log_decay.to(compute).exp(), b.to(compute), k.to(compute))]
    first = initial_state.to(compute)
    state = first
    restart = [None] * r.shape[1] if starts is None else starts[:, :, None, None, None].unbind(1)
    outs = []
    for r_t, a_t, v_t, decay_t, b_t, k_t, restart_t in zip(*cols, *rows, restart, strict=True):
        if restart_t is not None:
            state = torch.where(restart_t, first, state)
        # S·diag(d) scales key columns; S aᵀ b is a rank-1 update built from the [value] vector S aᵀ.
        state = state * decay_t + (state @ a_t) * b_t + v_t * k_t
        outs.append(state @ r_t)
    out = torch.cat(outs, dim=-1).permute(0, 3, 1, 2).contiguous() if outs else torch.zeros_like(v)
    return out.to(dtype), state


def _ours(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """Our Triton kernels: "chunk" (rwkv7.wkv_chunk) or "triton" (rwkv7.wkv_triton), imported when first used."""
    try:
        if name == "chunk":
            from rwkv7.wkv_chunk import wkv7_chunk
            return wkv7_chunk
        from rwkv7.wkv_triton import wkv7_triton
        return wkv7_triton
    except ImportError as e:
        raise WKVBackendError(f"WKV backend {name!r} needs the triton package: {e}") from e


def _fla(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, initial_state: Tensor,
         cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """fla 0.6.0 kernels: chunk (trainable) or fused recurrent (inference, short inputs); scale must be 1."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except ImportError as e:
        raise WKVBackendError(f"WKV backend 'fla' needs flash-linear-attention (fla-core==0.6.0): {e}") from e
    # One dtype for all six: under autocast fp32 parameters (k_a, a0, v0, …) promote k/v/a/b to fp32 while r is
    # bf16, and fla's kernels refuse mixed operands.
    inputs = [x.to(r.dtype).contiguous() for x in (r, log_decay, k, v, a, b)]
    state_kv = initial_state.float().transpose(-1, -2).contiguous()  # ours [value, key] -> fla [key, value]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*inputs, state_kv))
    if needs_grad or r.shape[1] > FUSED_RECURRENT_MAX_T:
        bound = None if os.environ.get(FLA_CHUNK_ENV) == "16" else FLA_LOG_DECAY_BOUND
        out, final_kv = chunk_rwkv7(*inputs, scale=1.0, initial_state=state_kv, output_final_state=True,
                                    cu_seqlens=cu_seqlens, lower_bound=bound)
    else:
        out, final_kv = fused_recurrent_rwkv7(*inputs, scale=1.0, initial_state=state_kv, output_final_state=True,
                                              cu_seqlens=cu_seqlens)
    return out, final_kv.float().transpose(-1, -2)
