"""tasks/base_model.py with `pretrained`: copies the shipped checkpoint after checking its sha256; loud otherwise."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rwkv7.checkpoint import random_checkpoint, save_checkpoint
from tasks.base_model import PretrainedMismatchError, build_base_model, main
from tasks.base_model import BaseModelParams

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "rwkv7-demo-L4-C128.pth"


@pytest.fixture()
def small_pretrained(tmp_path: Path) -> Path:
    """A tiny checkpoint with a provenance JSON beside it, like models/<name>.pth + .json."""
    path = tmp_path / "shipped" / "tiny.pth"
    save_checkpoint(random_checkpoint(n_layer=1, n_embd=64, vocab_size=300, seed=5), path)
    path.with_suffix(".json").write_text(json.dumps({"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}))
    return path


def test_copies_after_checking_the_sidecar_hash(small_pretrained: Path, tmp_path: Path) -> None:
    stats = build_base_model(tmp_path / "out/base.pth", BaseModelParams(pretrained=small_pretrained))
    assert (tmp_path / "out/base.pth").read_bytes() == small_pretrained.read_bytes()
    assert (stats["n_layer"], stats["n_embd"], stats["vocab_size"]) == (1, 64, 300)
    assert stats["pretrained"] == str(small_pretrained) and stats["written"] == 1


def test_hash_mismatch_and_missing_sidecar_are_errors(small_pretrained: Path, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(PretrainedMismatchError, match="sha256"):
        build_base_model(tmp_path / "a.pth", BaseModelParams(pretrained=small_pretrained, pretrained_sha256=wrong))
    assert not (tmp_path / "a.pth").exists()
    small_pretrained.with_suffix(".json").unlink()
    with pytest.raises(PretrainedMismatchError, match="no usable sha256"):
        build_base_model(tmp_path / "a.pth", BaseModelParams(pretrained=small_pretrained))
    with pytest.raises(PretrainedMismatchError, match="not found"):
        build_base_model(tmp_path / "a.pth", BaseModelParams(pretrained=tmp_path / "nope.pth"))


def test_stage_cli_with_the_shipped_model(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"base_model:\n  pretrained: {SHIPPED}\n")
    main(["--params", str(params), "--out", str(tmp_path / "base.pth"), "--stats", str(tmp_path / "s.json")])
    meta = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert hashlib.sha256((tmp_path / "base.pth").read_bytes()).hexdigest() == meta["sha256"]
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["sha256"] == meta["sha256"] and stats["n_layer"] == meta["architecture"]["n_layer"]
    params.write_text(f"base_model:\n  pretrained: {SHIPPED}\n  pretrained_sha256: '{'1' * 64}'\n")
    with pytest.raises(SystemExit, match="sha256"):
        main(["--params", str(params), "--out", str(tmp_path / "other.pth")])
