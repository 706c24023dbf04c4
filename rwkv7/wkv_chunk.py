"""WKV-7 in chunks on tensor cores (Triton): forward and backward, a gradient for the initial state, and per-token
restarts for packed rows.

Boundary: the same as `rwkv7.wkv_triton.wkv7_triton` (inputs `[B, T, H, N]`, initial state `[B, H, N, N]` in our
[value, key] orientation, optional `starts [B, T]`). The recurrence, per head (rows of S = value dim):

    S_t = S_{t-1} (diag(w_t) + a_tᵀ b_t) + v_tᵀ k_t,    o_t = S_t r_tᵀ,    w_t = exp(λ_t)

Within a chunk of L steps that starts from S₀, with c_t = Σ_{s≤t} λ_s (and c⁻_t = c_t − λ_t) and u_t = S_{t-1} a_tᵀ:

    S_t = S₀ diag(e^{c_t}) + Σ_{s≤t} (u_s b_s + v_sᵀ k_s) diag(e^{c_t − c_s})

so with R' = r⊙e^{c}, A' = a⊙e^{c⁻}, B̂ = b⊙e^{−c}, K̂ = k⊙e^{−c} (rows t of [L, N] tiles):

    U = (I − M_ab)⁻¹ (A' S₀ᵀ + M_ak V),    M_ab = A'B̂ᵀ, M_ak = A'K̂ᵀ masked to s < t
    O = R' S₀ᵀ + M_rb U + M_rk V,           M_rb = R'B̂ᵀ, M_rk = R'K̂ᵀ masked to s ≤ t
    S_L = S₀ diag(e^{c_L}) + Uᵀ B̄ + Vᵀ K̄,  B̄ = b⊙e^{c_L − c}, K̄ = k⊙e^{c_L − c}

Every product is a small matrix product (tensor cores); the (I − M_ab)⁻¹ of a strictly lower triangular M_ab is
(I + M)(I + M²)(I + M⁴)…, log₂ L products. Dividing by e^{c} is safe: RWKV-7's λ lies in (−0.61, 0], so over a
chunk e^{−c} stays below e^{0.61·L} (1.7·10⁴ for L = 16), far inside float32 range, and each factor carries
only its own relative rounding.

Restarts (`starts`): a flagged position begins a new sequence from the row's initial state. Inside a chunk the
rows then fall into segments; c becomes a cumulative sum within each segment (a masked [L, L] product with λ),
the M matrices keep only pairs of one segment, the first segment enters from the carried state and later ones
from the initial state. The same code serves chunks without restarts (one segment).

One program per (batch row, head) walks the chunks in order and keeps S in float32 registers; it stores the
state at every chunk start for the backward pass, which walks the chunks in reverse, recomputes each chunk's
matrices from its stored state, and carries dS. Memory kept for backward: `T / L` states per row and head.
Products run in float32 ("ieee") for float32 inputs and in TF32 on tensor cores otherwise; the cumulative sums
and the inverse always in float32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

T_STEP = 64  # sequence lengths are padded to a multiple of this (one compiled kernel per 64 tokens of length)
# Launch settings: chunk length and warps per program for each kernel. STATETUNE_WKV_CHUNK="chunk=32,fwd_warps=4"
# overrides them (bench/gpu_check_wkv.py --chunk-configs sweeps them).
SETTINGS = {"chunk": 16, "block_v": 32, "fwd_warps": 4, "state_warps": 4, "grad_warps": 8}
SETTINGS_ENV = "STATETUNE_WKV_CHUNK"


def launch_settings() -> dict[str, int]:
    """The defaults in SETTINGS unless STATETUNE_WKV_CHUNK names others."""
    settings = dict(SETTINGS)
    for item in filter(None, os.environ.get(SETTINGS_ENV, "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in settings or not value.strip().isdigit():
            raise ValueError(f"{SETTINGS_ENV}={os.environ[SETTINGS_ENV]!r}: expected e.g. 'chunk=32,fwd_warps=4'")
        settings[key.strip()] = int(value)
    if settings["chunk"] not in (16, 32, 64):
        raise ValueError(f"{SETTINGS_ENV}: chunk must be 16, 32 or 64, got {settings['chunk']}")
    return settings


@triton.jit
def _segments(starts_ptr, row_base, rows, RESETS: tl.constexpr):
    """Per row of the chunk, how many restarts lie at or before it (0 everywhere without RESETS)."""
    if RESETS:
        return tl.cumsum(tl.load(starts_ptr + row_base + rows).to(tl.int32), axis=0)
    return rows * 0


@triton.jit
def _unit_lower_inverse(m, rows, LOG2L: tl.constexpr):
    """(I − m)⁻¹ for a strictly lower triangular [L, L] m: (I + m)(I + m²)(I + m⁴)…(I + m^(L/2))."""
    inv = (rows[:, None] == rows[None, :]).to(tl.float32) + m
    power = m
    for _ in tl.static_range(LOG2L - 1):
        power = tl.dot(power, power, input_precision="ieee")
        inv += tl.dot(inv, power, input_precision="ieee")
    return inv


@triton.jit
def _chunk_terms(r, lw, k, a, b, seg, rows, L: tl.constexpr, LOG2L: tl.constexpr, PREC: tl.constexpr):
    """Everything of one chunk that does not depend on the state (see the module docstring)."""
    same = seg[:, None] == seg[None, :]
    incl = ((rows[:, None] >= rows[None, :]) & same).to(tl.float32)
    strict = ((rows[:, None] > rows[None, :]) & same).to(tl.float32)
    c = tl.dot(incl, lw, input_precision="ieee")  # cumulative log decay within each segment
    cex = c - lw
    last = seg == tl.max(seg, axis=0)  # rows of the chunk's last segment
    c_end = tl.sum(tl.where((rows == L - 1)[:, None], c, 0.0), axis=0)
    rp = r * tl.exp(c)
    ap = a * tl.exp(cex)
    grow = tl.exp(-c)
    bh = b * grow
    kh = k * grow
    tail = tl.where(last[:, None], tl.exp(c_end[None, :] - c), 0.0)
    m_ab = tl.dot(ap, tl.trans(bh), input_precision=PREC) * strict
    m_ak = tl.dot(ap, tl.trans(kh), input_precision=PREC) * strict
    m_rb = tl.dot(rp, tl.trans(bh), input_precision=PREC) * incl
    m_rk = tl.dot(rp, tl.trans(kh), input_precision=PREC) * incl
    inv = _unit_lower_inverse(m_ab, rows, LOG2L)
    return incl, strict, c, cex, c_end, rp, ap, grow, bh, kh, tail, m_ab, m_ak, m_rb, m_rk, inv


@triton.jit
def _load_keys(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, offs):
    """The key-side [L, N] tiles of one chunk in float32: r, log decay, k, a, b."""
    return (tl.load(r_ptr + offs).to(tl.float32), tl.load(w_ptr + offs).to(tl.float32),
            tl.load(k_ptr + offs).to(tl.float32), tl.load(a_ptr + offs).to(tl.float32),
            tl.load(b_ptr + offs).to(tl.float32))


@triton.jit
def _fwd(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, starts_ptr, out_ptr, ckpt_ptr, final_ptr,
         T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, L: tl.constexpr,
         LOG2L: tl.constexpr, RESETS: tl.constexpr, PREC: tl.constexpr):
    """Grid (B·H, N / BV): each program carries BV value rows of S through the chunks (value rows evolve on their
    own), writes its columns of the output and the state at every chunk start (`ckpt`)."""
    pid = tl.program_id(0)  # = batch row * H + head
    b_idx = pid // H
    h_idx = pid % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    vcols = tl.program_id(1) * BV + tl.arange(0, BV)
    tile = vcols[:, None] * N + cols[None, :]
    NC: tl.constexpr = T // L
    first = tl.load(s0_ptr + pid * N * N + tile)
    S = first
    for ci in range(NC):
        tl.store(ckpt_ptr + (pid * NC + ci) * N * N + tile, S)
        row_offs = (b_idx * T + ci * L + rows)[:, None] * (H * N) + h_idx * N
        r, lw, k, a, b = _load_keys(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, row_offs + cols[None, :])
        v = tl.load(v_ptr + row_offs + vcols[None, :]).to(tl.float32)
        seg = _segments(starts_ptr, b_idx * T + ci * L, rows, RESETS)
        (incl, strict, c, cex, c_end, rp, ap, grow, bh, kh, tail, m_ab, m_ak, m_rb, m_rk,
         inv) = _chunk_terms(r, lw, k, a, b, seg, rows, L, LOG2L, PREC)
        cont = (seg == 0)[:, None]  # rows that continue from the carried state
        y = tl.dot(tl.where(cont, ap, 0.0), tl.trans(S), input_precision=PREC)
        o = tl.dot(tl.where(cont, rp, 0.0), tl.trans(S), input_precision=PREC)
        enter = S
        if RESETS:
            if tl.max(seg, axis=0) > 0:  # a restart in this chunk: later segments start from the initial state
                y += tl.dot(tl.where(cont, 0.0, ap), tl.trans(first), input_precision=PREC)
                o += tl.dot(tl.where(cont, 0.0, rp), tl.trans(first), input_precision=PREC)
                enter = first
        y += tl.dot(m_ak, v, input_precision=PREC)
        u = tl.dot(inv, y, input_precision=PREC)
        o += tl.dot(m_rb, u, input_precision=PREC) + tl.dot(m_rk, v, input_precision=PREC)
        tl.store(out_ptr + row_offs + vcols[None, :], o.to(out_ptr.dtype.element_ty))
        S = (enter * tl.exp(c_end)[None, :] + tl.dot(tl.trans(u), b * tail, input_precision=PREC)
             + tl.dot(tl.trans(v), k * tail, input_precision=PREC))
    tl.store(final_ptr + pid * N * N + tile, S)


@triton.jit
def _bwd_state(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, starts_ptr, dout_ptr, dfinal_ptr, dsend_ptr, ds0_ptr,
               T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, L: tl.constexpr,
               LOG2L: tl.constexpr, RESETS: tl.constexpr, PREC: tl.constexpr):
    """Backward, pass 1 (grid as `_fwd`): walks the chunks in reverse carrying dS (BV value rows; they need
    neither the state nor u), stores dS at every chunk end (`dsend`) and d(initial state)."""
    pid = tl.program_id(0)
    b_idx = pid // H
    h_idx = pid % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    vcols = tl.program_id(1) * BV + tl.arange(0, BV)
    tile = vcols[:, None] * N + cols[None, :]
    NC: tl.constexpr = T // L
    dS = tl.load(dfinal_ptr + pid * N * N + tile)  # gradient of the state at the current chunk's end
    dfirst = tl.zeros((BV, N), dtype=tl.float32)  # gradient of the initial state through restarts
    for i in range(NC):
        ci = NC - 1 - i
        tl.store(dsend_ptr + (pid * NC + ci) * N * N + tile, dS)
        row_offs = (b_idx * T + ci * L + rows)[:, None] * (H * N) + h_idx * N
        r, lw, k, a, b = _load_keys(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, row_offs + cols[None, :])
        do = tl.load(dout_ptr + row_offs + vcols[None, :]).to(tl.float32)
        seg = _segments(starts_ptr, b_idx * T + ci * L, rows, RESETS)
        (incl, strict, c, cex, c_end, rp, ap, grow, bh, kh, tail, m_ab, m_ak, m_rb, m_rk,
         inv) = _chunk_terms(r, lw, k, a, b, seg, rows, L, LOG2L, PREC)
        cont = (seg == 0)[:, None]
        du = (tl.dot(tl.trans(m_rb), do, input_precision=PREC)
              + tl.dot(b * tail, tl.trans(dS), input_precision=PREC))
        dy = tl.dot(tl.trans(inv), du, input_precision=PREC)
        dS_prev = (tl.dot(tl.trans(tl.where(cont, do, 0.0)), rp, input_precision=PREC)
                   + tl.dot(tl.trans(tl.where(cont, dy, 0.0)), ap, input_precision=PREC))
        carried = dS * tl.exp(c_end)[None, :]
        restarted = False
        if RESETS:
            if tl.max(seg, axis=0) > 0:  # later segments (and the chunk's end) came from the initial state
                dfirst += (tl.dot(tl.trans(tl.where(cont, 0.0, do)), rp, input_precision=PREC)
                           + tl.dot(tl.trans(tl.where(cont, 0.0, dy)), ap, input_precision=PREC) + carried)
                restarted = True
        if not restarted:
            dS_prev += carried
        dS = dS_prev
    tl.store(ds0_ptr + pid * N * N + tile, dS + dfirst)


@triton.jit
def _bwd_grads(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, starts_ptr, ckpt_ptr, dout_ptr, dsend_ptr,
               dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,
               T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr,
               RESETS: tl.constexpr, PREC: tl.constexpr):
    """Backward, pass 2 (grid B·H·T/L, every chunk at once): from the state at the chunk's start and dS at its
    end, the gradients of r, log decay, k, v, a, b within the chunk."""
    NC: tl.constexpr = T // L
    pid = tl.program_id(0) // NC  # = batch row * H + head
    ci = tl.program_id(0) % NC
    b_idx = pid // H
    h_idx = pid % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    tile = cols[:, None] * N + cols[None, :]
    S = tl.load(ckpt_ptr + (pid * NC + ci) * N * N + tile)
    dS = tl.load(dsend_ptr + (pid * NC + ci) * N * N + tile)
    offs = (b_idx * T + ci * L + rows)[:, None] * (H * N) + h_idx * N + cols[None, :]
    r, lw, k, a, b = _load_keys(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, offs)
    v = tl.load(v_ptr + offs).to(tl.float32)
    do = tl.load(dout_ptr + offs).to(tl.float32)
    seg = _segments(starts_ptr, b_idx * T + ci * L, rows, RESETS)
    (incl, strict, c, cex, c_end, rp, ap, grow, bh, kh, tail, m_ab, m_ak, m_rb, m_rk,
     inv) = _chunk_terms(r, lw, k, a, b, seg, rows, L, LOG2L, PREC)
    cont = (seg == 0)[:, None]
    bbar = b * tail
    kbar = k * tail
    # the forward's u again
    y = tl.dot(tl.where(cont, ap, 0.0), tl.trans(S), input_precision=PREC)
    do_c = tl.where(cont, do, 0.0)
    enter = S
    first = S
    if RESETS:
        if tl.max(seg, axis=0) > 0:
            first = tl.load(s0_ptr + pid * N * N + tile)
            y += tl.dot(tl.where(cont, 0.0, ap), tl.trans(first), input_precision=PREC)
            enter = first
    y += tl.dot(m_ak, v, input_precision=PREC)
    u = tl.dot(inv, y, input_precision=PREC)
    # S_L = enter·diag(e^{c_L}) + uᵀ B̄ + vᵀ K̄ and o = R' Sᵀ + M_rb u + M_rk v
    du = tl.dot(tl.trans(m_rb), do, input_precision=PREC) + tl.dot(bbar, tl.trans(dS), input_precision=PREC)
    dy = tl.dot(tl.trans(inv), du, input_precision=PREC)  # u = (I − M_ab)⁻¹ y
    dm_ab = tl.dot(dy, tl.trans(u), input_precision=PREC) * strict
    dm_ak = tl.dot(dy, tl.trans(v), input_precision=PREC) * strict
    dm_rb = tl.dot(do, tl.trans(u), input_precision=PREC) * incl
    dm_rk = tl.dot(do, tl.trans(v), input_precision=PREC) * incl
    dv = (tl.dot(tl.trans(m_ak), dy, input_precision=PREC) + tl.dot(tl.trans(m_rk), do, input_precision=PREC)
          + tl.dot(kbar, tl.trans(dS), input_precision=PREC))
    drp = (tl.dot(do_c, S, input_precision=PREC) + tl.dot(dm_rb, bh, input_precision=PREC)
           + tl.dot(dm_rk, kh, input_precision=PREC))
    dap = (tl.dot(tl.where(cont, dy, 0.0), S, input_precision=PREC) + tl.dot(dm_ab, bh, input_precision=PREC)
           + tl.dot(dm_ak, kh, input_precision=PREC))
    if RESETS:
        if tl.max(seg, axis=0) > 0:
            drp += tl.dot(tl.where(cont, 0.0, do), first, input_precision=PREC)
            dap += tl.dot(tl.where(cont, 0.0, dy), first, input_precision=PREC)
    dbh = tl.dot(tl.trans(dm_ab), ap, input_precision=PREC) + tl.dot(tl.trans(dm_rb), rp, input_precision=PREC)
    dkh = tl.dot(tl.trans(dm_ak), ap, input_precision=PREC) + tl.dot(tl.trans(dm_rk), rp, input_precision=PREC)
    dbbar = tl.dot(u, dS, input_precision=PREC)
    dkbar = tl.dot(v, dS, input_precision=PREC)
    dc_end = tl.sum(dS * enter, axis=0) * tl.exp(c_end) + tl.sum(dbbar * bbar + dkbar * kbar, axis=0)
    dc = (drp * rp - dbh * bh - dkh * kh - dbbar * bbar - dkbar * kbar
          + tl.where((rows == L - 1)[:, None], dc_end[None, :], 0.0))
    dlw = tl.dot(tl.trans(incl), dc, input_precision="ieee") + tl.dot(tl.trans(strict), dap * ap, input_precision="ieee")
    tl.store(dr_ptr + offs, (drp * tl.exp(c)).to(dr_ptr.dtype.element_ty))
    tl.store(dw_ptr + offs, dlw.to(dw_ptr.dtype.element_ty))
    tl.store(dk_ptr + offs, (dkh * grow + dkbar * tail).to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty))
    tl.store(da_ptr + offs, (dap * tl.exp(cex)).to(da_ptr.dtype.element_ty))
    tl.store(db_ptr + offs, (dbh * grow + dbbar * tail).to(db_ptr.dtype.element_ty))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _ChunkWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,  # type: ignore[override]
                s0: Tensor, starts: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T, H, N = r.shape
        settings = launch_settings()
        L, block_v = settings["chunk"], settings["block_v"]
        if N % block_v:
            raise ValueError(f"block_v={block_v} must divide the head size {N}")
        inputs = [x.contiguous() for x in (r, log_decay, k, v, a, b)]
        s0 = s0.float().contiguous()
        flags = (torch.empty(0, dtype=torch.int8, device=r.device) if starts is None
                 else starts.to(torch.int8).contiguous())
        out = torch.empty_like(inputs[0])
        ckpt = torch.empty(B, H, T // L, N, N, device=r.device, dtype=torch.float32)
        final = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        log2l = L.bit_length() - 1
        grid = (B * H, N // block_v)
        _fwd[grid](*inputs, s0, flags, out, ckpt, final, T, H, N, block_v, L, log2l, starts is not None,
                   _precision(r.dtype), num_warps=settings["fwd_warps"])
        ctx.save_for_backward(*inputs, s0, flags, ckpt)
        ctx.launch = grid, L, log2l, starts is not None, settings
        return out, final

    @staticmethod
    def backward(ctx, dout: Tensor, dfinal: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        r, log_decay, k, v, a, b, s0, flags, ckpt = ctx.saved_tensors
        grid, L, log2l, resets, settings = ctx.launch
        B, T, H, N = r.shape
        prec = _precision(r.dtype)
        dout = dout.contiguous()
        dfinal = (torch.zeros(B, H, N, N, device=r.device, dtype=torch.float32) if dfinal is None
                  else dfinal.float().contiguous())
        dsend = torch.empty_like(ckpt)
        ds0 = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        _bwd_state[grid](r, log_decay, k, a, b, flags, dout, dfinal, dsend, ds0, T, H, N, N // grid[1],
                         L, log2l, resets, prec, num_warps=settings["state_warps"])
        grads = [torch.empty_like(x) for x in (r, log_decay, k, v, a, b)]
        _bwd_grads[(B * H * (T // L),)](r, log_decay, k, v, a, b, s0, flags, ckpt, dout, dsend, *grads,
                                        T, H, N, L, log2l, resets, prec, num_warps=settings["grad_warps"])
        return (*grads, ds0, None)


def wkv7_chunk(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
               initial_state: Tensor, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`wkv7` without cu_seqlens through the chunked kernels: `(out [B, T, H, N]` in r's dtype`, final [B, H, N, N])`.

    Shapes and `starts` as in `rwkv7.wkv_triton.wkv7_triton`; T is padded up to a multiple of `T_STEP` with steps
    that change nothing (zero r, k, v, a, b and log decay 0), so the final state and every gradient are those
    of the unpadded sequence.
    """
    B, T = r.shape[:2]
    pad = -T % T_STEP
    inputs = [F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x for x in (r, log_decay, k, v, a, b)]
    if starts is not None and pad:
        starts = F.pad(starts, (0, pad))
    out, final = _ChunkWKV7.apply(*inputs, initial_state.expand(B, -1, -1, -1), starts)
    return (out[:, :T] if pad else out), final
