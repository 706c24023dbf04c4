"""Stage `base_model`: write the demo's small RWKV-7 base model, deterministically, in BlinkDL layout.

Contract: `params.yaml[base_model]` (layers, width, vocabulary, seed) → one `.pth` checkpoint that
`rwkv7.load_model` reads like a real `rwkv7-g1*.pth`. Same params → the same bytes, so DVC's run-cache and
remote deduplicate it. The weights are random (seeded): good for exercising the pipeline end to end offline
on CPU, not for quality; point `model.path` in params.yaml at a real checkpoint for that.

With `pretrained` set (a checkpoint shipped in the repo, e.g. models/rwkv7-demo-L4-C128.pth from
pretrain/README.md), the stage copies that file instead, after checking its sha256 against `pretrained_sha256`
or, when that is null, against the `sha256` of its provenance JSON (same name, `.json`); the shape keys are then
ignored.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


from rwkv7.atomic import atomic_path, file_sha256
from rwkv7.checkpoint import (HEAD_SIZE, WORLD_VOCAB_SIZE, CheckpointError, load_checkpoint,
                              random_checkpoint, save_checkpoint)
from tasks.common import StageStats, load_section, stage_errors, stage_parser


class BaseModelParams(BaseModel):
    """`params.yaml[base_model]`: shapes and seed of the random checkpoint."""

    model_config = ConfigDict(extra="forbid")

    n_layer: int = Field(2, ge=1)
    n_embd: int = Field(128, ge=HEAD_SIZE, multiple_of=HEAD_SIZE)
    vocab_size: int = Field(WORLD_VOCAB_SIZE, ge=1)  # the World tokenizer's ids must fit
    seed: int = 0
    pretrained: Path | None = None  # shipped checkpoint to copy instead of random weights
    pretrained_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # null: read from <pretrained>.json


class PretrainedMismatchError(CheckpointError):
    """The shipped checkpoint is missing, lacks a provenance hash, or its sha256 differs from the expected one."""


def expected_sha256(path: Path, pinned: str | None) -> str:
    """`pinned`, else the `sha256` of the provenance JSON beside `path`; raises PretrainedMismatchError."""
    if pinned:
        return pinned
    sidecar = path.with_suffix(".json")
    try:
        return str(json.loads(sidecar.read_text(encoding="utf-8"))["sha256"])
    except (OSError, ValueError, KeyError) as e:
        raise PretrainedMismatchError(f"{path}: no base_model.pretrained_sha256 and no usable sha256 in {sidecar} "
                                      f"({type(e).__name__}: {e})") from None


def copy_pretrained(src: Path, out: Path, pinned: str | None) -> dict[str, object]:
    """Copy `src` to `out` (atomically) after checking its sha256 and x070 layout; return its shapes."""
    if not src.is_file():
        raise PretrainedMismatchError(f"{src}: base_model.pretrained checkpoint not found")
    want = expected_sha256(src, pinned)
    got = file_sha256(src)
    if got != want:
        raise PretrainedMismatchError(f"{src}: sha256 {got} != expected {want} (corrupt copy, or an "
                                      "LFS pointer instead of the file?)")
    sd, cfg = load_checkpoint(src)
    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
    return {"pretrained": str(src), "sha256": want, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "vocab_size": cfg.vocab_size, "parameters": sum(t.numel() for t in sd.values())}


def build_base_model(out: Path, p: BaseModelParams, stats_path: Path | None = None) -> dict[str, object]:
    """Write the checkpoint to `out` (atomically); return stats with the shapes and parameter count."""
    stats = StageStats("base_model")
    if p.pretrained is not None:
        stats.extra.update(copy_pretrained(p.pretrained, out, p.pretrained_sha256), bytes=out.stat().st_size)
        stats.written = 1
        return stats.save(stats_path) if stats_path else stats.as_dict()
    sd = random_checkpoint(n_layer=p.n_layer, n_embd=p.n_embd, vocab_size=p.vocab_size, seed=p.seed)
    save_checkpoint(sd, out)
    stats.written = 1
    stats.extra.update(n_layer=p.n_layer, n_embd=p.n_embd, vocab_size=p.vocab_size,
                       parameters=sum(t.numel() for t in sd.values()), bytes=out.stat().st_size)
    return stats.save(stats_path) if stats_path else stats.as_dict()


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("base_model", __doc__)
    ap.add_argument("--out", type=Path, required=True, help="checkpoint .pth to write")
    ap.add_argument("--stats", type=Path, help="stats JSON to write")
    args = ap.parse_args(argv)
    with stage_errors("base_model", CheckpointError):
        params = load_section(BaseModelParams, "base_model", args.params)
        stats = build_base_model(args.out, params, args.stats)
    print(f"base_model: {args.out} ({stats['parameters']:,} parameters, L={stats['n_layer']}, C={stats['n_embd']})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
