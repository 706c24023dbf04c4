"""The demo base model: deterministic bytes, a valid x070 checkpoint, params errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rwkv7.checkpoint import load_checkpoint
from tasks.base_model import BaseModelParams, main
from tasks.common import ParamsError, load_section

SMALL = "base_model:\n  n_layer: 2\n  n_embd: 64\n  vocab_size: 1000\n  seed: 3\n"


def test_same_params_same_bytes_and_loadable(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SMALL)
    main(["--params", str(params), "--out", str(tmp_path / "a/base.pth"), "--stats", str(tmp_path / "s.json")])
    main(["--params", str(params), "--out", str(tmp_path / "b/base.pth")])
    assert (tmp_path / "a/base.pth").read_bytes() == (tmp_path / "b/base.pth").read_bytes()
    _, cfg = load_checkpoint(tmp_path / "a/base.pth")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size) == (2, 64, 1, 1000)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["stage"] == "base_model" and stats["written"] == 1 and stats["parameters"] > 0


def test_other_seed_other_weights(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SMALL)
    main(["--params", str(params), "--out", str(tmp_path / "a.pth")])
    params.write_text(SMALL.replace("seed: 3", "seed: 4"))
    main(["--params", str(params), "--out", str(tmp_path / "b.pth")])
    assert (tmp_path / "a.pth").read_bytes() != (tmp_path / "b.pth").read_bytes()


def test_width_not_a_head_multiple_names_the_key(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(SMALL.replace("n_embd: 64", "n_embd: 100"))
    with pytest.raises(ParamsError, match=r"base_model\.n_embd"):
        load_section(BaseModelParams, "base_model", params)
