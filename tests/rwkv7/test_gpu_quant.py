"""bitsandbytes int8/nf4 on CUDA against the torch reference codec, and a quantized model training step (GPU only).

Run on the GPU machine: `python3 -m pytest -m gpu tests/rwkv7/test_gpu_quant.py` (after `source bench/gpu-env.sh`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkv7.checkpoint import inspect_checkpoint, random_checkpoint
from rwkv7.model import build_model
from rwkv7.quant import QuantLinear, bnb_codec, quant_targets, quantize_model, reference_codec
from rwkv7.state import RWKVState

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and bitsandbytes")]


@pytest.fixture(autouse=True)
def _needs_bnb() -> None:
    pytest.importorskip("bitsandbytes")


def weight(rows: int = 256, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(rows, cols, generator=g, device="cuda") / cols ** 0.5).to(torch.bfloat16)


def test_bnb_int8_equals_the_reference_rowwise_absmax_codes() -> None:
    w = weight()
    bnb, ref = bnb_codec("int8"), reference_codec("int8")
    got, want = bnb.dequantize(bnb.quantize(w), torch.float32), ref.dequantize(ref.quantize(w), torch.float32)
    # bnb rounds through float16 first; codes may differ by one step where a value sits on a rounding edge
    step = w.float().abs().amax(dim=1, keepdim=True) / 127
    assert ((got - want).abs() <= step * 1.01).all()
    assert ((got - want).abs() > step * 0.01).float().mean() < 0.01
    assert bnb.nbytes(bnb.quantize(w)) == w.numel() + w.shape[0] * 4


def test_bnb_nf4_is_as_close_to_the_weight_as_the_reference() -> None:
    w = weight(seed=1)
    bnb, ref = bnb_codec("nf4"), reference_codec("nf4")
    err_bnb = (bnb.dequantize(bnb.quantize(w), torch.float32) - w.float()).norm() / w.float().norm()
    err_ref = (ref.dequantize(ref.quantize(w), torch.float32) - w.float()).norm() / w.float().norm()
    assert err_bnb < 0.12 and abs(err_bnb - err_ref) < 0.01
    assert bnb.nbytes(bnb.quantize(w)) < 0.53 * w.numel()  # 0.5 byte per weight + double-quantized block scales


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quant_linear_under_autocast_gives_bf16_and_input_grads(precision: str) -> None:
    layer = QuantLinear(weight(), bnb_codec(precision), torch.bfloat16)
    x = torch.randn(4, 512, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    w = layer.weight_dequantized().float()
    torch.testing.assert_close(x.grad, w.sum(dim=0).expand_as(x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), F.linear(x.detach(), w), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_model_quantized_from_host_memory_trains_its_state_on_the_gpu(precision: str) -> None:
    sd = random_checkpoint(n_layer=2, n_embd=256, vocab_size=1000, seed=0, dtype=torch.bfloat16)
    cfg = inspect_checkpoint(sd)
    full = build_model(sd, cfg, device="cuda")
    model = build_model(sd, cfg, device="cpu", dtype=torch.bfloat16)
    stats = quantize_model(model, precision, "cuda")
    assert stats["layers"] == 12 and all(isinstance(model.get_submodule(n), QuantLinear) for n in quant_targets(model))
    assert model.emb.weight.device.type == "cuda"
    tokens = torch.randint(0, 1000, (2, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    grads, logits = [], []
    for m in (model, full):
        state = torch.zeros(2, 4, 64, 64, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = m(tokens, RWKVState.from_wkv(state))
            loss = F.cross_entropy(out.float().flatten(0, 1)[:-1], tokens.flatten()[1:])
        loss.backward()
        grads.append(state.grad)
        logits.append(out.float().detach())
    limit = 0.05 if precision == "int8" else 0.3
    assert (logits[0] - logits[1]).norm() / logits[1].norm() < limit
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 2 * limit
