"""The recurrent state of RWKV-7 and the state files RWKV-Runner (and `rwkv` pip users) load.

Boundary: `RWKVState` is a plain named structure of tensors; `save_state` / `load_state` read and write files.

A state file is a `torch.save`d dict with exactly L keys `blocks.{i}.att.time_state`, each `[H, N, N]` in
[value, key] orientation, on CPU, nothing else (RWKV-Runner rejects extra keys and injects it with no
transpose). Everything else goes in a JSON sidecar `<stem>.json` next to it:

    {"format_version": 1, "kind": "statetune.rwkv7_state", "state_file": "state.pth",
     "base_model": {"file": "rwkv7-g1a-0.1b.pth", "sha256": "…", "n_layer": 12, "n_embd": 768, "n_head": 12,
                    "head_size": 64, "vocab_size": 65536} | null,
     "tokenizer": "rwkv_vocab_v20230424", "metadata": {…free-form, e.g. training params and metrics…}}

A bare file (no sidecar, e.g. from RWKV-PEFT) loads too, checked by its shapes only.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rwkv7.atomic import save_torch, write_json
from rwkv7.tokenizer import TOKENIZER_ID

if TYPE_CHECKING:
    from rwkv7.checkpoint import ModelConfig
    from rwkv7.model import RWKV7

STATE_FORMAT_VERSION = 1
STATE_KIND = "statetune.rwkv7_state"
_STATE_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")


class StateFileError(ValueError):
    """A state file (or its sidecar) is missing, unreadable, malformed, or made for another model."""


@dataclass
class RWKVState:
    """Recurrent state of every layer: `att_shift [L, B, C]`, `wkv [L, B, H, N, N]` ([value, key], float32),
    `ffn_shift [L, B, C]`. A batch-1 state broadcasts over any batch (`layers`)."""

    att_shift: Tensor
    wkv: Tensor
    ffn_shift: Tensor

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int = 1, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> RWKVState:
        """All-zero state; shifts in `dtype`, WKV always float32."""
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return cls(att_shift=torch.zeros(L, batch, C, device=device, dtype=dtype),
                   wkv=torch.zeros(L, batch, H, N, N, device=device, dtype=torch.float32),
                   ffn_shift=torch.zeros(L, batch, C, device=device, dtype=dtype))

    @classmethod
    def from_wkv(cls, wkv: Tensor) -> RWKVState:
        """Batch-1 state from per-layer WKV states `wkv [L, H, N, N]` with zero shifts (a tuned state).

        Differentiable: the result's `wkv` is a view of `wkv`, so a trainer can hold one
        `nn.Parameter [L, H, N, N]` and back-propagate into it (summed over the batch it broadcasts to).
        """
        if wkv.dim() != 4 or wkv.shape[-1] != wkv.shape[-2]:
            raise ValueError(f"wkv must be [L, H, N, N], got {tuple(wkv.shape)}")
        L, H, N, _ = wkv.shape
        shift = torch.zeros(L, 1, H * N, device=wkv.device, dtype=wkv.dtype)
        return cls(att_shift=shift, wkv=wkv.unsqueeze(1), ffn_shift=shift)

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    def layers(self, batch: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Each layer's `(att_shift [batch, C], wkv [batch, H, N, N], ffn_shift [batch, C])`, broadcast views of a
        batch-1 state. One `unbind` per tensor, because its backward stacks the layers' gradients once, where
        indexing `wkv[i]` layer by layer would have autograd add L zero-filled `[L, batch, H, N, N]` gradients
        (1.5B, batch 8: 100 MB each, ~2 ms of a 87 ms step); each layer sums its gradient over the batch first."""
        if self.batch_size not in (1, batch):
            raise ValueError(f"state has batch {self.batch_size}; cannot use it for batch {batch}")
        return [(a.expand(batch, -1), w.expand(batch, -1, -1, -1), f.expand(batch, -1))
                for a, w, f in zip(self.att_shift.unbind(0), self.wkv.unbind(0), self.ffn_shift.unbind(0), strict=True)]

    def detach(self) -> RWKVState:
        return RWKVState(self.att_shift.detach(), self.wkv.detach(), self.ffn_shift.detach())

    def clone(self) -> RWKVState:
        return RWKVState(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())

    def to(self, device: str | torch.device) -> RWKVState:
        return RWKVState(self.att_shift.to(device), self.wkv.to(device), self.ffn_shift.to(device))


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """`runs/train/state.pth` → `runs/train/state.json`."""
    return Path(path).with_suffix(".json")


def base_model_info(model: RWKV7) -> dict[str, Any]:
    """What a sidecar records about the model a state was trained for (hashes its file once)."""
    cfg = model.config
    return {"file": model.source.name if model.source else None, "sha256": model.source_sha256(),
            "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "head_size": cfg.head_size,
            "vocab_size": cfg.vocab_size}


