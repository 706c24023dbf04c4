"""BlinkDL RWKV-7 (x070) checkpoint files: read, validate, write, and make random ones.

Boundary: tensors and files only; knows nothing of `nn.Module`. A checkpoint is the flat state dict that
RWKV-LM saves (`rwkv7-g1*.pth`): keys `emb.weight`, `blocks.{i}.att.*`, `blocks.{i}.ffn.*`, `ln_out.*`,
`head.weight` (layout in ../shared/docs/rwkv7-facts.md §1). Every dimension is read from the tensors:
vocab V and width C from `emb.weight [V, C]`, heads H and head size N from `blocks.0.att.r_k [H, N]`, the
layer count from the block indices, and the low-rank widths D from `w1/a1/v1/g1 [C, D]`.

>>> sd = random_checkpoint(n_layer=2, n_embd=128, vocab_size=1000)
>>> inspect_checkpoint(sd).n_head
2
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rwkv7.atomic import save_torch

HEAD_SIZE = 64
WORLD_VOCAB_SIZE = 65536
# Keys that only older RWKV generations (4, 5, 6) have in their attention blocks.
OLDER_RWKV_KEY_PARTS = ("time_mix", "time_maa", "time_decay", "time_faaaa", "time_first")
LORA_NAMES = ("w", "a", "v", "g")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_KEYS_SHOWN = 8


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist or is not a file."""


class CheckpointCorruptError(CheckpointError):
    """The file exists but is not a readable torch checkpoint (truncated, corrupt, or holds objects)."""


class NotRWKV7Error(CheckpointError):
    """The file is a readable checkpoint but not an RWKV-7 (x070) model in BlinkDL layout."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes of an RWKV-7 model, all read from a checkpoint.

    `dims` holds the low-rank widths {"w": D_decay, "a": D_iclr, "v": D_value_residual, "g": D_gate};
    "v" is 0 for a one-layer model without block-0 v-params (value residual is unused in layer 0).
    """

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int = HEAD_SIZE
    vocab_size: int
    dims: dict[str, int] = field(default_factory=dict)


def default_dims(n_embd: int) -> dict[str, int]:
    """Low-rank widths RWKV-LM's x070 training code picks for width C (multiples of 32, at least 32).

    Only used to build random checkpoints; loading always reads D from the tensors.
    >>> default_dims(768)
    {'w': 64, 'a': 64, 'v': 32, 'g': 128}
    """

    def round32(x: float) -> int:
        return max(32, int(round(x / 32) * 32))

    root = math.sqrt(n_embd)
    return {"w": round32(1.8 * root), "a": round32(1.8 * root), "v": round32(1.3 * root),
            "g": round32(0.6 * n_embd**0.8)}


def _shown(keys: list[str]) -> str:
    more = f", … ({len(keys)} keys)" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(keys[:_KEYS_SHOWN]) + more


def expected_shapes(cfg: ModelConfig, block0_v: bool = False) -> dict[str, tuple[int, ...]]:
    """Every key of a BlinkDL x070 checkpoint with its shape (block-0 v0/v1/v2 only if `block0_v`)."""
    C, V, H, N, D = cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.head_size, cfg.dims
    vec = (1, 1, C)
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,),
                                          "blocks.0.ln0.bias": (C,)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for name in ("ln1", "ln2", "att.ln_x"):
            shapes[p + name + ".weight"] = (C,)
            shapes[p + name + ".bias"] = (C,)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            shapes[p + "att." + name] = vec
        lora = ("w", "a", "g") + (("v",) if i > 0 or block0_v else ())
        for name in lora:
            shapes[f"{p}att.{name}1"] = (C, D[name])
            shapes[f"{p}att.{name}2"] = (D[name], C)
        if i > 0 or block0_v:
            shapes[p + "att.v0"] = vec
        shapes[p + "att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[f"{p}att.{name}.weight"] = (C, C)
        shapes[p + "ffn.x_k"] = vec
        shapes[p + "ffn.key.weight"] = (4 * C, C)
        shapes[p + "ffn.value.weight"] = (C, 4 * C)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


def inspect_checkpoint(sd: object, source: str = "checkpoint") -> ModelConfig:
    """Validate a BlinkDL x070 state dict and return its shapes; `source` names the file in errors.

    Raises NotRWKV7Error for an older RWKV generation, a non-RWKV dict, a missing/unexpected key or a shape
    that disagrees with the rest of the file.
    """
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise NotRWKV7Error(f"{source}: not a state dict of tensors (found {type(sd).__name__})")
    keys = list(sd)
    older = [k for k in keys if any(part in k for part in OLDER_RWKV_KEY_PARTS)]
    if older:
        raise NotRWKV7Error(f"{source}: this is an older RWKV generation (RWKV-4/5/6), not RWKV-7 x070: "
                            f"found keys {_shown(older)}")
    needed = ("emb.weight", "head.weight", "blocks.0.att.r_k", "blocks.0.att.w1")
    if any(k not in sd for k in needed):
        raise NotRWKV7Error(f"{source}: not an RWKV-7 (x070) checkpoint: missing "
                            f"{[k for k in needed if k not in sd]}; found keys {_shown(keys)}")
    cfg = _config_from(sd, keys, source)
    block0_v = "blocks.0.att.v1" in sd
    want = expected_shapes(cfg, block0_v)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in keys if k not in want]
    if missing or unexpected:
        raise NotRWKV7Error(f"{source}: not the RWKV-7 x070 layout: missing keys [{_shown(missing)}], "
                            f"unexpected keys [{_shown(unexpected)}]")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {shape})" for k, shape in want.items()
             if tuple(sd[k].shape) != shape]
    if wrong:
        raise NotRWKV7Error(f"{source}: tensor shapes disagree with emb.weight/r_k/block 0: {_shown(wrong)}")
    return cfg


