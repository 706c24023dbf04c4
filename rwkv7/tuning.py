"""State tuning as a LightningModule: the frozen model's initial WKV state is the only thing that trains.

Boundary: a loaded `RWKV7` and `rwkv7.data.Batch`es in; the trained `state_wkv [L, H, N, N]` (float32,
[value, key] orientation, the RWKV-Runner layout) out. No files here except Lightning's checkpoints, which
hold only the state, the optimizer, the scheduler and the run's progress (never the frozen weights).

Loss: next-token cross-entropy over the masked targets of a batch, or (with `distill_prefix`) the KL
divergence KL(teacher ‖ student) where the teacher is the same frozen model after reading the prefix
(prompt distillation: the state learns what the prompt did). Only masked positions go through the head, in
chunks of `loss_chunk` rows, so no `[B, T, V]` float32 logits tensor exists: the cross-entropy computes each chunk's
gradient in forward (`_HeadCrossEntropy`), the KL recomputes its chunks in backward.
With CUDA graphs (`cuda_graphs`), `dense_loss` scores every position instead, the mask as 0/1 weights, so that
no shape depends on the data.
Per-step history (loss, lr, real tokens/s) is kept here and travels in checkpoints, so a resumed run reports
its whole curve. Nothing in a step waits for the GPU: a step's loss and its finiteness check come back to the host
while the next step runs (`HostReadback`), so the host prepares step n+1 while the GPU computes step n; a NaN/inf
loss or gradient stops the run one step later, with the same last finite state.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rwkv7.data import Batch, BucketBatchSampler
from rwkv7.graphs import GraphedLoss
from rwkv7.model import RWKV7
from rwkv7.state import RWKVState

CKPT_KEY = "statetune"


class NonFiniteLossError(RuntimeError):
    """The loss or the state's gradient became NaN/inf; `last_good` holds the state of the last finite step."""

    def __init__(self, message: str, last_good: Tensor) -> None:
        super().__init__(message)
        self.last_good = last_good