def save_state(path: str | os.PathLike[str], wkv: Tensor, meta: dict[str, Any] | None = None, *,
               model: RWKV7 | None = None) -> Path:
    """Write `wkv [L, H, N, N]` as an RWKV-Runner state file plus its JSON sidecar; returns the sidecar path.

    `meta` is free-form JSON-able metadata (training params, data hash, metrics); `model` (recommended) fills
    the sidecar's base_model (file name, sha256, shapes) so `load_state` can refuse a state for another model.
    """
    path = Path(path)
    if path.suffix != ".pth":
        raise StateFileError(f"{path}: state files must end in .pth (RWKV-Runner only lists those)")
    if wkv.dim() != 4 or wkv.shape[-1] != wkv.shape[-2]:
        raise StateFileError(f"{path}: wkv must be [L, H, N, N], got {tuple(wkv.shape)}")
    if model is not None and tuple(wkv.shape) != _wkv_shape(model.config):
        raise StateFileError(f"{path}: wkv {tuple(wkv.shape)} does not fit the model "
                             f"{_wkv_shape(model.config)}")
    tensors = {f"blocks.{i}.att.time_state": wkv[i].detach().float().cpu().contiguous().clone()
               for i in range(wkv.shape[0])}
    sidecar = {"format_version": STATE_FORMAT_VERSION, "kind": STATE_KIND, "state_file": path.name,
               "base_model": base_model_info(model) if model is not None else None,
               "tokenizer": TOKENIZER_ID, "metadata": meta or {}}
    save_torch(tensors, path)
    write_json(sidecar_path(path), sidecar)
    return sidecar_path(path)


def read_state_file(path: str | os.PathLike[str]) -> tuple[Tensor, dict[str, Any] | None]:
    """Read a state file without a model: (wkv [L, H, N, N] float32, sidecar dict or None if absent).

    Checks the Runner layout (keys `blocks.0..L-1.att.time_state`, nothing else, equal `[H, N, N]` shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: state file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise StateFileError(f"{path}: cannot read this state file (truncated or not a torch file?): "
                             f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise StateFileError(f"{path}: expected a dict of blocks.{{i}}.att.time_state tensors, "
                             f"found {type(data).__name__}")
    layers = {int(m.group(1)): v for k, v in data.items() if isinstance(k, str) and (m := _STATE_KEY.match(k))}
    if len(layers) != len(data) or sorted(layers) != list(range(len(layers))):
        raise StateFileError(f"{path}: keys must be exactly blocks.0..L-1.att.time_state; found "
                             f"{sorted(map(str, data))[:8]}")
    shapes = {tuple(t.shape) for t in layers.values() if isinstance(t, Tensor)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise StateFileError(f"{path}: every time_state must be one [H, N, N] tensor; found shapes {shapes}")
    wkv = torch.stack([layers[i].float() for i in range(len(layers))])
    return wkv, _read_sidecar(path)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFileError(f"{side}: sidecar is not valid JSON: {e}") from None
    if not isinstance(sidecar, dict) or sidecar.get("kind") != STATE_KIND:
        raise StateFileError(f"{side}: not a statetune state sidecar (kind should be {STATE_KIND!r})")
    if sidecar.get("format_version") != STATE_FORMAT_VERSION:
        raise StateFileError(f"{side}: format_version {sidecar.get('format_version')!r} is not supported "
                             f"(this code reads {STATE_FORMAT_VERSION})")
    return sidecar


def _wkv_shape(cfg: ModelConfig) -> tuple[int, int, int, int]:
    return (cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size)


def load_state(path: str | os.PathLike[str], model: RWKV7) -> RWKVState:
    """Load a state file for `model` → batch-1 `RWKVState` (zero shifts) on the model's device.

    Checks the layer count and head shape against the model; with a sidecar also its recorded base-model
    shapes and sha256 (when both sides know the hash). Mismatches raise StateFileError naming the file.
    """
    path = Path(path)
    wkv, sidecar = read_state_file(path)
    want = _wkv_shape(model.config)
    if tuple(wkv.shape) != want:
        raise StateFileError(f"{path}: state has {wkv.shape[0]} layers of [{', '.join(map(str, wkv.shape[1:]))}]"
                             f" but the model needs {want[0]} layers of [{want[1]}, {want[2]}, {want[3]}]")
    if sidecar is not None:
        _check_base_model(sidecar_path(path), sidecar.get("base_model"), model)
    return RWKVState.from_wkv(wkv.to(model.device)).detach()


def _check_base_model(side: Path, recorded: dict[str, Any] | None, model: RWKV7) -> None:
    if recorded is None:
        return
    cfg = model.config
    mine = {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "head_size": cfg.head_size,
            "vocab_size": cfg.vocab_size}
    diff = {k: (recorded.get(k), v) for k, v in mine.items() if k in recorded and recorded[k] != v}
    if diff:
        raise StateFileError(f"{side}: state was trained for another model shape "
                             f"({', '.join(f'{k} {a} != {b}' for k, (a, b) in diff.items())})")
    want_hash = recorded.get("sha256")
    if want_hash and model.source is not None and model.source_sha256() != want_hash:
        raise StateFileError(f"{side}: state was trained for {recorded.get('file')} (sha256 {want_hash[:12]}…), "
                             f"not for {model.source.name} (sha256 {model.source_sha256()[:12]}…)")