def _config_from(sd: dict[str, Tensor], keys: list[str], source: str) -> ModelConfig:
    V, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    if H * N != C:
        raise NotRWKV7Error(f"{source}: blocks.0.att.r_k is [{H}, {N}] but emb.weight has width {C} != {H}*{N}")
    layers = [int(m.group(1)) for k in keys if (m := _BLOCK_KEY.match(k))]
    n_layer = max(layers) + 1
    dims = {}
    for name in LORA_NAMES:
        layer = 1 if name == "v" and n_layer > 1 else 0
        key = f"blocks.{layer}.att.{name}1"
        dims[name] = int(sd[key].shape[1]) if key in sd else 0
    return ModelConfig(n_layer=n_layer, n_embd=int(C), n_head=int(H), head_size=int(N), vocab_size=int(V),
                       dims=dims)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], ModelConfig]:
    """Read and validate a BlinkDL `.pth` (memory-mapped, `weights_only=True`): (state dict, config).

    Tensors keep the file's dtype (released models are bf16); the caller casts.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: checkpoint file not found")
    sd = _torch_load(path)
    return sd, inspect_checkpoint(sd, source=str(path))


def _torch_load(path: Path) -> object:
    errors = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointCorruptError(f"{path}: refused to unpickle non-tensor objects (weights_only=True): "
                                     f"{str(e).splitlines()[0]}") from None
    except errors:
        pass
    try:  # legacy (non-zip) torch.save files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except errors as e:
        size = path.stat().st_size
        raise CheckpointCorruptError(f"{path}: cannot read this checkpoint ({size} bytes; truncated or not a "
                                     f"torch file?): {str(e).splitlines()[0]}") from None


def random_checkpoint(n_layer: int, n_embd: int, vocab_size: int = WORLD_VOCAB_SIZE, seed: int = 0,
                      block0_v: bool = True, dims: dict[str, int] | None = None,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Random-init weights in BlinkDL x070 layout, scaled so a tiny model gives varied, finite logits.

    Decays land in about (0.88, 0.999) at init (w0 in [-6.5, -1.5]); every vector parameter gets a little noise so
    parity tests exercise each term (a zero bias would hide a missing bias). Deterministic in `seed` and the
    device type (`device="cuda"` draws on the GPU, so benchmarks build multi-GB models without host copies).
    """
    if n_embd % HEAD_SIZE:
        raise ValueError(f"n_embd={n_embd} must be a multiple of the head size {HEAD_SIZE}")
    cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // HEAD_SIZE, vocab_size=vocab_size,
                      dims={**default_dims(n_embd), **(dims or {})})
    gen = torch.Generator(device=device).manual_seed(seed)
    C = n_embd

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> Tensor:
        return torch.randn(shape, generator=gen, device=device) * std + mean

    def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
        return torch.rand(shape, generator=gen, device=device) * (high - low) + low

    sd: dict[str, Tensor] = {}
    for key, shape in expected_shapes(cfg, block0_v).items():
        name = key.rsplit(".", 2)[-2] if key.endswith((".weight", ".bias")) else key.rsplit(".", 1)[-1]
        if key.endswith(".bias"):
            t = normal(shape, 0.1)
        elif name in ("ln0", "ln1", "ln2", "ln_x", "ln_out"):
            t = normal(shape, 0.1, 1.0)
        elif name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g") or key.endswith("ffn.x_k"):
            t = uniform(shape, 0.0, 1.0)
        elif name == "w0":
            t = torch.linspace(-6.5, -1.5, C, device=device).view(shape) + normal(shape, 0.1)
        elif name in ("a0", "k_a"):
            t = normal(shape, 0.2, 0.0 if name == "a0" else 1.0)
        elif name == "v0":
            t = normal(shape, 0.2, 1.0)
        elif name == "k_k":
            t = normal(shape, 0.1, 0.85)
        elif name == "r_k":
            t = normal(shape, 0.1, -0.04)
        elif name in ("w1", "a1", "v1", "g1", "w2", "a2", "v2", "g2"):
            t = normal(shape, (1.0 if name == "g2" else 0.2) / math.sqrt(shape[0]))
        elif name == "emb":
            t = normal(shape, 1.0)
        else:  # receptance/key/value/output, ffn key/value, head: [out, in]
            t = normal(shape, (1.0 if name in ("receptance", "key") else 0.5) / math.sqrt(shape[1]))
        sd[key] = t.to(dtype)
    return sd


def save_checkpoint(sd: dict[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Validate `sd` as x070 and write it atomically (CPU, contiguous tensors); equal tensors give equal bytes."""
    inspect_checkpoint(sd, source=str(path))
    save_torch({k: v.detach().cpu().contiguous() for k, v in sd.items()}, path)
