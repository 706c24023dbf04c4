"""rwkv7.quant on CPU: clear errors for int8/nf4 without CUDA, and QuantLinear's logic through the torch codec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkv7.checkpoint import inspect_checkpoint, random_checkpoint
from rwkv7.model import build_model
from rwkv7.quant import (NF4_LEVELS, QUANT_TARGETS, QuantizationError, QuantLinear, check_precision,
                         quant_targets, quantize_model, reference_codec)
from rwkv7.state import RWKVState
from rwkv7.tuning import _ce_and_grad, _HeadCrossEntropy
from rwkv7.train import TrainingError, TrainParams, train_state

VOCAB = 512


def tiny_model(n_layer: int = 2, n_embd: int = 128, seed: int = 0) -> torch.nn.Module:
    sd = random_checkpoint(n_layer=n_layer, n_embd=n_embd, vocab_size=VOCAB, seed=seed)
    return build_model(sd, inspect_checkpoint(sd))


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_precisions_are_a_clear_error_on_cpu(precision: str) -> None:
    check_precision("bf16", torch.device("cpu"))
    with pytest.raises(QuantizationError, match=f"precision '{precision}' needs a CUDA GPU.*use precision 'bf16'"):
        check_precision(precision, torch.device("cpu"))
    model = tiny_model()
    with pytest.raises(QuantizationError, match="needs a CUDA GPU"):
        quantize_model(model, precision)  # bitsandbytes path: refused on a CPU model, nothing replaced
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in quant_targets(model, include_head=True))


def test_unknown_precision_names_the_choices() -> None:
    with pytest.raises(QuantizationError, match=r"unknown precision 'fp8'.*'bf16', 'int8', 'nf4'"):
        check_precision("fp8", torch.device("cuda"))


def test_train_state_refuses_int8_on_cpu_before_training(tiny_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "User: hi\n\nAssistant: hello there"}) + "\n")
    params = TrainParams(precision="int8", device="cpu", max_steps=1, progress_bar=False)
    with pytest.raises(TrainingError, match="precision 'int8' needs a CUDA GPU"):
        train_state(tiny_path, data, tmp_path / "out", params)
    assert not (tmp_path / "out" / "state.pth").exists()


def test_reference_int8_rows_round_trip_within_half_a_step() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    codec = reference_codec("int8")
    codes, scales = codec.quantize(w)
    assert codes.dtype == torch.int8 and scales.shape == (64,)
    back = codec.dequantize((codes, scales), torch.float32)
    step = (w.abs().amax(dim=1, keepdim=True) / 127)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert codec.nbytes((codes, scales)) == 64 * 96 + 64 * 4


def test_reference_nf4_uses_the_sixteen_levels_per_block_of_64() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    codec = reference_codec("nf4")
    payload = codec.quantize(w)
    back = codec.dequantize(payload, torch.float32)
    blocks, back_blocks = w.reshape(-1, 64), back.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    # every value is a level times its block's absmax, and the nearest one
    ratio = back_blocks / absmax
    assert torch.isclose(ratio.unsqueeze(-1), levels, atol=1e-6).any(-1).all()
    nearest = (blocks / absmax).unsqueeze(-1).sub(levels).abs().min(-1).values
    assert torch.allclose((blocks / absmax - ratio).abs(), nearest, atol=1e-6)
    assert (back - w).norm() / w.norm() < 0.12
    with pytest.raises(QuantizationError, match="divisible by 64"):
        codec.quantize(torch.randn(3, 5))


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quant_linear_matches_linear_on_its_dequantized_weight_and_never_grads_the_weight(precision: str) -> None:
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)) / 8
    layer = QuantLinear(w, reference_codec(precision), torch.float32)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    w_deq = layer.weight_dequantized()
    y_ref = F.linear(x_ref, w_deq)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert list(layer.parameters()) == [] and layer.state_dict() == {}
    assert "codec=torch-" in repr(layer)


@pytest.mark.parametrize(("precision", "max_rel", "max_ratio"), [("int8", 0.05, 0.26), ("nf4", 0.35, 0.15)])
def test_quantized_model_stays_close_in_logits_and_state_gradient(precision: str, max_rel: float,
                                                                max_ratio: float) -> None:
    """Through the reference codec: targets replaced, logits near the full model, state gradient near too."""
    model, full = tiny_model(), tiny_model()
    stats = quantize_model(model, precision, "cpu", codec=reference_codec(precision))
    assert stats["layers"] == 2 * len(QUANT_TARGETS)
    assert stats["weight_bytes_after"] <= max_ratio * stats["weight_bytes_before"]
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in quant_targets(model))
    assert isinstance(model.head, torch.nn.Linear)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    grads, logits = [], []
    for m in (model, full):
        state = torch.zeros(2, 2, 64, 64, requires_grad=True)
        out, _ = m(tokens, RWKVState.from_wkv(state))
        F.cross_entropy(out.flatten(0, 1)[:-1], tokens.flatten()[1:]).backward()
        grads.append(state.grad)
        logits.append(out.detach())
    assert (logits[0] - logits[1]).norm() / logits[1].norm() < max_rel
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 2 * max_rel
    assert all(p.grad is None for p in model.parameters())


def test_quantize_model_can_include_the_head() -> None:
    model = tiny_model(n_layer=1)
    quantize_model(model, "int8", "cpu", include_head=True, codec=reference_codec("int8"))
    assert isinstance(model.head, QuantLinear)
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, VOCAB) and torch.isfinite(logits).all()
    # the trainer's cross-entropy differentiates whatever module the head is, in forward
    hidden = torch.randn(7, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    targets, weights = torch.arange(7) * 3 % VOCAB, torch.ones(7)
    grads = []
    for fused in (False, True):
        rows = hidden.clone().requires_grad_()
        loss = (_HeadCrossEntropy.apply(rows, targets, weights, model.head, 4, _ce_and_grad) if fused
                else F.cross_entropy(model.head(rows).float(), targets, reduction="sum"))
        loss.backward()
        grads.append(rows.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[0].abs().sum() > 0
