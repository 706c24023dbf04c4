"""WKV-7 in chunks on tensor cores (Triton): forward and backward, a gradient for the initial state, and per-token
restarts for packed rows.

Boundary: the same as `rwkv7.wkv_triton.wkv7_triton` (inputs `[B, T, H, N]`, initial state `[B, H, N, N]` in our
[value, key] orientation, optional `starts [B, T]`). The recurrence, per head (rows of S = value dim):

    S_t = S_{t-1} (diag(w_t) + a_tᵀ b_t) + v_tᵀ k_t,    o_t = S_t r_tᵀ,    w_t = exp(λ_t)

Within a chunk of L steps that starts from S₀, with c_t = Σ_{s≤t} λ_s (and c⁻_t = c_t − λ_t) and
u_t = S_{t-1} a_tᵀ:

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
from the initial state. The same code serves chunks without restarts (one segment); the initial-state terms are
computed only in chunks that restart. That is the `seq_chunks=0` path. By default (`seq_chunks=1`) packed rows
avoid it: their chunks start at every sequence's start (`chunk_table`, built on the device once per step), so a
restart only ever falls on a chunk's first position. A sequence's last chunk is then shorter, and its rows past the
end become steps that change nothing (decay 1, no k, v or b). Such a row needs up to T / L + (its number of
sequences) chunks instead of T / L, but no chunk pays for segments.

One program per (batch row, head) walks the chunks in order and keeps S in float32 registers; it stores the
state at every chunk start for the backward pass, which walks the chunks in reverse, recomputes each chunk's
matrices from its stored state, and carries dS. Memory kept for backward: `T / L` states per row and head (T / L + 2
under seq_chunks: chunks that start a sequence share one, the initial state; `chunk_table`).
Products run in float32 ("ieee") for float32 inputs and with bfloat16 operands (or TF32: `bf16_dots=0`) on tensor
cores otherwise, accumulating in float32; the cumulative sums and the inverse always in float32. The chunk-start
states are kept in bfloat16 for bf16 inputs (`bf16_states`), in float32 otherwise.

Status: checked against `wkv7_reference` in Triton's interpreter (tests/rwkv7/test_wkv_triton.py) and on an
H200 (`bench/gpu_check_wkv.py --backend chunk`: fp32 ≤ 5.8e-7, bf16 ≤ 6.6e-3 relative on outputs, final state and
every gradient incl. d(initial state), with and without restarts; both restart paths by the GPU tests in fp32
and bf16). The default training kernel (`TrainParams.wkv_kernel`): 1.07 ms per layer forward + backward alone
(fla: 2.7–3.2 ms), 15.6 ms of a 1.5B training step inside a CUDA graph (16.9 ms with packed rows; fla: ~35 ms);
BENCHMARKS.md, fifth, eleventh and twelfth sessions.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor

from rwkv7.wkv import env_settings, kernel_inputs, run_padded

T_STEP = 64  # sequence lengths are padded to a multiple of this (one compiled kernel per 64 tokens of length)
# Launch settings: chunk length and warps per program of each kernel. STATETUNE_WKV_CHUNK="chunk=32,fwd_warps=4"
# overrides them (bench/gpu_check_wkv.py --configs sweeps them). H200, bf16 B8 T512 H32, forward + backward per
# layer, launched one by one (2026-11-29, calls M, O, P): chunk 16 with 4 / 8 warps 1.37-1.65 ms (fla: 2.7-3.2 ms),
# 2 / 8 warps 1.57 ms, 4 / 4 1.87 ms, 4 / 16 3.10 ms; chunks of 32 and 64 need more shared memory than an H200 has
# (241-295 KB). A version that split value rows over programs and computed the gradients of all chunks at once was
# slower (1.79-2.99 ms; call N): the per-chunk terms that do not depend on the state dominate, and it computed
# them two or three times.
# fwd_stages / bwd_stages: Triton's software pipelining of each kernel's chunk loop (num_stages: its loads of the
# next chunks go through shared memory ahead of use; 1 turns it off). 3, Triton's default, is the fastest in the
# graphed 1.5B step: bwd_stages 1 / 2 were 2.5 / 1.1 % slower (call AK, tenth session).
# bf16_dots (bf16 inputs only; float32 inputs multiply in IEEE float32, float16 ones in TF32): operands rounded to
# bfloat16 instead of TF32. The kernels are bound by moving tiles into the tensor cores' layout (through shared
# memory) and by register spills, not by the products' arithmetic: bfloat16 halves both (backward's chunk loop on 8
# warps: 2520 -> 1494 instructions, 96 -> 0 bytes of spills; bench/kernel_regs.py). Errors against the
# float32 reference stay at the level of bf16 rounding of the inputs and outputs (gpu_check_wkv, bf16: <= 6.6e-3
# relative, against <= 5.3e-3 with TF32; the final state 1.8e-3 instead of 5e-4); a 1.5B model's loss after 30 steps
# moved by +0.04 %.
# bf16_states (bf16 inputs only): the chunk-start states kept for backward in bfloat16 (half the bytes; backward's
# products round them to bfloat16 anyway under bf16_dots). H200, the graphed 1.5B (a) step (eleventh session, calls
# AQ, AR): WKV forward 8.9 -> 8.0 -> 6.7 ms, backward 16.2 -> 11.0 -> 10.6 ms; with both, backward on 4 warps (two
# programs per SM, all 256 resident at once) instead of 8: 8.8 ms; step 78.1 -> 67.5 ms. Splitting the backward into
# a sequential kernel for the chain of state gradients and a parallel one per chunk for the input gradients was
# slower (1.69 against 1.52 ms alone, 0.17 + 0.57 ms in the step against 0.74: call AO): the per-chunk work is the
# cost. bwd_warps_restarts: with seq_chunks=0, the backward of rows with restarts (packed rows) stays on 8 warps,
# where its larger body spills less (460 against 1576 bytes): 14.7 against 15.2 ms per 1.5B (c) step (calls AR, AS).
# seq_chunks (packed rows; the module docstring): H200, graphed 1.5B (c) step with 18 FFNs kept (twelfth session):
# WKV forward 8.0 -> 7.4 ms and backward 14.8 -> 9.4 ms; (c) 56.65 k -> 60.96 / 60.70 / 61.29 / 61.56 k tokens/s,
# against (a) 60.75 / 60.69 / 61.31 / 61.62 k in the same calls (AT, AV, AW, AX). Its backward adds each
# sequence's d(initial state) atomically: holding it in a tile of registers spilled, and a branch around a
# read-modify-write kept Triton from loading the next chunks ahead (11.3-11.4 ms; AT, AU). Masked loads instead of
# clamped ones and selects in a sequence's last chunk were slower (10.8 / 8.1 ms; AX).
SETTINGS = {"chunk": 16, "fwd_warps": 4, "bwd_warps": 4, "bwd_warps_restarts": 8, "fwd_stages": 3, "bwd_stages": 3,
            "bf16_dots": 1, "bf16_states": 1, "seq_chunks": 1}
SETTINGS_ENV = "STATETUNE_WKV_CHUNK"
# Triton's interpreter (triton 3.6 with numpy 2) cannot loop a number of times that a kernel loaded: under it the
# kernels walk every row's whole chunk table (`chunk_table` pads rows with empty chunks, which change nothing).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
# seq_chunks' chunk table has room for T / chunk + T / SEQ_CHUNKS_MIN_LEN chunks per row: rows whose sequences
# average fewer tokens are refused (`check_packed_rows` on the host; a device-side check in `chunk_table`).
SEQ_CHUNKS_MIN_LEN = 8


def launch_settings() -> dict[str, int]:
    """The defaults in SETTINGS unless STATETUNE_WKV_CHUNK names others."""
    settings = env_settings(SETTINGS, SETTINGS_ENV, "chunk=32,fwd_warps=4")
    if settings["chunk"] not in (16, 32, 64):
        raise ValueError(f"{SETTINGS_ENV}: chunk must be 16, 32 or 64, got {settings['chunk']}")
    return settings


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32: bfloat16 products in Triton's
    interpreter, whose own bfloat16 tl.dot returns wrong values (triton 3.6)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(x, y, PREC: tl.constexpr):
    """x @ y, accumulated in float32, of float32 tiles: in IEEE float32 or TF32 (PREC "ieee" / "tf32"), or with
    both operands rounded to bfloat16 ("bf16"; "bf16-emulated" rounds them the same way and multiplies in float32)."""
    if PREC == "bf16":  # both branches assign: Triton compiles the code after a constexpr branch's return too
        product = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    elif PREC == "bf16-emulated":
        product = tl.dot(_round_bf16(x), _round_bf16(y), input_precision="ieee")
    else:
        product = tl.dot(x, y, input_precision=PREC)
    return product


@triton.jit
def _segments(starts_ptr, row_base, rows, RESETS: tl.constexpr):
    """Per row of the chunk, how many restarts lie at or before it (0 everywhere without RESETS)."""
    if RESETS:
        return tl.cumsum(tl.load(starts_ptr + row_base + rows).to(tl.int32), axis=0)
    return rows * 0


@triton.jit
def _chunk_at(chunks_ptr, b_idx, h_idx, ci, rows, cols, T: tl.constexpr, H: tl.constexpr, N: tl.constexpr,
              L: tl.constexpr, NCMAX: tl.constexpr, ALIGNED: tl.constexpr):
    """Where chunk `ci` of row `b_idx` lies: `(offsets of its [L, N] tile for head h_idx, its valid rows, its first
    position, the first position after it, the slot of its start state)`. Every L tokens, each chunk's state in
    slot ci; or, ALIGNED, from the row's table (`chunk_table`): L tokens from each sequence's start, a sequence's
    last chunk shorter (its other rows clamped into the row and `valid` False), the slot from the table."""
    if ALIGNED:  # one load gives the chunk's start and its slot: the state's address is then no later than the tiles'
        entry = chunks_ptr + b_idx * (NCMAX + 2) + 1 + ci
        here = tl.load(entry)
        p = (here & 0xFFFFFFFF).to(tl.int32)
        slot = (here >> 32).to(tl.int32)
        end = (tl.load(entry + 1) & 0xFFFFFFFF).to(tl.int32)
        valid = rows < end - p
        offs = (b_idx * T + tl.minimum(p + rows, T - 1))[:, None] * (H * N) + h_idx * N + cols[None, :]
    else:
        p = ci * L
        end = p + L
        slot = ci
        valid = rows < L
        offs = (b_idx * T + ci * L + rows)[:, None] * (H * N) + h_idx * N + cols[None, :]
    return offs, valid, p, end, slot


@triton.jit
def _only_valid(valid, lw, k, v, b):
    """Zero what rows that are not `valid` would add to the state: they become steps that change nothing (decay 1,
    no key, value or b). Their r and a need no zeros: what they reach is their own rows' outputs (never stored)
    and u, which enters the state only through b (and, in backward, dy stays zero there once dO is zero)."""
    keep = valid[:, None]
    return tl.where(keep, lw, 0.0), tl.where(keep, k, 0.0), tl.where(keep, v, 0.0), tl.where(keep, b, 0.0)


@triton.jit
def _store(ptr, offs, value, valid, ALIGNED: tl.constexpr):
    """Store a [L, N] tile in ptr's dtype: only its valid rows when ALIGNED."""
    if ALIGNED:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=valid[:, None])
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))


