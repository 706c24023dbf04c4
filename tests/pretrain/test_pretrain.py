"""pretrain/pretrain.py: the shared-row softmax is exact, the schedule, and a tiny CPU run end to end whose
exported checkpoint loads in rwkv7 and reproduces the loss the trainer logged."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rwkv7
from rwkv7.tokenizer import WorldTokenizer


@pytest.fixture(scope="module")
def pt(script: Callable[[str], ModuleType]) -> ModuleType:
    return script("pretrain")


def test_shared_row_loss_equals_full_softmax(pt: ModuleType) -> None:
    V, C, M = 50, 8, 30
    tokens = np.array([1, 1, 1, 2, 2, 2, 3, 4, 5, 0], dtype=np.uint16)
    mapping = pt.compact_vocab(tokens, min_count=3, vocab_size=V)  # kept: 0, 1, 2; everything else shared
    n_kept = int(mapping.max())
    assert n_kept == 3 and mapping[:4].tolist() == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    compact_head = torch.randn(n_kept + 1, C, generator=g)
    hidden = torch.randn(M, C, generator=g)
    targets = torch.randint(0, V, (M,), generator=g)
    full_head = compact_head[mapping]  # what export writes: the shared row repeated
    want = F.cross_entropy(hidden @ full_head.T, targets)
    got = pt.exact_loss(hidden, compact_head, mapping[targets], n_rare=V - n_kept)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_learning_rate_schedule(pt: ModuleType) -> None:
    p = pt.TrainParams(lr=1e-3, lr_final=1e-5, warmup_steps=10, steps=100)
    assert pt.lr_at(0, 100, p) == pytest.approx(1e-4)
    assert pt.lr_at(9, 100, p) == pytest.approx(1e-3)
    assert pt.lr_at(100, 100, p) == pytest.approx(1e-5)
    assert pt.lr_at(55, 100, p) == pytest.approx((1e-3 + 1e-5) / 2)


def test_tiny_run_exports_a_checkpoint_that_reproduces_its_loss(pt: ModuleType, tmp_path: Path) -> None:
    tok = WorldTokenizer()
    text = "User: What does cat mean?\n\nAssistant: A cat is a small animal."
    data = tmp_path / "data"
    data.mkdir()
    np.asarray((tok.encode(text) + [0]) * 40, dtype=np.uint16).tofile(data / "train.bin")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"kind": "chat", "text": text}) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  n_layer: 1\n  n_embd: 64\n  min_token_count: 2\n"
                      "train:\n  ctx_len: 32\n  batch_size: 2\n  lr: 0.01\n  warmup_steps: 2\n  steps: 12\n"
                      "  time_budget_s: 0\n  eval_every: 6\n")
    out = tmp_path / "out"
    pt.main(["--params", str(params), "--data", str(data), "--heldout", str(heldout), "--out", str(out),
             "--device", "cpu"])
    meta = json.loads((out / "model.json").read_text())
    assert meta["steps"] == 12 and meta["heldout_loss_final"] < meta["heldout_loss_init"] - 1.0
    model = rwkv7.load_model(out / "model.pth")
    ids = torch.tensor([tok.encode(text) + [0]])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    loss = F.cross_entropy(logits[0], ids[0, 1:]).item()
    assert loss == pytest.approx(meta["heldout_loss_final"], abs=0.05)  # bf16 export rounding only
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,tokens,lr,train_loss,heldout_loss" and len(rows) == 3
    assert math.isfinite(float(rows[-1].split(",")[-1]))