GradCpPolicy = Literal["full", "selective"]  # what grad_cp recomputes (`wrap_blocks`)
GRAD_CP_POLICIES: tuple[str, ...] = get_args(GradCpPolicy)


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer and schedule of one run; `total_steps` counts optimizer steps (after accumulation)."""

    lr_init: float
    lr_final: float
    total_steps: int
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    loss_chunk: int = 1024
    grad_cp: bool = False
    grad_cp_keep: int = 0  # with grad_cp, the last blocks that keep their activations (no recompute)
    grad_cp_policy: GradCpPolicy = "full"  # with grad_cp, what the other blocks recompute (wrap_blocks)
    grad_cp_keep_ffn: int = 0  # with the selective policy, blocks (before the kept ones) whose FFN is not recomputed
    compile: str | None = None  # torch.compile backend for the blocks' non-WKV work ("inductor"); None: eager
    cuda_graphs: bool = False  # replay captured CUDA graphs of each batch shape (padded or row-packed batches)
    wkv_backend: str | None = None  # rwkv7.wkv backend of the blocks during fit; None: rwkv7.wkv's default


class HostReadback:
    """Device values copied to host memory without stopping the host: `put` queues the copy, `take` waits for
    that copy alone, not for the work queued after it (a plain `.item()` would wait for everything queued).

    >>> rb = HostReadback(torch.device("cpu"), 2)
    >>> rb.put(torch.tensor([3.5, 1.0]))
    >>> rb.take()
    [3.5, 1.0]
    """

    def __init__(self, device: torch.device, size: int) -> None:
        cuda = device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.float64, pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None

    def put(self, values: Tensor) -> None:
        self._host.copy_(values, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def take(self) -> list[float]:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()


@dataclass(frozen=True)
class _Unread:
    """An optimizer step whose loss is still on its way back from the device."""

    step: int
    epoch: int
    lr: float
    targets: int
    tokens: int
    slots: int


def lr_at(step: int, s: OptimSettings) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to lr_init, then cosine to lr_final.

    >>> s = OptimSettings(lr_init=1.0, lr_final=0.1, total_steps=11, warmup_steps=1)
    >>> [round(lr_at(i, s), 3) for i in (0, 1, 6, 11)]
    [1.0, 1.0, 0.55, 0.1]
    """
    if step < s.warmup_steps:
        return s.lr_init * (step + 1) / s.warmup_steps
    span = max(1, s.total_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.lr_final + 0.5 * (s.lr_init - s.lr_final) * (1.0 + math.cos(math.pi * progress))


def _ce_and_grad(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Σ weights · cross-entropy of `logits [M, V]` against `targets [M]` (float32), and its gradient with respect
    to the logits (in their dtype). Written in place on one float32 copy of the logits: the least memory eagerly."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, targets[:, None]).squeeze(1)) * weights).sum()
    x.sub_(lse[:, None]).exp_()  # softmax
    x.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    return loss, x.mul_(weights[:, None]).to(logits.dtype)


def _ce_and_grad_fusable(logits: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """`_ce_and_grad` for torch.compile: the gradient as one elementwise expression of the logits, which Inductor
    writes in a single pass after the log-sum-exp (a scatter into a float32 copy would have it materialize that
    copy); eagerly it would hold several `[M, V]` float32 temporaries."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    hit = torch.arange(x.shape[1], device=x.device) == targets[:, None]
    loss = ((lse.squeeze(1) - x.gather(1, targets[:, None]).squeeze(1)) * weights).sum()
    grad = (torch.exp(x - lse) - hit.float()) * weights[:, None]
    return loss, grad.to(logits.dtype)


class _HeadCrossEntropy(torch.autograd.Function):
    """Σ weights · cross-entropy of `head(hidden)` against `targets`, `chunk` rows at a time, with the gradient for
    `hidden` computed in forward: each chunk's logits exist once, for the loss and their gradient together, and
    backward only scales the saved `[M, C]` gradient (no second pass through the head)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, targets: Tensor, weights: Tensor, head: nn.Module, chunk: int,  # type: ignore[override]
                ce_and_grad: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            with torch.enable_grad():
                rows = hidden[part].detach().requires_grad_(dhidden is not None)
                logits = head(rows)
            loss, dlogits = ce_and_grad(logits.detach(), targets[part], weights[part])
            total += loss
            if dhidden is not None:
                dhidden[part] = torch.autograd.grad(logits, rows, dlogits)[0]
        ctx.save_for_backward(dhidden)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (dhidden,) = ctx.saved_tensors
        return dhidden * grad, None, None, None, None, None


def _chunk_kl(head: nn.Module, hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """Summed KL(teacher ‖ student) over rows of `hidden, teacher_hidden [M, C]`."""
    student = F.log_softmax(head(hidden).float(), dim=-1)
    teacher = F.log_softmax(head(teacher_hidden).float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def _chunked_head_loss(fn: Callable[..., Tensor], head: nn.Module, chunk: int, *rows: Tensor) -> Tensor:
    """Σ of `fn(head, *parts)` over consecutive `chunk`-row parts of `rows` (aligned on dim 0). Each part is
    recomputed in backward, so only one part's `[chunk, V]` logits exist at a time."""
    total = rows[0].new_zeros((), dtype=torch.float32)
    for start in range(0, rows[0].shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(fn, head, *(r[part] for r in rows), use_reentrant=False, preserve_rng_state=False)
    return total


def _stages(block: nn.Module, keep_ffn: bool = False) -> tuple[tuple[nn.Module, str, bool], ...]:
    """The cheap stages of a block (`rwkv7.model.Block.forward`), all its elementwise work, norms and the WKV:
    `(owner, method, recomputed under selective checkpointing)`. `att_inputs` is not recomputed: its backward needs
    only its input x, which `ffn_hidden`'s checkpoint keeps anyway, and LN1's per-row statistics (the mixes are
    products with frozen parameters), so recomputing it would save no memory and cost a pass over six [B, T, C]
    outputs. `keep_ffn`: `ffn_hidden` keeps its activations too (mostly the FFN key's output, 4 [B, T, C] tensors),
    sparing the recompute of the block's largest product."""
    return (block, "att_inputs", False), (block.att, "recur", True), (block, "ffn_hidden", not keep_ffn)


def wrap_blocks(model: RWKV7, compile: str | None = None, grad_cp: GradCpPolicy | None = None, keep: int = 0,
                keep_ffn: int = 0) -> None:
    """Wrap the blocks of `model` in place for training (instance attributes; `unwrap_blocks` undoes it).

    `compile` (a torch.compile backend): the WKV kernel is opaque to the compiler (`rwkv7.wkv.wkv7`), so a block
    compiles to two graphs around it (norms, token shift with its restarts and mixing before; GroupNorm, bonus,
    output, residual and the channel mix after). All blocks but the first share their graphs (same code, same
    shapes), so compiling costs about two blocks' worth, not L; the cache limit is raised so the per-instance
    guards never fall back to eager. Blocks under selective checkpointing compile each cheap stage on its own
    instead (the projections between the stages stay eager: cuBLAS either way).
    `grad_cp` (a policy of GRAD_CP_POLICIES), for all blocks but the last `keep`: "full" recomputes each block's
    activations in backward (non-reentrant checkpointing: only the block's input stays); "selective" recomputes
    only the cheap stages that would otherwise keep large activations (`_stages`: gates, WKV, GroupNorm, LN2, the
    FFN's key and squared ReLU) and keeps the outputs of the attention's frozen projections (r, k, v, output and
    the gates' low-rank halves; the projections themselves need no activations for their backward). The backward
    then repeats only the FFN key among the large products (1/3 of a block's) instead of all but the FFN value
    (2/3), for about 4 more [B, T, C] tensors per block (1.5B, ctx 512 × 8 on an H200: +15 % tokens/s; BENCHMARKS.md).
    Under "selective", `keep_ffn` more blocks before the last `keep` recompute only `recur`: their FFN keeps its
    activations (~4 [B, T, C] tensors, mostly the FFN key product's output: 0.07 GB each, 0.24 ms less per step).
    """
    if grad_cp is not None and grad_cp not in GRAD_CP_POLICIES:
        raise ValueError(f"grad_cp policy must be one of {GRAD_CP_POLICIES}, got {grad_cp!r}")
    blocks = model.blocks
    if compile:
        dynamo = torch._dynamo.config
        dynamo.cache_size_limit = max(dynamo.cache_size_limit, 2 * len(blocks))
        if hasattr(dynamo, "accumulated_cache_size_limit"):
            dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 8 * len(blocks))
    for i, block in enumerate(blocks):
        policy = grad_cp if i < len(blocks) - keep else None
        keeps_ffn = i >= len(blocks) - keep - keep_ffn
        parts = _stages(block, keeps_ffn) if policy == "selective" else ((block, "forward", policy == "full"),)
        for owner, name, recompute in parts:
            if not (compile or recompute):
                continue
            fn = getattr(owner, name)
            if compile:
                fn = torch.compile(fn, backend=compile)
            if recompute:
                fn = functools.partial(checkpoint, fn, use_reentrant=False, preserve_rng_state=False)  # no randomness
            setattr(owner, name, fn)


def unwrap_blocks(model: RWKV7) -> None:
    """Undo `wrap_blocks`: every block runs its plain methods again."""
    for block in model.blocks:
        for owner, name, _ in ((block, "forward", False), *_stages(block)):
            owner.__dict__.pop(name, None)


class StateTuner(L.LightningModule):
    """Trains `state_wkv [L, H, N, N]` (one nn.Parameter, zeros at start) of a frozen RWKV-7.

    `sampler` (optional) is the training batch sampler; it is told how many batches to skip when a run
    resumes mid-epoch. `distill_prefix` (token ids) switches the loss to prompt distillation.
    """

    def __init__(self, model: RWKV7, optim: OptimSettings, sampler: BucketBatchSampler | None = None,
                 distill_prefix: list[int] | None = None, embedding_on_host: bool = False) -> None:
        super().__init__()
        cfg = model.config
        self.model = model.requires_grad_(False).eval()
        self.state_wkv = nn.Parameter(torch.zeros(cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size,
                                                  device=model.device, dtype=torch.float32))
        trainable = [p for p in self.parameters() if p.requires_grad]
        assert len(trainable) == 1 and trainable[0].numel() == cfg.n_layer * cfg.n_head * cfg.head_size ** 2
        self.optim = optim
        self.sampler = sampler
        self.distill_prefix = distill_prefix
        self.embedding_on_host = embedding_on_host
        self.strict_loading = False  # checkpoints carry the state only, not the frozen weights
        self.history: list[dict[str, Any]] = []
        self.register_buffer("last_good", self.state_wkv.detach().clone(), persistent=False)
        self._teacher: RWKVState | None = None
        self._graphed: GraphedLoss | None = None
        self._compiled: dict[Callable[..., Any], Callable[..., Any]] = {}  # head losses, during a fit
        self._batches_in_epoch = 0
        self._counts = dict.fromkeys(("targets", "tokens", "slots"), 0)  # of the optimizer step under way
        self._loss_sum: Tensor | None = None  # its summed loss, on the device
        self._unread: _Unread | None = None  # the last optimizer step, until `settle` reads its loss back
        self._readback: HostReadback | None = None
        self._step_t0 = 0.0

    def train(self, mode: bool = True) -> StateTuner:
        """Lightning switches modules to train mode; the frozen model stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def tuned_state(self) -> RWKVState:
        return RWKVState.from_wkv(self.state_wkv)

    def batch_loss(self, batch: Batch) -> tuple[Tensor, int]:
        """(summed loss over masked targets, number of masked targets) for one batch."""
        x = self.embedded(batch)
        hidden = self.model.hidden_states(x, self.tuned_state(), cu_seqlens=batch.cu_seqlens, starts=batch.starts)
        mask = batch.loss_mask
        rows = hidden[mask]
        n = rows.shape[0]
        if self.distill_prefix is None:
            targets = batch.targets[mask]
            return self._cross_entropy(rows, targets, torch.ones_like(targets, dtype=torch.float32)), n
        with torch.no_grad():
            teacher_hidden = self.model.hidden_states(x, self._teacher_state(), cu_seqlens=batch.cu_seqlens,
                                                          starts=batch.starts)
        kl = self._compiled.get(_chunk_kl, _chunk_kl)
        return _chunked_head_loss(kl, self.model.head, self.optim.loss_chunk, rows, teacher_hidden[mask]), n

    def dense_loss(self, state_wkv: Tensor, x: Tensor, targets: Tensor, weights: Tensor,
                   starts: Tensor | None = None, scored: Tensor | None = None) -> Tensor:
        """Summed cross-entropy over the `[B, T]` positions of embedded rows `x [B, T, C]`, weighted by
        `weights` (the loss mask as 0/1 floats): `batch_loss` without any data-dependent shape, so it can be
        captured in a CUDA graph. `starts`: rows of packed samples (`rwkv7.data.pack_rows_collate`). Without
        `scored` every position goes through the head (masked ones count zero); with `scored [K]` (flat
        positions) only those do, and `targets, weights` are `[K]` (see `graph_inputs`)."""
        hidden = self.model.hidden_states(x, RWKVState.from_wkv(state_wkv), starts=starts)
        hidden = hidden.flatten(0, 1)
        if scored is not None:
            hidden = hidden.index_select(0, scored)
        return self._cross_entropy(hidden, targets.flatten(), weights.flatten())

    def _cross_entropy(self, hidden: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
        """`_HeadCrossEntropy` through the model's head (with a compiled `_ce_and_grad_fusable` during a fit with
        `compile`: each chunk's bf16 logits are read for their log-sum-exp, then once more to write the gradient)."""
        ce_and_grad = self._compiled.get(_ce_and_grad, _ce_and_grad)
        return _HeadCrossEntropy.apply(hidden, targets, weights, self.model.head, self.optim.loss_chunk, ce_and_grad)

    def graph_inputs(self, batch: Batch) -> tuple[Tensor, ...]:
        """`dense_loss`'s inputs after the state for a padded or row-packed batch. Packed rows (`batch.scored`)
        send only their scored positions through the head: padding entries (−1) read position 0 at weight 0."""
        x = self.embedded(batch)
        if batch.starts is None:
            return x, batch.targets, batch.loss_mask.float()
        if batch.scored is None:
            return x, batch.targets, batch.loss_mask.float(), batch.starts
        keep = batch.scored.clamp(min=0)
        return x, batch.targets.flatten()[keep], (batch.scored >= 0).float(), batch.starts, keep

    def embedded(self, batch: Batch) -> Tensor:
        """The batch's embedding rows `[*tokens.shape, C]`: looked up before the transfer, or now."""
        return batch.embedded if batch.embedded is not None else self.model.embed(batch.tokens)

    def _teacher_state(self) -> RWKVState:
        if self._teacher is None:
            assert self.distill_prefix is not None
            prefix = torch.tensor([self.distill_prefix], device=self.model.device)
            with torch.no_grad():
                _, self._teacher = self.model(prefix)
        return self._teacher

    def graphed_loss(self, batch: Batch) -> tuple[Tensor, int]:
        """`batch_loss` of a padded or row-packed batch through the CUDA graph of its shape (captured on first
        sight)."""
        assert self._graphed is not None and batch.cu_seqlens is None and self.distill_prefix is None
        return self._graphed(self.state_wkv, *self.graph_inputs(batch)), batch.n_targets

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss_sum, n = self.graphed_loss(batch) if self._graphed is not None else self.batch_loss(batch)
        step_sum = loss_sum.detach()
        self._loss_sum = step_sum if self._loss_sum is None else self._loss_sum + step_sum
        self._batches_in_epoch += 1
        for key, value in (("targets", n), ("tokens", batch.n_real), ("slots", batch.tokens.numel())):
            self._counts[key] += value
        if self.history:  # the last step read back (a host value: logging a device one would wait for the GPU)
            self.log("loss", torch.tensor(self.history[-1]["loss"]), prog_bar=True, batch_size=batch.n_sequences)
        return loss_sum / max(n, 1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Settle the previous optimizer step, then queue this one's checks on the device: the loss and the state's
        gradient are finite, and if so the state that gave them becomes `last_good`."""
        self.settle()
        assert self._loss_sum is not None and self._readback is not None
        ok = torch.isfinite(self._loss_sum)
        if self.state_wkv.grad is not None:
            ok &= torch.isfinite(self.state_wkv.grad).all()
        self.last_good.copy_(torch.where(ok, self.state_wkv.detach(), self.last_good))
        self._readback.put(torch.stack((self._loss_sum.double(), ok.double())))
        self._unread = _Unread(step=self.global_step + 1, epoch=self.current_epoch + 1,
                               lr=optimizer.param_groups[0]["lr"], **self._counts)
        self._counts = dict.fromkeys(self._counts, 0)
        self._loss_sum = None

    def settle(self) -> None:
        """Read the last optimizer step's loss back and add its history row; a NaN/inf loss or gradient raises
        `NonFiniteLossError` with the last finite state. Waits for that step only (the host may be a step ahead)."""
        if self._unread is None:
            return
        assert self._readback is not None
        loss_sum, ok = self._readback.take()
        now = time.perf_counter()
        u, self._unread = self._unread, None
        if not ok:
            raise NonFiniteLossError(
                f"the loss or the state's gradient became NaN/inf at optimizer step {u.step} (epoch {u.epoch}); "
                "stopping. Lower lr_init or check the data; the last finite state is kept.", self.last_good.clone())
        seconds = max(now - self._step_t0, 1e-9)
        self.history.append({"step": u.step, "epoch": u.epoch, "loss": loss_sum / max(u.targets, 1), "lr": u.lr,
                             "tokens": u.tokens, "padded": u.slots - u.tokens, "seconds": seconds,
                             "tokens_per_s": u.tokens / seconds})
        self._step_t0 = now

    def on_train_end(self) -> None:
        self.settle()

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """On CUDA, the batch goes over from pinned host memory, so the copy does not wait for the GPU; with the
        embedding table on the host (`embedding_on_host`) the rows are looked up here, straight into pinned
        memory (a lookup on the GPU's tokens would read them back and wait for every step queued before). Packed
        rows for our chunked kernels are checked against the room they keep (`rwkv7.wkv_chunk.check_packed_rows`)."""
        if batch.starts is not None and self.optim.wkv_backend == "chunk":
            from rwkv7.wkv_chunk import check_packed_rows

            check_packed_rows(batch.starts)
        if self.model.device.type != "cuda":
            return batch
        pinned = {f.name: t.pin_memory() for f in fields(batch) if isinstance(t := getattr(batch, f.name), Tensor)}
        table = self.model.emb.weight
        if table.device.type == "cpu":
            rows = torch.empty((batch.tokens.numel(), table.shape[1]), dtype=table.dtype, pin_memory=True)
            torch.index_select(table, 0, batch.tokens.flatten(), out=rows)
            pinned["embedded"] = rows.view(*batch.tokens.shape, -1)
        return replace(batch, **pinned)

    def on_train_epoch_start(self) -> None:
        self._batches_in_epoch = 0

    def on_train_start(self) -> None:
        self._step_t0 = time.perf_counter()

    def on_fit_start(self) -> None:
        """Speed/memory trade-offs that wrap the frozen model's blocks for the duration of fit.

        `embedding_on_host`: the token embedding table (`V × C`, 0.27 GB at 1.5B) stays in host memory, where
        lookups are cheap; only the looked-up rows travel to the GPU.
        `compile`: each block goes through torch.compile (`wrap_blocks`; the WKV kernel stays outside the
        graphs), which fuses the norms, token shifts and elementwise work into fewer kernels (with CUDA graphs
        +37 % tokens/s on a 1.5B step on an H200 when only the mixers were compiled; BENCHMARKS.md), and so do
        the head's loss functions.
        `grad_cp`: each block recomputes activations in backward (non-reentrant checkpointing), but for the
        last `grad_cp_keep`, which keep them (a trade of memory for speed between the two extremes);
        `grad_cp_policy` says what is recomputed: the whole block ("full") or its cheap stages ("selective"), and
        `grad_cp_keep_ffn` blocks before the kept ones recompute only their attention's cheap stages.
        `cuda_graphs`: training batches (fixed shapes: padded or row-packed) run through `dense_loss` captured in a
        CUDA graph per shape (`rwkv7.graphs`), so the host no longer launches every kernel of every step.
        `wkv_backend`: the WKV kernel every block uses (e.g. "chunk", which also restarts packed rows).
        All are undone in on_fit_end, so the model class stays free of training concerns.
        """
        self._readback = HostReadback(self.model.device, 2)
        for block in self.model.blocks:
            block.att.wkv_backend = self.optim.wkv_backend
        if self.embedding_on_host and self.model.device.type == "cuda":
            self.model.emb.to("cpu")  # Lightning moved the whole module to the GPU; the table goes back
            torch.cuda.empty_cache()
        wrap_blocks(self.model, self.optim.compile, self.optim.grad_cp_policy if self.optim.grad_cp else None,
                    self.optim.grad_cp_keep, self.optim.grad_cp_keep_ffn)
        if self.optim.compile:
            self._compiled = {_ce_and_grad: torch.compile(_ce_and_grad_fusable, backend=self.optim.compile),
                              _chunk_kl: torch.compile(_chunk_kl, backend=self.optim.compile)}
        if self.optim.cuda_graphs:
            if self.model.device.type != "cuda" or self.distill_prefix is not None:
                raise ValueError("cuda_graphs needs a CUDA device and the cross-entropy loss (no distill_prefix)")
            self._graphed = GraphedLoss(self.dense_loss)

    def on_fit_end(self) -> None:
        self._graphed = None
        self._compiled = {}
        unwrap_blocks(self.model)
        for block in self.model.blocks:
            block.att.wkv_backend = None
        self.model.emb.to(self.model.device)

    def configure_optimizers(self) -> dict[str, Any]:
        s = self.optim
        optimizer = torch.optim.AdamW([self.state_wkv], lr=s.lr_init, betas=(s.beta1, s.beta2), eps=s.adam_eps,
                                      weight_decay=s.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, s) / s.lr_init)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.settle()  # the history saved must hold every step taken
        checkpoint["state_dict"] = {"state_wkv": self.state_wkv.detach().cpu()}
        checkpoint[CKPT_KEY] = {"history": self.history, "batches_in_epoch": self._batches_in_epoch,
                                "epoch": self.current_epoch}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(CKPT_KEY, {})
        self.history = list(extra.get("history", []))
        self._batches_in_epoch = int(extra.get("batches_in_epoch", 0))
        if self.sampler is not None and self._batches_in_epoch < len(self.sampler):
            self.sampler.skip(self._batches_in_epoch)