@triton.jit
def _load_chunk(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, offs):
    """A chunk's inputs at `offs` as float32 [L, N] tiles: (r, log decay, k, v, a, b)."""
    return (tl.load(r_ptr + offs).to(tl.float32), tl.load(w_ptr + offs).to(tl.float32),
            tl.load(k_ptr + offs).to(tl.float32), tl.load(v_ptr + offs).to(tl.float32),
            tl.load(a_ptr + offs).to(tl.float32), tl.load(b_ptr + offs).to(tl.float32))


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
    m_ab = _dot(ap, tl.trans(bh), PREC) * strict
    m_ak = _dot(ap, tl.trans(kh), PREC) * strict
    m_rb = _dot(rp, tl.trans(bh), PREC) * incl
    m_rk = _dot(rp, tl.trans(kh), PREC) * incl
    inv = _unit_lower_inverse(m_ab, rows, LOG2L)
    return incl, strict, c, cex, c_end, rp, ap, grow, bh, kh, tail, m_ab, m_ak, m_rb, m_rk, inv


@triton.jit
def _fwd(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, starts_ptr, chunks_ptr, out_ptr, ckpt_ptr, final_ptr,
         T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr,
         RESETS: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, NCMAX: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)  # = batch row * H + head
    b_idx = pid // H
    h_idx = pid % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    tile = cols[:, None] * N + cols[None, :]
    NC: tl.constexpr = T // L
    NTAB: tl.constexpr = NCMAX if ALIGNED else NC  # chunks a row may have
    NSLOT: tl.constexpr = NC + 2 if ALIGNED else NC  # chunk-start states kept per row and head (`chunk_table`)
    n_chunks = tl.load(chunks_ptr + b_idx * (NCMAX + 2)).to(tl.int32) if ALIGNED else NC
    S = tl.load(s0_ptr + pid * N * N + tile)
    for ci in range(NTAB if INTERPRETED else n_chunks):
        offs, valid, _start, end, slot = _chunk_at(chunks_ptr, b_idx, h_idx, ci, rows, cols, T, H, N, L, NCMAX,
                                                   ALIGNED)
        if SAVE:
            tl.store(ckpt_ptr + (pid * NSLOT + slot) * N * N + tile, S.to(ckpt_ptr.dtype.element_ty))
        r, lw, k, v, a, b = _load_chunk(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, offs)
        if ALIGNED:
            lw, k, v, b = _only_valid(valid, lw, k, v, b)
        seg = _segments(starts_ptr, b_idx * T + ci * L, rows, RESETS)
        (_incl, _strict, _c, _cex, c_end, rp, ap, _grow, _bh, _kh, tail, _m_ab, m_ak, m_rb, m_rk,
         inv) = _chunk_terms(r, lw, k, a, b, seg, rows, L, LOG2L, PREC)
        cont = (seg == 0)[:, None]  # rows that continue from the carried state
        y = _dot(tl.where(cont, ap, 0.0), tl.trans(S), PREC)
        o = _dot(tl.where(cont, rp, 0.0), tl.trans(S), PREC)
        enter = S
        if RESETS:  # noqa: SIM102 - a compile-time branch around a run-time one
            if tl.max(seg, axis=0) > 0:  # a restart in this chunk: later segments start from the initial state
                first = tl.load(s0_ptr + pid * N * N + tile)  # read where needed: registers stay free
                y += _dot(tl.where(cont, 0.0, ap), tl.trans(first), PREC)
                o += _dot(tl.where(cont, 0.0, rp), tl.trans(first), PREC)
                enter = first
        y += _dot(m_ak, v, PREC)
        u = _dot(inv, y, PREC)
        o += _dot(m_rb, u, PREC) + _dot(m_rk, v, PREC)
        _store(out_ptr, offs, o, valid, ALIGNED)
        S = (enter * tl.exp(c_end)[None, :] + _dot(tl.trans(u), b * tail, PREC)
             + _dot(tl.trans(v), k * tail, PREC))
        if ALIGNED:  # a compile-time branch around a run-time one
            next_flag = tl.load(starts_ptr + b_idx * T + tl.minimum(end, T - 1))
            if (next_flag != 0) & (end < T):  # the next chunk starts a sequence
                S = tl.load(s0_ptr + pid * N * N + tile)
    tl.store(final_ptr + pid * N * N + tile, S)


