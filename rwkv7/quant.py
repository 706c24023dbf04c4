"""Frozen Linear weights kept in int8 or nf4 (bitsandbytes) while the state trains: less memory, same loss.

Boundary: an `RWKV7` in, the same model out with some `nn.Linear`s replaced by `QuantLinear`. Only weights
are quantized (activations and the WKV state stay bf16 / float32): every call dequantizes the weight to the
compute dtype, multiplies, and drops the copy; backward dequantizes again (nothing weight-sized is saved for
backward), and no weight gradient is ever computed.

Precisions (`PRECISIONS`): "bf16" leaves the model as loaded; "int8" stores each weight row as int8 with an
absmax scale per output row (bitsandbytes `int8_vectorwise_quant`); "nf4" stores 4-bit NormalFloat codes in
blocks of `NF4_BLOCK` with double-quantized scales (bitsandbytes `quantize_4bit`). Quantized layers
(`QUANT_TARGETS`): attention receptance/key/value/output and FFN key/value of every block, plus the head
when `include_head`. The embedding and the small low-rank/vector parameters stay as they are.

bitsandbytes is used on CUDA only: asking for int8/nf4 on a CPU run raises `QuantizationError` (no silent
fallback). `reference_codec` is a plain-torch twin of both formats, used by the CPU tests to exercise
`QuantLinear` and by the GPU tests as the oracle bitsandbytes is checked against.

>>> check_precision("nf4", torch.device("cpu"))  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
QuantizationError: precision 'nf4' needs a CUDA GPU (bitsandbytes); this run is on cpu: use precision 'bf16' there
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Precision = Literal["bf16", "int8", "nf4"]
PRECISIONS: tuple[str, ...] = ("bf16", "int8", "nf4")
QUANT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
NF4_BLOCK = 64
INT8_MAX = 127
# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


class QuantizationError(RuntimeError):
    """A quantized precision cannot be used here (no CUDA, bitsandbytes missing, unknown precision)."""


@dataclass(frozen=True)
class Codec:
    """How one weight matrix `[out, in]` is stored: `quantize(w) -> payload`, `dequantize(payload, dtype) -> w`."""

    name: str
    quantize: Callable[[Tensor], Any]
    dequantize: Callable[[Any, torch.dtype], Tensor]
    nbytes: Callable[[Any], int]


def check_precision(precision: str, device: torch.device) -> None:
    """Raise QuantizationError unless `precision` is known and can run on `device`."""
    if precision not in PRECISIONS:
        raise QuantizationError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision != "bf16" and device.type != "cuda":
        raise QuantizationError(f"precision {precision!r} needs a CUDA GPU (bitsandbytes); this run is on "
                                f"{device.type}: use precision 'bf16' there")


def bnb_codec(precision: str) -> Codec:
    """bitsandbytes storage for "int8" / "nf4" (CUDA tensors); QuantizationError if bitsandbytes is missing."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise QuantizationError(f"precision {precision!r} needs bitsandbytes (pip install bitsandbytes): {e}") from e
    if precision == "int8":
        def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
            codes, scales, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
            return codes, scales

        def dequantize(payload: tuple[Tensor, Tensor], dtype: torch.dtype) -> Tensor:
            codes, scales = payload
            return (codes.to(dtype) * (scales / INT8_MAX).to(dtype)[:, None])

        return Codec("bnb-int8", quantize, dequantize, lambda p: _tensor_bytes(p))
    if precision == "nf4":
        def quantize4(w: Tensor) -> tuple[Tensor, Any]:
            return bnbf.quantize_4bit(w, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")

        def dequantize4(payload: tuple[Tensor, Any], dtype: torch.dtype) -> Tensor:
            codes, state = payload
            return bnbf.dequantize_4bit(codes, state, quant_type="nf4").to(dtype)

        def nbytes4(payload: tuple[Tensor, Any]) -> int:
            codes, state = payload
            parts = [codes, state.absmax, getattr(state.state2, "absmax", None), getattr(state.state2, "code", None)]
            return _tensor_bytes(parts)

        return Codec("bnb-nf4", quantize4, dequantize4, nbytes4)
    raise QuantizationError(f"no bitsandbytes codec for precision {precision!r}; quantized ones: int8, nf4")


def reference_codec(precision: str) -> Codec:
    """Plain-torch storage with the same formats (single-level nf4 scales); runs on any device."""
    if precision == "int8":
        def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
            scales = w.float().abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            codes = torch.round(w.float() * (INT8_MAX / scales[:, None])).to(torch.int8)
            return codes, scales

        def dequantize(payload: tuple[Tensor, Tensor], dtype: torch.dtype) -> Tensor:
            codes, scales = payload
            return (codes.float() * (scales / INT8_MAX)[:, None]).to(dtype)

        return Codec("torch-int8", quantize, dequantize, lambda p: _tensor_bytes(p))
    if precision == "nf4":
        def quantize4(w: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
            if w.numel() % NF4_BLOCK:
                raise QuantizationError(f"nf4 needs a weight size divisible by {NF4_BLOCK}, got {tuple(w.shape)}")
            blocks = w.float().reshape(-1, NF4_BLOCK)
            absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            levels = torch.tensor(NF4_LEVELS, device=w.device)
            codes = (blocks / absmax[:, None]).unsqueeze(-1).sub(levels).abs().argmin(dim=-1).to(torch.uint8)
            return codes, absmax, tuple(w.shape)

        def dequantize4(payload: tuple[Tensor, Tensor, tuple[int, int]], dtype: torch.dtype) -> Tensor:
            codes, absmax, shape = payload
            levels = torch.tensor(NF4_LEVELS, device=codes.device)
            return (levels[codes.long()] * absmax[:, None]).reshape(shape).to(dtype)

        def nbytes4(payload: tuple[Tensor, Tensor, tuple[int, int]]) -> int:
            codes, absmax, _ = payload
            return codes.numel() // 2 + absmax.numel() * absmax.element_size()  # two codes per byte when packed

        return Codec("torch-nf4", quantize4, dequantize4, nbytes4)
    raise QuantizationError(f"no reference codec for precision {precision!r}; quantized ones: int8, nf4")


def _tensor_bytes(parts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in parts if isinstance(t, Tensor))


class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ with W dequantized on the fly in forward and again in backward; no grad for W."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: QuantLinear) -> Tensor:
        w = layer.weight_dequantized()
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        return F.linear(x.to(w.dtype), w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.weight_dequantized()
        return (grad.to(w.dtype) @ w).to(ctx.x_dtype), None


class QuantLinear(nn.Module):
    """A frozen, bias-free Linear `[out, in]` stored by a `Codec`; computes in `compute_dtype`.

    The payload is a plain attribute (not a parameter or buffer): it lives on the device it was quantized on,
    is not part of `state_dict()`, and `module.to(...)` leaves it alone.
    """

    def __init__(self, weight: Tensor, codec: Codec, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.codec = codec
        self.compute_dtype = compute_dtype
        self.payload = codec.quantize(weight.detach())

    def weight_dequantized(self) -> Tensor:
        return self.codec.dequantize(self.payload, self.compute_dtype)

    @property
    def nbytes(self) -> int:
        return self.codec.nbytes(self.payload)

    def forward(self, x: Tensor) -> Tensor:
        return _DequantLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, codec={self.codec.name}"


def quant_targets(model: nn.Module, include_head: bool = False) -> list[str]:
    """Dotted names of the Linear modules that `quantize_model` replaces, in model order."""
    names = [f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in QUANT_TARGETS]
    return names + (["head"] if include_head else [])


def quantize_model(model: nn.Module, precision: str, device: str | torch.device | None = None, *,
                   include_head: bool = False, codec: Codec | None = None) -> dict[str, Any]:
    """Replace the target Linears of `model` (an RWKV7) by QuantLinear in place; returns size statistics.

    `device` (default: the model's) is where the quantized weights and the rest of the model end up: a model
    loaded on the CPU is quantized one weight at a time on the GPU, so the full-precision model never sits
    there. `codec` None means bitsandbytes, which needs `device` to be CUDA (QuantizationError otherwise);
    tests pass `reference_codec(...)` to run the same code on CPU. "bf16" only moves the model.
    Returns {"precision", "layers", "weight_bytes_before", "weight_bytes_after"} over the replaced layers.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if codec is None:
        check_precision(precision, device)
    stats = {"precision": precision, "layers": 0, "weight_bytes_before": 0, "weight_bytes_after": 0}
    if precision != "bf16":
        codec = codec or bnb_codec(precision)
        for name in quant_targets(model, include_head):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, attr)
            if not isinstance(linear, nn.Linear) or linear.bias is not None:
                raise QuantizationError(f"{name}: expected a bias-free nn.Linear, got {type(linear).__name__}")
            weight = linear.weight.detach()
            quantized = QuantLinear(weight.to(device), codec, weight.dtype)
            stats["layers"] += 1
            stats["weight_bytes_before"] += weight.numel() * weight.element_size()
            stats["weight_bytes_after"] += quantized.nbytes
            setattr(parent, attr, quantized)
            del linear, weight
    model.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stats
