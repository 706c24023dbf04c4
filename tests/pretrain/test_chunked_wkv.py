"""The chunked WKV-7 used for pretraining computes the reference recurrence: outputs, final state, gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import rwkv7.model
from rwkv7.wkv import wkv7_reference



@pytest.fixture(scope="module")
def chunked(script: Callable[[str], ModuleType]) -> ModuleType:
    return script("chunked_wkv")


def make_inputs(B: int, T: int, H: int, seed: int) -> list[torch.Tensor]:
    """Model-like inputs: unit-norm κ, a = −κ, b = κ·iclr, log decay in (−e^−½, 0), a nonzero initial state."""
    g = torch.Generator().manual_seed(seed)
    N = 64
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    kappa = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g)
    log_decay = -math.exp(-0.5) * torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    state = 0.1 * torch.randn(B, H, N, N, generator=g)
    return [x.requires_grad_() for x in (r, log_decay, 0.3 * k, v, -kappa, kappa * iclr, state)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("T", "chunk"), [(32, 8), (24, 8), (20, 8)])
def test_matches_reference_values_and_gradients(chunked: ModuleType, T: int, chunk: int) -> None:
    xs = make_inputs(2, T, 2, seed=T)
    out_ref, final_ref = wkv7_reference(*xs)
    (out_ref.square().sum() + final_ref.sum()).backward()
    grads_ref = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    out, final = chunked.wkv7_chunked(*xs, chunk=chunk)
    (out.square().sum() + final.sum()).backward()
    assert rel(out, out_ref) < 1e-5 and rel(final, final_ref) < 1e-5
    for x, g_ref in zip(xs, grads_ref, strict=True):
        assert rel(x.grad, g_ref) < 1e-4


def test_swaps_the_model_kernel_and_restores_it(chunked: ModuleType) -> None:
    original = rwkv7.model.wkv7
    with chunked.use_chunked_wkv():
        assert rwkv7.model.wkv7 is not original
        with pytest.raises(ValueError, match="cu_seqlens"):
            rwkv7.model.wkv7(*make_inputs(1, 4, 1, 0), cu_seqlens=torch.tensor([0, 2, 4]))
    assert rwkv7.model.wkv7 is original
