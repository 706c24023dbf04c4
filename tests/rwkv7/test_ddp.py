"""DDP state tuning on CPU (gloo, 2 processes): the same state as one process with the same global batch.

`train_state(devices=2)` runs Lightning's "ddp" strategy, which starts the second process by re-running the
script, so the distributed run goes through a small script file in a subprocess. Every sample has the same
number of tokens (and all of them are scored), so the mean of the two ranks' mean losses is the global mean
and the averaged gradient equals the single-process one exactly (up to float summation order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from rwkv7.checkpoint import random_checkpoint, save_checkpoint
from rwkv7.data import BucketBatchSampler
from rwkv7.tokenizer import WorldTokenizer
from rwkv7.train import TrainParams, train_state

REPO = Path(__file__).resolve().parents[2]
N_SAMPLES = 8
GLOBAL_BATCH = 4
WORDS = ("apple", "river", "stone", "light", "green", "house", "music", "water", "table", "cloud", "dream",
         "smile", "bread", "train", "horse", "paper")
SETTINGS = {"ctx_len": 64, "max_steps": 2, "lr_init": 0.05, "lr_final": 0.05, "warmup_steps": 0, "loss_on": "all",
            "device": "cpu", "progress_bar": False, "cpu_threads": 1, "seed": 3}


def equal_length_texts(n: int) -> list[str]:
    """n RWKV-PEFT lines that all encode to the same number of tokens."""
    encode = WorldTokenizer().encode
    texts = [f"User: {a} {b}\n\nAssistant: {c} {d} {a}." for a, b, c, d in zip(WORDS, WORDS[3:] + WORDS[:3],
                                                                             WORDS[7:] + WORDS[:7],
                                                                             WORDS[11:] + WORDS[:11], strict=True)]
    by_length: dict[int, list[str]] = {}
    for t in texts:
        by_length.setdefault(len(encode(t)), []).append(t)
    common = max(by_length.values(), key=len)
    assert len(common) >= n, Counter({k: len(v) for k, v in by_length.items()})
    return common[:n]


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    model = root / "tiny.pth"
    save_checkpoint(random_checkpoint(n_layer=2, n_embd=64, seed=5), model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in equal_length_texts(N_SAMPLES)))
    return model, data


def test_sharded_sampler_splits_each_global_batch_across_ranks() -> None:
    lengths = [5, 9, 1, 7, 3, 8, 2, 6, 4, 10, 11]
    one = BucketBatchSampler(lengths, 4, seed=0, window_batches=2)
    ranks = [BucketBatchSampler(lengths, 2, seed=0, window_batches=2, num_replicas=2, rank=r) for r in (0, 1)]
    global_batches = list(one)
    assert sorted(map(len, global_batches)) == [3, 4, 4]
    per_rank = [list(s) for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(per_rank[0]) == 3
    for g, r0, r1 in zip(global_batches, *per_rank, strict=True):
        assert sorted(r0 + r1) == sorted(g) and not set(r0) & set(r1)
    with pytest.raises(ValueError, match="rank 2 must be in"):
        BucketBatchSampler(lengths, 2, seed=0, window_batches=2, num_replicas=2, rank=2)


@pytest.mark.timeout(120)
def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(run_inputs: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    model, data = run_inputs
    ddp_out = tmp_path / "ddp"
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from rwkv7.train import TrainParams, train_state
        params = TrainParams(micro_bsz={GLOBAL_BATCH // 2}, devices=2, **{SETTINGS!r})
        train_state({str(model)!r}, {str(data)!r}, {str(ddp_out)!r}, params)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    single = train_state(model, data, tmp_path / "single", TrainParams(micro_bsz=GLOBAL_BATCH, **SETTINGS))
    log, _ = ddp.communicate(timeout=100)
    assert ddp.returncode == 0, log[-3000:]
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log
    one = torch.load(tmp_path / "single" / "state.pth", weights_only=True)
    two = torch.load(ddp_out / "state.pth", weights_only=True)
    assert one.keys() == two.keys() and len(one) == 2
    moved = max(v.abs().max().item() for v in one.values())
    assert moved > 0.01  # the state really trained (lr 0.05, two Adam steps)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    metrics = json.loads((ddp_out / "metrics.json").read_text())
    assert metrics["steps"] == single["steps"] == 2
    # each rank saw half of every global batch: its real tokens are half the single run's
    assert metrics["real_tokens"] * 2 == single["real_tokens"]
    assert sorted(p.name for p in ddp_out.iterdir() if p.suffix in {".pth", ".json"}) == \
        ["metrics.json", "state-epoch1.json", "state-epoch1.pth", "state.json", "state.pth"]
