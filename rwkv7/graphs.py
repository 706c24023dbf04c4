"""CUDA graphs for the training step: each batch shape is captured once, then every step is two replays.

Why: a 1.5B state-tuning step launches ~10 k kernels (24 blocks, each a few dozen elementwise ops, the matmuls,
fla's Triton kernels, and all of it again when activation checkpointing recomputes in backward). Launched one
by one from Python they cost more host time than the GPU needs to run them (docs/design.md, BENCHMARKS.md); a
replayed graph launches them all at once.

Boundary: a loss function `fn(state, *inputs) -> loss` whose tensors have fixed shapes (no data-dependent
indexing, no host reads) in; a callable with the same signature out, differentiable in `state` through the
captured backward (`torch.cuda.make_graphed_callables`). Graphs of all shapes share one memory
pool: a step replays forward and backward of one shape before the next shape runs, so what one capture
freed is free for the others. Arguments are copied into the captured buffers on each call (a device copy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

LossFn = Callable[..., Tensor]  # fn(state, *inputs) -> scalar loss
# Eager runs before a capture: the first compiles/autotunes every kernel (Triton, torch.compile), the second
# runs them warm, so nothing lazy happens while capturing.
WARMUP_ITERS = 2
log = logging.getLogger(__name__)


class OwnGradient(torch.autograd.Function):
    """Identity whose backward hands on a copy of the gradient.

    A graphed backward returns its captured output buffer, which autograd would otherwise install as the
    parameter's `.grad` itself; the next replay then overwrites it, so accumulating two micro-batches would give
    twice the second one's gradient instead of their sum.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.clone()


class CaptureError(RuntimeError):
    """A batch shape could not be captured (out of memory, or an operation that graphs do not allow)."""


class GraphedLoss:
    """`fn(state, *inputs)` captured per shape of the inputs on first use; `shapes` lists the captured ones."""

    def __init__(self, fn: LossFn, warmup_iters: int = WARMUP_ITERS) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.fn = fn
        self.warmup_iters = warmup_iters
        self._pool = torch.cuda.graph_pool_handle()
        self._graphed: dict[tuple[tuple[int, ...], ...], LossFn] = {}

    @property
    def shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        return list(self._graphed)

    def __call__(self, state: Tensor, *inputs: Tensor) -> Tensor:
        key = tuple(tuple(x.shape) for x in inputs)
        graphed = self._graphed.get(key)
        if graphed is None:
            try:
                graphed = self._graphed[key] = self._capture(state, *inputs)
            except RuntimeError as e:  # CUDA errors (torch.AcceleratorError, out of memory) included
                raise CaptureError(f"capturing a CUDA graph for batches of shape {tuple(inputs[0].shape[:2])} "
                                   f"failed ({type(e).__name__}: {e}); train with cuda_graphs: off "
                                   "(--cuda-graphs off) to run without graphs") from e
        return graphed(OwnGradient.apply(state), *inputs)

    def _capture(self, state: Tensor, *inputs: Tensor) -> LossFn:
        """Warm up eagerly, hand the warm-up's cached blocks back, then capture forward and backward.

        The captured input buffers are private copies (the caller's first batch is not pinned), except the
        state: the capture reads a detached alias of its storage (AdamW updates it in place, and a replay sees
        the new values) and leaves the parameter's own gradient accumulator out of the capture, so a live
        autograd graph elsewhere (a previous step's loss, DDP's hooks) cannot leak into it.
        """
        t0 = time.perf_counter()
        sample = (state.detach().requires_grad_(), *(x.detach().clone() for x in inputs))
        for _ in range(self.warmup_iters):
            torch.autograd.grad(self.fn(*sample), sample[0])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # else the eager warm-up's blocks stay cached next to the graph's pool
        graphed = torch.cuda.make_graphed_callables(self.fn, sample, num_warmup_iters=0, pool=self._pool)
        log.info("captured a CUDA graph for batches of shape %s (shape %d, %.1f s)", tuple(inputs[0].shape[:2]),
                 len(self._graphed) + 1, time.perf_counter() - t0)
        return graphed
