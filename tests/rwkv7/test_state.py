"""State files: RWKV-Runner layout, sidecar round trip, and clear errors for states that do not fit."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv7.checkpoint import random_checkpoint, save_checkpoint
from rwkv7.model import load_model
from rwkv7.state import (STATE_FORMAT_VERSION, RWKVState, StateFileError, load_state, read_state_file,
                         save_state, sidecar_path)


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_model(tiny_path)


def test_round_trip_in_runner_format_with_sidecar(model, make_wkv, tmp_path):
    cfg = model.config
    wkv = make_wkv(cfg.n_layer, cfg.n_head)
    side = save_state(tmp_path / "state.pth", wkv, {"epochs": 2, "loss": 1.5}, model=model)
    raw = torch.load(tmp_path / "state.pth", map_location="cpu", weights_only=True)
    # RWKV-Runner: exactly L entries, n_embd = shape[0]*shape[1] of the first, CPU tensors, nothing else
    assert list(raw) == [f"blocks.{i}.att.time_state" for i in range(cfg.n_layer)]
    first = raw["blocks.0.att.time_state"]
    assert first.shape == (cfg.n_head, 64, 64) and first.shape[0] * first.shape[1] == cfg.n_embd
    assert all(t.device.type == "cpu" for t in raw.values())
    sidecar = json.loads(side.read_text())
    assert side == tmp_path / "state.json" and sidecar["format_version"] == STATE_FORMAT_VERSION
    assert sidecar["base_model"]["file"] == model.source.name
    assert sidecar["base_model"]["sha256"] == model.source_sha256() and len(model.source_sha256()) == 64
    assert sidecar["metadata"] == {"epochs": 2, "loss": 1.5} and sidecar["tokenizer"] == "rwkv_vocab_v20230424"
    state = load_state(tmp_path / "state.pth", model)
    assert isinstance(state, RWKVState) and state.wkv.shape == (cfg.n_layer, 1, cfg.n_head, 64, 64)
    torch.testing.assert_close(state.wkv[:, 0], wkv)
    assert state.att_shift.abs().sum() == 0 and state.ffn_shift.abs().sum() == 0


def test_bare_state_file_loads_by_shape(model, make_wkv, tmp_path):
    cfg = model.config
    wkv = make_wkv(cfg.n_layer, cfg.n_head).bfloat16()
    torch.save({f"blocks.{i}.att.time_state": wkv[i] for i in range(cfg.n_layer)}, tmp_path / "rwkv-0.pth")
    state = load_state(tmp_path / "rwkv-0.pth", model)
    assert state.wkv.dtype == torch.float32
    torch.testing.assert_close(state.wkv[:, 0], wkv.float())
    assert read_state_file(tmp_path / "rwkv-0.pth")[1] is None


def test_wrong_layer_count_or_head_shape(model, make_wkv, tmp_path):
    cfg = model.config
    save_state(tmp_path / "few.pth", make_wkv(cfg.n_layer - 1, cfg.n_head), {})
    with pytest.raises(StateFileError, match=r"few\.pth: state has 2 layers.*needs 3 layers"):
        load_state(tmp_path / "few.pth", model)
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(cfg.n_head, 32, 32) for i in range(cfg.n_layer)},
               tmp_path / "heads.pth")
    with pytest.raises(StateFileError, match=r"heads\.pth: state has 3 layers of \[2, 32, 32\]"):
        load_state(tmp_path / "heads.pth", model)


def test_state_for_another_model_is_refused(model, make_wkv, tmp_path):
    cfg = model.config
    other_path = tmp_path / "other.pth"
    save_checkpoint(random_checkpoint(cfg.n_layer, cfg.n_embd, vocab_size=cfg.vocab_size, seed=9), other_path)
    other = load_model(other_path)
    save_state(tmp_path / "s.pth", make_wkv(cfg.n_layer, cfg.n_head), {}, model=other)
    with pytest.raises(StateFileError, match=r"s\.json: state was trained for other\.pth"):
        load_state(tmp_path / "s.pth", model)
    sidecar = json.loads((tmp_path / "s.json").read_text())
    sidecar["base_model"].update(sha256=None, vocab_size=65536)
    (tmp_path / "s.json").write_text(json.dumps(sidecar))
    with pytest.raises(StateFileError, match=r"another model shape \(vocab_size 65536 != 1000\)"):
        load_state(tmp_path / "s.pth", model)


def test_malformed_files(model, tmp_path):
    with pytest.raises(StateFileError, match=r"missing\.pth: state file not found"):
        load_state(tmp_path / "missing.pth", model)
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StateFileError, match=r"cut\.pth: cannot read"):
        load_state(tmp_path / "cut.pth", model)
    torch.save({"blocks.0.att.time_state": torch.zeros(2, 64, 64), "step": torch.tensor(3)}, tmp_path / "x.pth")
    with pytest.raises(StateFileError, match=r"x\.pth: keys must be exactly"):
        load_state(tmp_path / "x.pth", model)
    with pytest.raises(StateFileError, match=r"must end in \.pth"):
        save_state(tmp_path / "state.pt", torch.zeros(3, 2, 64, 64), {})
    save_state(tmp_path / "v.pth", torch.zeros(3, 2, 64, 64), {})
    (tmp_path / "v.json").write_text(json.dumps({"kind": "statetune.rwkv7_state", "format_version": 99}))
    with pytest.raises(StateFileError, match=r"v\.json: format_version 99 is not supported"):
        load_state(tmp_path / "v.pth", model)
    assert sidecar_path(tmp_path / "v.pth") == tmp_path / "v.json"


def test_zeros_state_is_float32_with_its_batch(model):
    zeros = RWKVState.zeros(model.config, batch=2)
    assert zeros.wkv.dtype == torch.float32 and zeros.batch_size == 2


def test_from_wkv_layers_broadcast_each_layer_and_their_backward_builds_no_full_size_gradients(model):
    """`from_wkv` is differentiable, and `layers` gives the blocks per-layer views: the gradient of a batch-1
    state is summed over the batch layer by layer and stacked once; no op in backward makes a tensor of the whole
    broadcast state `[L, B, H, N, N]` (indexing layer by layer made L of them, zero-filled, and added them up)."""
    cfg = model.config
    param = torch.nn.Parameter(torch.randn(cfg.n_layer, cfg.n_head, 64, 64))
    layers = RWKVState.from_wkv(param).layers(4)
    assert len(layers) == cfg.n_layer
    assert all(a.shape == f.shape == (4, 128) and w.shape == (4, cfg.n_head, 64, 64) for a, w, f in layers)
    loss = sum((i + 1) * w.sum() for i, (_, w, _) in enumerate(layers))
    with SeenShapes() as seen:
        loss.backward()
    expect = torch.arange(1.0, cfg.n_layer + 1).view(-1, 1, 1, 1) * 4  # layer i's weight, summed over 4 rows
    torch.testing.assert_close(param.grad, expect.expand_as(param))
    assert (cfg.n_layer, 4, cfg.n_head, 64, 64) not in seen.shapes
    with pytest.raises(ValueError, match="batch 4"):
        RWKVState.zeros(cfg, batch=4).layers(2)
    # and so through the model's blocks
    param.grad = None
    hidden, _ = model.run_blocks(model.embed(torch.randint(0, 256, (4, 5))), RWKVState.from_wkv(param))
    with SeenShapes() as seen:
        hidden.float().square().sum().backward()
    assert param.grad.abs().sum() > 0 and (cfg.n_layer, 4, cfg.n_head, 64, 64) not in seen.shapes


class SeenShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of every tensor the dispatched ops return while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.update(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                           if isinstance(t, torch.Tensor))
        return out