@triton.jit
def _bwd(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, starts_ptr, chunks_ptr, ckpt_ptr, dout_ptr, dfinal_ptr,
         dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr,
         T: tl.constexpr, H: tl.constexpr, N: tl.constexpr, L: tl.constexpr, LOG2L: tl.constexpr,
         RESETS: tl.constexpr, PREC: tl.constexpr, NCMAX: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    b_idx = pid // H
    h_idx = pid % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    tile = cols[:, None] * N + cols[None, :]
    NC: tl.constexpr = T // L
    NTAB: tl.constexpr = NCMAX if ALIGNED else NC
    NSLOT: tl.constexpr = NC + 2 if ALIGNED else NC
    n_chunks = tl.load(chunks_ptr + b_idx * (NCMAX + 2)).to(tl.int32) if ALIGNED else NC
    dS = tl.load(dfinal_ptr + pid * N * N + tile)  # gradient of the state at the current chunk's end
    dfirst = tl.zeros((N, N), dtype=tl.float32)  # gradient of the initial state through restarts
    for i in range(NTAB if INTERPRETED else n_chunks):
        ci = (NTAB if INTERPRETED else n_chunks) - 1 - i
        offs, valid, start, _end, slot = _chunk_at(chunks_ptr, b_idx, h_idx, ci, rows, cols, T, H, N, L, NCMAX,
                                                   ALIGNED)
        S = tl.load(ckpt_ptr + (pid * NSLOT + slot) * N * N + tile).to(tl.float32)
        r, lw, k, v, a, b = _load_chunk(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, offs)
        do = tl.load(dout_ptr + offs).to(tl.float32)
        if ALIGNED:
            lw, k, v, b = _only_valid(valid, lw, k, v, b)
            do = tl.where(valid[:, None], do, 0.0)
        seg = _segments(starts_ptr, b_idx * T + ci * L, rows, RESETS)
        (incl, strict, c, cex, c_end, rp, ap, grow, bh, kh, tail, _m_ab, m_ak, m_rb, m_rk,
         inv) = _chunk_terms(r, lw, k, a, b, seg, rows, L, LOG2L, PREC)
        cont = (seg == 0)[:, None]
        bbar = b * tail
        kbar = k * tail
        # forward again: u
        y = _dot(tl.where(cont, ap, 0.0), tl.trans(S), PREC)
        enter = S
        restarted = False
        if RESETS:  # noqa: SIM102 - a compile-time branch around a run-time one
            if tl.max(seg, axis=0) > 0:  # later segments (and the chunk's end) come from the initial state
                first = tl.load(s0_ptr + pid * N * N + tile)
                y += _dot(tl.where(cont, 0.0, ap), tl.trans(first), PREC)
                enter = first
                restarted = True
        y += _dot(m_ak, v, PREC)
        u = _dot(inv, y, PREC)
        # S_L = enter·diag(e^{c_L}) + uᵀ B̄ + vᵀ K̄ and o = R' Sᵀ + M_rb u + M_rk v
        du = (_dot(tl.trans(m_rb), do, PREC)
              + _dot(bbar, tl.trans(dS), PREC))
        dy = _dot(tl.trans(inv), du, PREC)  # u = (I − M_ab)⁻¹ y
        dm_ab = _dot(dy, tl.trans(u), PREC) * strict
        dm_ak = _dot(dy, tl.trans(v), PREC) * strict
        dm_rb = _dot(do, tl.trans(u), PREC) * incl
        dm_rk = _dot(do, tl.trans(v), PREC) * incl
        dv = (_dot(tl.trans(m_ak), dy, PREC) + _dot(tl.trans(m_rk), do, PREC)
              + _dot(kbar, tl.trans(dS), PREC))
        do_c = tl.where(cont, do, 0.0)
        dy_c = tl.where(cont, dy, 0.0)
        drp = (_dot(do_c, S, PREC) + _dot(dm_rb, bh, PREC)
               + _dot(dm_rk, kh, PREC))
        dap = (_dot(dy_c, S, PREC) + _dot(dm_ab, bh, PREC)
               + _dot(dm_ak, kh, PREC))
        dS_prev = (_dot(tl.trans(do_c), rp, PREC)
                   + _dot(tl.trans(dy_c), ap, PREC))
        if restarted:
            first = tl.load(s0_ptr + pid * N * N + tile)  # again: holding it across the chunk costs registers
            do_f = tl.where(cont, 0.0, do)
            dy_f = tl.where(cont, 0.0, dy)
            drp += _dot(do_f, first, PREC)
            dap += _dot(dy_f, first, PREC)
            dfirst += (_dot(tl.trans(do_f), rp, PREC)
                       + _dot(tl.trans(dy_f), ap, PREC))
        dbh = _dot(tl.trans(dm_ab), ap, PREC) + _dot(tl.trans(dm_rb), rp, PREC)
        dkh = _dot(tl.trans(dm_ak), ap, PREC) + _dot(tl.trans(dm_rk), rp, PREC)
        dbbar = _dot(u, dS, PREC)
        dkbar = _dot(v, dS, PREC)
        decay_end = tl.exp(c_end)
        dc_end = tl.sum(dS * enter, axis=0) * decay_end + tl.sum(dbbar * bbar + dkbar * kbar, axis=0)
        carried = dS * decay_end[None, :]
        if restarted:
            dfirst += carried
        else:
            dS_prev += carried
        dc = (drp * rp - dbh * bh - dkh * kh - dbbar * bbar - dkbar * kbar
              + tl.where((rows == L - 1)[:, None], dc_end[None, :], 0.0))
        dlw = (tl.dot(tl.trans(incl), dc, input_precision="ieee")
               + tl.dot(tl.trans(strict), dap * ap, input_precision="ieee"))
        _store(dr_ptr, offs, drp * tl.exp(c), valid, ALIGNED)
        _store(dw_ptr, offs, dlw, valid, ALIGNED)
        _store(dk_ptr, offs, dkh * grow + dkbar * tail, valid, ALIGNED)
        _store(dv_ptr, offs, dv, valid, ALIGNED)
        _store(da_ptr, offs, dap * tl.exp(cex), valid, ALIGNED)
        _store(db_ptr, offs, dbh * grow + dbbar * tail, valid, ALIGNED)
        if ALIGNED:  # a compile-time branch around a run-time one
            restart = (tl.load(starts_ptr + b_idx * T + tl.minimum(start, T - 1)) != 0) & (start > 0) & (start < T)
            # This chunk starts a sequence (after the row's first): it started from the initial state. The adds
            # are atomic (into zeros) but come one at a time from this program alone: no tile of registers held
            # across the loop, and no load that Triton's pipelining could move ahead of an earlier add.
            tl.atomic_add(ds0_ptr + pid * N * N + tile, dS_prev, mask=restart, sem="relaxed")
            dS_prev = tl.where(restart, 0.0, dS_prev)
        dS = dS_prev
    if ALIGNED:
        tl.atomic_add(ds0_ptr + pid * N * N + tile, dS, sem="relaxed")
    else:
        tl.store(ds0_ptr + pid * N * N + tile, dS + dfirst)


def _precision(dtype: torch.dtype, bf16_dots: int) -> str:
    """The products' precision (`_dot`): IEEE float32 for float32 inputs; for bfloat16 inputs bfloat16 operands
    (`bf16_dots`; emulated under TRITON_INTERPRET=1), else TF32 (float16 inputs: bfloat16 would round them more
    than their own precision)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype != torch.bfloat16 or not bf16_dots:
        return "tf32"
    return "bf16-emulated" if os.environ.get("TRITON_INTERPRET") == "1" else "bf16"


def states_dtype(dtype: torch.dtype, bf16_states: int) -> torch.dtype:
    """The dtype of the chunk-start states kept for backward: bfloat16 for bfloat16 inputs (`bf16_states`), else
    float32."""
    return torch.bfloat16 if bf16_states and dtype == torch.bfloat16 else torch.float32


def seq_chunks_room(T: int, chunk: int) -> int:
    """Chunks a row of T tokens may have under seq_chunks (its chunk table's size): T / chunk plus one per
    sequence, for sequences down to SEQ_CHUNKS_MIN_LEN tokens on average."""
    return T // chunk + T // SEQ_CHUNKS_MIN_LEN


def _chunk_starts(flags: Tensor, chunk: int) -> Tensor:
    """`[B, T]` bool: where seq_chunks' chunks start, every `chunk` tokens from each sequence's start (flags != 0;
    a row's first position starts one too)."""
    pos = torch.arange(flags.shape[1], device=flags.device, dtype=torch.int32)
    seq_start = torch.cummax(torch.where(flags != 0, pos, 0), dim=1).values
    return (pos - seq_start) % chunk == 0


def _too_many_chunks(need: int | str, room: int, T: int) -> str:
    return (f"a packed row of {T} tokens needs {need} chunks under seq_chunks, which keeps room for {room} "
            f"(its sequences average under {SEQ_CHUNKS_MIN_LEN} tokens); {SETTINGS_ENV}=seq_chunks=0 runs such rows")


def chunk_table(flags: Tensor, chunk: int, max_chunks: int) -> Tensor:
    """Each row's chunks when they start at its sequences' starts (`seq_chunks`): int64 `[B, max_chunks + 2]`, per
    row the number of chunks n, then one entry per chunk in order: its first position (`_chunk_starts`) in the low 32
    bits and the slot of its start state among the T / chunk + 2 that the kernels keep per row and head in the high
    32 bits (one load gives both, so the kernels know the state's address as early as the tiles'), then padding
    entries at T (the end of the last chunk).

    A chunk that continues a sequence gets the next of slots 0, 1, …; there are at most T / chunk of those, since
    each follows a full chunk of its own sequence. Every chunk that starts a sequence starts from the initial state
    and shares slot T / chunk; the table's padding entries (walked only by Triton's interpreter) write to slot
    T / chunk + 1, read by no one.

    Built on the device without waiting for it (CUDA graphs can capture it). A row needs at most T / chunk + its
    number of sequences chunks; more than `max_chunks` fails a device-side check (on a GPU, CUDA's generic
    "device-side assert": `check_packed_rows` checks the batch on the host first)."""
    B, T = flags.shape
    pos = torch.arange(T, device=flags.device, dtype=torch.int32)
    first = _chunk_starts(flags, chunk)
    continuing = first & (flags == 0) & (pos > 0)
    slot_at = torch.where(continuing, torch.cumsum(continuing, dim=1, dtype=torch.int32) - 1, T // chunk)
    ordered, at = torch.where(first, pos, T).sort(dim=1)
    slots = torch.where(ordered < T, slot_at.gather(1, at), T // chunk + 1).to(torch.int32)
    if T < max_chunks + 1:
        ordered = torch.cat([ordered, ordered.new_full((B, max_chunks + 1 - T), T)], dim=1)
        slots = torch.cat([slots, slots.new_full((B, max_chunks + 1 - T), T // chunk + 1)], dim=1)
    count = first.sum(dim=1, dtype=torch.int32)
    torch._assert_async(count.max() <= max_chunks, _too_many_chunks(f"more than {max_chunks}", max_chunks, T))
    entries = ordered[:, :max_chunks + 1].to(torch.int64) | (slots[:, :max_chunks + 1].to(torch.int64) << 32)
    return torch.cat([count[:, None].to(torch.int64), entries], dim=1).contiguous()


def check_packed_rows(starts: Tensor) -> None:
    """ValueError when a batch of packed rows (`starts [B, T]`, on the host before it goes to the GPU) has a row
    with more sequences than seq_chunks keeps room for; nothing when seq_chunks is off."""
    settings = launch_settings()
    if not settings["seq_chunks"]:
        return
    flags = torch.nn.functional.pad(starts.to(torch.int8), (0, -starts.shape[1] % T_STEP))  # as `run_padded` pads
    T = flags.shape[1]
    need = int(_chunk_starts(flags, settings["chunk"]).sum(dim=1).max())
    room = seq_chunks_room(T, settings["chunk"])
    if need > room:
        raise ValueError(_too_many_chunks(need, room, T))


_TABLE: dict[str, object] = {}  # the last chunk table, for the next WKV call on the same flags


def step_chunk_table(starts: Tensor, flags: Tensor, chunk: int, max_chunks: int) -> Tensor:
    """`chunk_table(flags, …)`, built once for all the WKV calls that get the same `starts` tensor (every layer of a
    step, and the recompute in backward) instead of once per call.

    The table is reused only for that very tensor (held by a weak reference, so a new batch's tensor at the
    same address is not mistaken for it), unchanged since (its version counter), with the same chunk settings,
    and on the same side of a CUDA graph capture: a graph must compute its table itself, never read one built
    outside it."""
    capturing = starts.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (starts._version, chunk, max_chunks, capturing)
    owner = _TABLE.get("starts")
    if owner is not None and owner() is starts and _TABLE.get("key") == key:
        return _TABLE["table"]  # type: ignore[return-value]
    table = chunk_table(flags, chunk, max_chunks)
    _TABLE.update(starts=weakref.ref(starts), key=key, table=table)
    return table


class _ChunkWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,  # type: ignore[override]
                s0: Tensor, starts: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T, H, N = r.shape
        settings = launch_settings()
        L = settings["chunk"]
        aligned = starts is not None and bool(settings["seq_chunks"])
        table = seq_chunks_room(T, L) if aligned else T // L  # chunks a row may have
        if B * H * (T // L + 2) * N * N >= 2**31:  # the kernels' offsets are 32-bit (the largest: chunk-start states)
            raise ValueError(f"WKV input [B={B}, T={T}, H={H}] is too large for the chunked kernels' 32-bit offsets; "
                             "use fewer rows per micro-batch or a shorter ctx_len")
        inputs, s0, flags = kernel_inputs(r, log_decay, k, v, a, b, s0, starts)
        save = any(ctx.needs_input_grad[:7])
        out = torch.empty_like(inputs[0])
        prec = _precision(r.dtype, settings["bf16_dots"])
        chunks = step_chunk_table(starts, flags, L, table) if aligned else flags.new_empty(0, dtype=torch.int64)
        resets = starts is not None and not aligned  # restarts inside chunks
        slots = T // L + 2 if aligned else T // L  # chunk-start states kept per row and head (`chunk_table`)
        ckpt = torch.empty((B, H, slots, N, N) if save else (0,), device=r.device,
                           dtype=states_dtype(r.dtype, settings["bf16_states"]))
        final = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
        log2l = L.bit_length() - 1
        _fwd[(B * H,)](*inputs, s0, flags, chunks, out, ckpt, final, T, H, N, L, log2l, resets, save, prec, table,
                       aligned, num_warps=settings["fwd_warps"], num_stages=settings["fwd_stages"])
        if save:
            ctx.save_for_backward(*inputs, s0, flags, chunks, ckpt)
            bwd_warps = settings["bwd_warps_restarts" if resets else "bwd_warps"]
            ctx.launch = L, log2l, resets, bwd_warps, settings["bwd_stages"], prec, table, aligned
        return out, final

    @staticmethod
    def backward(ctx, dout: Tensor, dfinal: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        r, log_decay, k, v, a, b, s0, flags, chunks, ckpt = ctx.saved_tensors
        L, log2l, resets, num_warps, num_stages, prec, table, aligned = ctx.launch
        B, T, H, N = r.shape
        dout = dout.contiguous()
        dfinal = (torch.zeros(B, H, N, N, device=r.device, dtype=torch.float32) if dfinal is None
                  else dfinal.float().contiguous())
        grads = [torch.empty_like(x) for x in (r, log_decay, k, v, a, b)]
        # seq_chunks: every sequence adds its start's gradient (atomically)
        ds0 = (torch.zeros if aligned else torch.empty)(B, H, N, N, device=r.device, dtype=torch.float32)
        _bwd[(B * H,)](r, log_decay, k, v, a, b, s0, flags, chunks, ckpt, dout, dfinal, *grads, ds0,
                       T, H, N, L, log2l, resets, prec, table, aligned, num_warps=num_warps, num_stages=num_stages)
        return (*grads, ds0, None)


def wkv7_chunk(r: Tensor, log_decay: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
               initial_state: Tensor, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`wkv7` without cu_seqlens through the chunked kernels: `(out [B, T, H, N]` in r's dtype`, final [B, H, N, N])`.

    Shapes and `starts` as in `rwkv7.wkv_triton.wkv7_triton`; T is padded up to a multiple of `T_STEP`
    (`rwkv7.wkv.run_padded`).
    """
    return run_padded(_ChunkWKV7.apply, T_STEP, r, log_decay, k, v, a, b, initial_state, starts)
