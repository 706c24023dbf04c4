"""Checkpoint files: layout validation, dims read from tensors, and an error naming the file for bad input."""

from __future__ import annotations

import fractions

import pytest
import torch

from rwkv7.checkpoint import (CheckpointCorruptError, CheckpointNotFoundError, NotRWKV7Error, default_dims,
                              inspect_checkpoint, load_checkpoint, random_checkpoint, save_checkpoint)

SMALL = {"n_layer": 2, "n_embd": 128, "vocab_size": 500}


def test_random_checkpoint_round_trips_and_reads_every_dim(tmp_path):
    dims = {"w": 64, "a": 32, "v": 96, "g": 128}
    sd = random_checkpoint(**SMALL, dims=dims, block0_v=False)
    save_checkpoint(sd, tmp_path / "m.pth")
    loaded, cfg = load_checkpoint(tmp_path / "m.pth")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size) == (2, 128, 2, 64, 500)
    assert cfg.dims == dims
    assert "blocks.0.att.v1" not in loaded and "blocks.1.att.v1" in loaded
    torch.testing.assert_close(loaded["blocks.1.att.w0"], sd["blocks.1.att.w0"])


def test_released_sizes_get_released_lora_dims():
    assert default_dims(768) == {"w": 64, "a": 64, "v": 32, "g": 128}
    assert default_dims(2048) == {"w": 96, "a": 96, "v": 64, "g": 256}


def test_random_init_decays_are_in_a_sensible_range():
    sd = random_checkpoint(**SMALL)
    decay = torch.exp(-torch.exp(torch.tensor(-0.5)) * torch.sigmoid(sd["blocks.0.att.w0"]))
    assert 0.85 < decay.min() and decay.max() < 0.9995


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.pth: checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pth"
    save_checkpoint(random_checkpoint(**SMALL), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointCorruptError, match=r"cut\.pth: cannot read.*truncated"):
        load_checkpoint(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2), "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointCorruptError, match=r"evil\.pth"):
        load_checkpoint(path)


def test_rwkv6_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "v6.pth"
    torch.save({"emb.weight": torch.zeros(10, 64), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 64),
                "blocks.0.att.time_decay": torch.zeros(64), "blocks.0.att.time_faaaa": torch.zeros(1, 64)}, path)
    with pytest.raises(NotRWKV7Error, match=r"v6\.pth: this is an older RWKV generation.*time_decay"):
        load_checkpoint(path)


def test_non_rwkv_checkpoint_lists_found_keys(tmp_path):
    path = tmp_path / "bert.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(3), "pooler.dense.weight": torch.zeros(3)}, path)
    with pytest.raises(NotRWKV7Error, match=r"bert\.pth: not an RWKV-7.*found keys encoder\.layer\.0\.weight"):
        load_checkpoint(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(NotRWKV7Error, match="not a state dict of tensors"):
        load_checkpoint(path)


def test_missing_or_unexpected_keys_and_bad_shapes():
    sd = random_checkpoint(**SMALL)
    broken = {k: v for k, v in sd.items() if k != "blocks.1.att.k_a"}
    with pytest.raises(NotRWKV7Error, match=r"missing keys \[blocks\.1\.att\.k_a\]"):
        inspect_checkpoint(broken, source="x.pth")
    with pytest.raises(NotRWKV7Error, match=r"unexpected keys \[blocks\.0\.ffn\.s_emb\.weight\]"):
        inspect_checkpoint({**sd, "blocks.0.ffn.s_emb.weight": torch.zeros(1)}, source="x.pth")
    with pytest.raises(NotRWKV7Error, match=r"x\.pth: tensor shapes disagree.*blocks\.1\.ffn\.key\.weight"):
        inspect_checkpoint({**sd, "blocks.1.ffn.key.weight": torch.zeros(100, 128)}, source="x.pth")
    with pytest.raises(NotRWKV7Error, match=r"r_k is \[3, 64\]"):
        inspect_checkpoint({**sd, "blocks.0.att.r_k": torch.zeros(3, 64)}, source="x.pth")


def test_legacy_non_zip_torch_file_still_loads(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(random_checkpoint(**SMALL), path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path)[1].n_layer == 2


def test_save_checkpoint_bytes_depend_only_on_the_tensors(tmp_path: Path) -> None:
    sd = random_checkpoint(n_layer=1, n_embd=64, vocab_size=256, seed=1)
    save_checkpoint(sd, tmp_path / "a.pth")
    save_checkpoint(sd, tmp_path / "b.pth")  # other name, other random temp file
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()
