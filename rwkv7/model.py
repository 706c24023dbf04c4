"""RWKV-7 "Goose" (x070) as an nn.Module that loads BlinkDL checkpoints as they are.

Boundary: parameters named exactly like the BlinkDL state dict (`blocks.{i}.att.receptance.weight`, …), so
`load_state_dict` takes a checkpoint directly; the maths follows ../shared/docs/rwkv7-facts.md §2. The model
reads no files of ours except through `load_model`; the WKV recurrence lives in `rwkv7.wkv`.

Shapes: B batch, T time, C = n_embd, H heads, N = head size (64), V vocab, L layers.

>>> model = load_model("rwkv7-g1a-0.1b.pth")                   # doctest: +SKIP
>>> logits, state = model(torch.tensor([[24281, 59]]))         # [1, 2, 65536], RWKVState
>>> logits, state = model.step(torch.tensor([4571]), state)    # [1, 65536]
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv7.atomic import file_sha256
from rwkv7.checkpoint import ModelConfig, load_checkpoint
from rwkv7.state import RWKVState
from rwkv7.wkv import wkv7

LN_EPS = 1e-5
LN_X_EPS = 64e-5  # GroupNorm over heads on the WKV output (BlinkDL: 1e-5 * head_size)
W_LOG_DECAY_MIN = -math.exp(-0.5)  # log decay = W_LOG_DECAY_MIN * sigmoid(...), so decay in (0.545, 1)


def token_shift(x: Tensor, shift: Tensor, cu_seqlens: Tensor | None, starts: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """Previous-token inputs for `x [B, T, C]`: (prev [B, T, C], last token per sequence [S, C]).

    The first token of each sequence sees `shift [S, C]` (S = B, or the number of packed sequences when
    `cu_seqlens [S+1]` is given with B = 1). With `starts [B, T]` every flagged position sees its row's shift
    too (rows holding several sequences; the last token returned is the row's).
    The last tokens are a copy: a view would keep all of `x` alive for as long as the state is (in training, the
    norms' outputs of every layer until the forward ends: 0.8 GB at 1.5B, 8 × 512; BENCHMARKS.md, tenth session).
    """
    if cu_seqlens is None:
        first = shift.to(x.dtype).unsqueeze(1)
        prev = torch.cat((first, x[:, :-1]), dim=1)
        if starts is not None:
            prev = torch.where(starts.unsqueeze(-1), first, prev)
        return prev, x[:, -1].clone()
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    prev = torch.cat((x[0, :1], x[0, :-1]), dim=0).index_copy(0, starts, shift.to(x.dtype))
    return prev.unsqueeze(0), x[0, ends - 1]


class TimeMix(nn.Module):
    """Attention-like half of a block: token shift, low-rank gates, WKV-7, GroupNorm, bonus, output."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        C, H, N, D = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dims
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        lora = ("w", "a", "g") + (("v",) if layer_id > 0 else ())
        for name in lora:
            setattr(self, f"{name}1", nn.Parameter(torch.empty(C, D[name])))
            setattr(self, f"{name}2", nn.Parameter(torch.empty(D[name], C)))
        if layer_id > 0:
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance, self.key, self.value, self.output = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)
        self.wkv_backend: str | None = None  # rwkv7.wkv backend; None: its default (a trainer may pick one)

    def mix(self, u: Tensor, prev: Tensor) -> tuple[Tensor, ...]:
        """`u, prev [B, T, C]` (LN1 output and its shift) → the six mixed inputs (r, w, k, v, a, g)."""
        delta = prev - u
        return tuple(u + delta * mix for mix in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

    def project(self, xr: Tensor, xw: Tensor, xk: Tensor, xv: Tensor, xa: Tensor, xg: Tensor
                ) -> tuple[Tensor, ...]:
        """The frozen projections of the mixed inputs: (r, k, v [B, T, C], and the low-rank gates' first halves
        for w, a, g and v; v's is None in layer 0, which has no v gate). Matrix products only: with frozen weights
        their backward needs no saved activations."""
        v_low = xv @ self.v1 if self.layer_id > 0 else None
        return self.receptance(xr), self.key(xk), self.value(xv), xw @ self.w1, xa @ self.a1, xg @ self.g1, v_low

    def recur(self, r: Tensor, k: Tensor, v: Tensor, w_low: Tensor, a_low: Tensor, g_low: Tensor,
              v_low: Tensor | None, v_first: Tensor | None, wkv_state: Tensor, cu_seqlens: Tensor | None = None,
              starts: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`project`'s outputs, `v_first` (layer 0's v; None in layer 0) and the WKV state → (the output
        projection's input [B, T, C], wkv [S, H, N, N], v_first): the gates, WKV-7, GroupNorm and the bonus."""
        B, T, C = r.shape
        H, N = self.n_head, self.head_size
        log_decay = W_LOG_DECAY_MIN * torch.sigmoid((self.w0 + torch.tanh(w_low) @ self.w2).float())
        iclr = torch.sigmoid(self.a0 + a_low @ self.a2)
        gate = torch.sigmoid(g_low) @ self.g2
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + v_low @ self.v2)
        kappa = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (iclr - 1) * self.k_a)
        r4, k4, v4, iclr4 = (x.view(B, T, H, N) for x in (r, k, v, iclr))
        out, wkv_state = wkv7(r4, log_decay.view(B, T, H, N), k4, v4, -kappa, kappa * iclr4, wkv_state,
                              cu_seqlens=cu_seqlens, starts=starts, backend=self.wkv_backend)
        out = self.head_norm(out)
        bonus = (r4 * k4 * self.r_k).sum(dim=-1, keepdim=True) * v4
        return (out + bonus).view(B, T, C) * gate, wkv_state, v_first

    def head_norm(self, out: Tensor) -> Tensor:
        """`ln_x` (GroupNorm, one group per head) on the WKV output `[B, T, H, N]`.

        Under torch.compile it is written as a layer norm over the last dim in float32 and the per-head affine: the
        same maths, which Inductor fuses into one pass over rows of N values (its GroupNorm lowering took ~78 µs per
        1.5B layer on an H200, ~10× what the bytes need; BENCHMARKS.md, eighth session). Eagerly the native GroupNorm
        kernel stays: it makes no float32 temporaries, which the memory rows of a 1.5B model feel."""
        B, T, H, N = out.shape
        if not torch.compiler.is_compiling():
            return self.ln_x(out.reshape(B * T, H * N)).view(B, T, H, N)
        y = F.layer_norm(out.float(), (N,), eps=self.ln_x.eps)
        return (y * self.ln_x.weight.view(H, N).float() + self.ln_x.bias.view(H, N).float()).to(out.dtype)


class ChannelMix(nn.Module):
    """Feed-forward half of a block: token shift, squared-ReLU MLP of width 4C."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C = cfg.n_embd
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, 4 * C, bias=False)
        self.value = nn.Linear(4 * C, C, bias=False)

    def hidden(self, z: Tensor, prev: Tensor) -> Tensor:
        """`z, prev [B, T, C]` (LN2 output and its shift) → the squared-ReLU hidden layer [B, T, 4C]; `value`
        projects it back (`Block.forward`)."""
        return torch.relu(self.key(z + (prev - z) * self.x_k)) ** 2


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)

    def forward(self, x: Tensor, v_first: Tensor | None, att_shift: Tensor, wkv: Tensor, ffn_shift: Tensor,
                cu_seqlens: Tensor | None, starts: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, C] and this layer's state → (x, v_first, att_shift [S, C], wkv [S, H, N, N], ffn_shift).

        Written as stages so that a trainer can recompute the cheap ones in backward and keep the rest
        (`rwkv7.tuning.wrap_blocks`): `att_inputs`, `att.recur` and `ffn_hidden` hold all the elementwise work,
        the norms and the WKV; between them run the frozen projections, whose backward needs no activations.
        """
        mixed, att_shift = self.att_inputs(x, att_shift, cu_seqlens, starts)
        projected = self.att.project(*mixed)
        del mixed  # six [B, T, C] inputs that no backward needs: gone before the WKV runs, not at the return
        y, wkv, v_first = self.att.recur(*projected, v_first, wkv, cu_seqlens=cu_seqlens, starts=starts)
        x, hidden, ffn_shift = self.ffn_hidden(x, self.att.output(y), ffn_shift, cu_seqlens, starts)
        return x + self.ffn.value(hidden), v_first, att_shift, wkv, ffn_shift

    def att_inputs(self, x: Tensor, att_shift: Tensor, cu_seqlens: Tensor | None, starts: Tensor | None
                   ) -> tuple[tuple[Tensor, ...], Tensor]:
        """LN1, token shift and mixing: (the attention projections' six inputs, this layer's next att_shift)."""
        u = self.ln1(x)
        prev, att_shift = token_shift(u, att_shift, cu_seqlens, starts)
        return self.att.mix(u, prev), att_shift

    def ffn_hidden(self, x: Tensor, delta: Tensor, ffn_shift: Tensor, cu_seqlens: Tensor | None,
                   starts: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The attention's residual, LN2, token shift, the FFN's key projection and squared ReLU: (x + delta,
        hidden [B, T, 4C], next ffn_shift). Taking the residual here fuses it with LN2; a checkpoint of this stage
        keeps x, which `att_inputs` keeps anyway, and delta instead of their sum."""
        x = x + delta
        z = self.ln2(x)
        prev, ffn_shift = token_shift(z, ffn_shift, cu_seqlens, starts)
        return x, self.ffn.hidden(z, prev), ffn_shift


class RWKV7(nn.Module):
    """RWKV-7 x070 language model. Weights are frozen (requires_grad False) after `load_model`.

    `source` is the checkpoint path it was loaded from (None for a model built in memory);
    `source_sha256()` hashes that file once and caches the result on the model.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=LN_EPS)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.source: Path | None = None
        self._source_sha256: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the blocks and the head run (the embedding table may stay in host memory: `embed`)."""
        return self.ln_out.weight.device

    def embed(self, tokens: Tensor) -> Tensor:
        """Embedding rows of `tokens`, on the tokens' device, wherever the table lives.

        A trainer may keep the `[V, C]` table in host memory (a lookup needs no GPU copy of it); then the
        lookup runs there and only the `[B, T, C]` rows travel.
        """
        table = self.emb.weight
        if table.device == tokens.device:
            return self.emb(tokens)
        return self.emb(tokens.to(table.device)).to(tokens.device)

    def forward(self, tokens: Tensor, state: RWKVState | None = None, cu_seqlens: Tensor | None = None,
                return_hidden: bool = False, starts: Tensor | None = None) -> tuple[Tensor, RWKVState]:
        """Run `tokens [B, T]` (LongTensor, T ≥ 1) from `state` (zeros if None; batch 1 broadcasts).

        Returns `(logits [B, T, V], final state with batch S)`, or with `return_hidden` the normalized
        hidden states `[B, T, C]` instead of logits (then `model.head(hidden)` gives the logits, so a trainer
        can compute the loss chunk by chunk). With `cu_seqlens` (`[S+1]`, B = 1) the row holds S packed
        sequences; token shift and WKV restart at each boundary from the state's row for that sequence.
        With `starts` (bool `[B, T]`) each row may hold several sequences: token shift and WKV restart from the
        row's state at every flagged position (fixed shapes; needs the "reference", "chunk" or "triton" WKV
        backend).
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty [B, T] LongTensor, got shape {tuple(tokens.shape)}")
        if cu_seqlens is not None and tokens.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs tokens of shape [1, total], got {tuple(tokens.shape)}")
        hidden, final = self.run_blocks(self.embed(tokens), state, cu_seqlens, starts)
        return (hidden if return_hidden else self.head(hidden)), final

    def run_blocks(self, x: Tensor, state: RWKVState | None = None, cu_seqlens: Tensor | None = None,
                   starts: Tensor | None = None) -> tuple[Tensor, RWKVState]:
        """Embedding rows `x [B, T, C]` → (normalized hidden states `[B, T, C]`, final state): `forward`
        without the lookup and the head, for callers that embed themselves."""
        layers: list[tuple[Tensor, Tensor, Tensor]] = []
        hidden = self.hidden_states(x, state, cu_seqlens, starts, on_layer_state=lambda *s: layers.append(s))
        att_shift, wkv, ffn_shift = (torch.stack(parts) for parts in zip(*layers, strict=True))
        return hidden, RWKVState(att_shift=att_shift, wkv=wkv, ffn_shift=ffn_shift)

    def hidden_states(self, x: Tensor, state: RWKVState | None = None, cu_seqlens: Tensor | None = None,
                      starts: Tensor | None = None,
                      on_layer_state: Callable[[Tensor, Tensor, Tensor], None] | None = None) -> Tensor:
        """`run_blocks` without collecting the final state: for a loss (a CUDA-graphed training step), which needs
        only the hidden states. Each layer's final state goes to `on_layer_state(att_shift, wkv, ffn_shift)` if
        given, else it is dropped at once instead of being held until the last layer (1.5B, 8 × 512: 0.1 GB)."""
        if starts is not None and (cu_seqlens is not None or starts.shape != x.shape[:2]):
            raise ValueError(f"starts must be [B, T] = {tuple(x.shape[:2])} and comes without cu_seqlens")
        n_seq = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if state is None:
            state = RWKVState.zeros(self.config, n_seq, self.device, self.dtype)
        x = self.blocks[0].ln0(x)
        v_first = None
        for block, layer in zip(self.blocks, state.layers(n_seq), strict=True):
            x, v_first, att_shift, wkv, ffn_shift = block(x, v_first, *layer, cu_seqlens, starts)
            if on_layer_state is not None:
                on_layer_state(att_shift, wkv, ffn_shift)
        return self.ln_out(x)

    def step(self, token_ids: Tensor, state: RWKVState | None = None) -> tuple[Tensor, RWKVState]:
        """One RNN step: `token_ids [B]` → (logits [B, V], state). Same maths as `forward` with T = 1."""
        logits, state = self(token_ids.view(-1, 1), state)
        return logits[:, 0], state

    def source_sha256(self) -> str | None:
        """sha256 of the checkpoint file this model was loaded from (computed once, then cached)."""
        if self.source is None:
            return None
        if self._source_sha256 is None:
            self._source_sha256 = file_sha256(self.source)
        return self._source_sha256


def build_model(sd: dict[str, Tensor], cfg: ModelConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> RWKV7:
    """Model from a validated BlinkDL state dict (see `rwkv7.checkpoint.inspect_checkpoint`); weights frozen.

    `dtype` None means float32 on CPU and bfloat16 on CUDA. Block-0 v0/v1/v2 (unused) are dropped.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = RWKV7(cfg)
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    weights = {k: v.to(device=device, dtype=dtype) for k, v in sd.items() if k not in unused}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> RWKV7:
    """Load a BlinkDL x070 `.pth` (validated; errors name the file) onto `device` in `dtype`.

    `dtype` None: float32 on CPU, bfloat16 on CUDA.
    """
    sd, cfg = load_checkpoint(path)
    model = build_model(sd, cfg, device, dtype)
    model.source = Path(path)
    return model
