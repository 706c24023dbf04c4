"""Training data: records → ids + masks, the length policy, errors, bucketing and the two collates."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from rwkv7.data import (
    BucketBatchSampler,
    DatasetError,
    PackedBatchSampler,
    Sample,
    best_fill,
    bucket_batches,
    encode_segments,
    first_fit_rows,
    load_samples,
    pack_collate,
    pack_rows_collate,
    packed_batches,
    pad_collate,
)
from rwkv7.template import render


def byte_encode(text: str) -> list[int]:
    """A real (if simple) tokenizer: one id per UTF-8 byte, so lengths are easy to count by hand."""
    return list(text.encode("utf-8"))


def write_jsonl(path: Path, objs: list) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def dialogue(user: str, reply: str, rid: str = "r") -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
            "source": {}}


def test_assistant_mask_covers_reply_and_closing_separator_only() -> None:
    ids, mask = encode_segments(render(dialogue("hi", "yo")["messages"]), byte_encode)
    text = bytes(ids).decode()
    assert text == "User: hi\n\nAssistant: yo\n\n"
    assert "".join(c for c, m in zip(text, mask) if m) == " yo\n\n"
    _, all_mask = encode_segments(render(dialogue("hi", "yo")["messages"]), byte_encode, loss_on="all")
    assert all(all_mask)


def test_load_samples_counts_every_drop_reason(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        dialogue("hi", "yo", "ok"),
        {"id": "bad", "messages": [{"role": "user", "content": "only a question"}]},
        {"text": "User: q\n\nAssistant: a"},
        {"text": "no reply here"},
        {"neither": 1},
        dialogue("x" * 20, "long reply " * 20, "long"),
    ])
    samples, stats = load_samples(path, byte_encode, ctx_len=60)
    assert [s.source for s in samples] == ["ok", f"{path}:3", "long"]
    assert stats.read == 6 and stats.used == 3 and stats.truncated == 1
    assert stats.dropped == {"invalid_record": 2, "no_trainable_tokens": 1}
    assert all(len(s.ids) <= 61 for s in samples)
    assert stats.tokens == sum(s.n_inputs for s in samples)
    assert stats.as_dict()["dropped_total"] == 3 and len(stats.examples) == 3


def test_overlong_drop_policy_and_truncation_that_cuts_all_replies(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [dialogue("x" * 80, "yo")])
    with pytest.raises(DatasetError, match="no_trainable_tokens_after_truncation"):
        load_samples(path, byte_encode, ctx_len=40)
    with pytest.raises(DatasetError, match="too_long"):
        load_samples(path, byte_encode, ctx_len=40, overlong="drop")
    samples, _ = load_samples(path, byte_encode, ctx_len=40, loss_on="all")
    assert len(samples[0].ids) == 41 and bytes(samples[0].ids).decode().startswith("User: xxx")


def test_empty_or_missing_or_broken_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_samples(tmp_path / "nope.jsonl", byte_encode, 10)
    with pytest.raises(DatasetError, match="no usable training sample"):
        load_samples(write_jsonl(tmp_path / "empty.jsonl", []), byte_encode, 10)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        load_samples(tmp_path / "bad.jsonl", byte_encode, 10)


def test_bucket_batches_cover_every_sample_once_and_group_lengths() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(64)]
    batches = bucket_batches(lengths, micro_bsz=8, seed=3, epoch=0, window_batches=8)
    assert sorted(i for b in batches for i in b) == list(range(64))
    assert all(len(b) == 8 for b in batches)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    unsorted = sum(max(lengths[i] for i in range(j, j + 8)) * 8 for j in range(0, 64, 8))
    assert padded / sum(lengths) < 1.15 < unsorted / sum(lengths)
    assert batches == bucket_batches(lengths, 8, 3, 0, 8)
    assert batches != bucket_batches(lengths, 8, 3, 1, 8)


def test_sampler_skip_resumes_mid_epoch() -> None:
    sampler = BucketBatchSampler(list(range(1, 21)), micro_bsz=4, seed=0, window_batches=2)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip(3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full and len(sampler) == 5


def test_pad_and_pack_collate_hold_the_same_tokens() -> None:
    samples = [Sample([1, 2, 3, 4], [False, False, True, True], "a"), Sample([5, 6], [True, True], "b")]
    padded = pad_collate(samples)
    assert padded.tokens.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert padded.targets.tolist() == [[2, 3, 4], [6, 0, 0]]
    assert padded.loss_mask.tolist() == [[False, True, True], [True, False, False]]
    assert padded.n_real == 4 and padded.cu_seqlens is None and padded.n_sequences == 2
    packed = pack_collate(samples)
    assert packed.tokens.tolist() == [[1, 2, 3, 5]] and packed.targets.tolist() == [[2, 3, 4, 6]]
    assert packed.cu_seqlens.tolist() == [0, 3, 4] and packed.n_real == 4 and packed.n_sequences == 2
    assert torch.equal(packed.loss_mask[0], padded.loss_mask[padded.tokens != 0])
    assert padded.n_targets == packed.n_targets == 3


def test_pad_collate_rounds_the_width_and_adds_empty_rows_for_fixed_shapes() -> None:
    samples = [Sample([1, 2, 3, 4], [False, False, True, True], "a"), Sample([5, 6], [True, True], "b")]
    batch = pad_collate(samples, multiple=4, rows=3)
    assert batch.tokens.tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [0, 0, 0, 0]]
    assert batch.loss_mask.sum() == 3 and batch.n_targets == 3 and batch.n_real == 4
    assert pad_collate(samples, multiple=3).tokens.shape == (2, 3)  # already a multiple: no extra column


def test_packed_batches_fill_rows_with_every_sample_once_deterministically() -> None:
    lengths = [(i * 37) % 250 + 50 for i in range(400)]  # 50-299 tokens, like workload (c)
    batches = packed_batches(lengths, rows=4, width=512, seed=1, epoch=0, lookahead=64)
    assert sorted(i for b in batches for i in b) == list(range(400))
    for b in batches:
        assert first_fit_rows([lengths[i] for i in b], 512, 4) is not None  # what the collate will lay out
    fills = [sum(lengths[i] for i in b) / (4 * 512) for b in batches]
    assert min(fills[:-2]) > 0.99  # subset sums leave rows ~full until the last samples run short
    assert batches == packed_batches(lengths, rows=4, width=512, seed=1, epoch=0, lookahead=64)
    assert batches != packed_batches(lengths, rows=4, width=512, seed=1, epoch=1, lookahead=64)
    with pytest.raises(ValueError, match="longer than the row width 512"):
        packed_batches([100, 513], rows=4, width=512, seed=0, epoch=0, lookahead=4)


def test_best_fill_finds_the_fullest_subset_and_prefers_early_items() -> None:
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(0, 9))]
        room = rng.randint(0, 120)
        pool = list(range(len(lengths)))
        picked = best_fill(lengths, pool, room)
        sums = [sum(lengths[i] for i in c) for k in range(len(pool) + 1) for c in itertools.combinations(pool, k)]
        assert sum(lengths[i] for i in picked) == max(s for s in sums if s <= room)
        assert picked == sorted(set(picked))
    assert best_fill([5, 5, 5], [0, 1, 2], room=10) == [0, 1]
    assert best_fill([7, 3, 4], [2, 0, 1], room=7) == [0]  # {7} can do without the pool's last item
    assert best_fill([9], [0], room=5) == []


def test_packed_sampler_shards_over_processes_and_resumes_mid_epoch() -> None:
    lengths = [(i * 13) % 40 + 5 for i in range(120)]
    one = PackedBatchSampler(lengths, rows=2, width=48, seed=0)
    ranks = [PackedBatchSampler(lengths, rows=2, width=48, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    everything = list(one)
    assert len(ranks[0]) == len(ranks[1]) == len(everything) // 2
    assert [b for pair in zip(*ranks, strict=True) for b in pair] == everything[:2 * len(ranks[0])]
    one.skip(3)
    assert list(one) == everything[3:] and list(one) == everything  # skip applies to the next pass only
    one.set_epoch(1)
    assert list(one) != everything


def test_pack_rows_collate_lays_samples_out_with_their_starts() -> None:
    samples = [Sample([1, 2, 3, 4], [False, False, True, True], "a"), Sample([5, 6, 7], [False, True, True], "b"),
               Sample([8, 9, 10, 11, 12], [True] * 5, "c")]
    batch = pack_rows_collate(samples, width=5, rows=2)  # inputs 3, 2, 4 → rows [a, b] and [c]
    assert batch.tokens.tolist() == [[1, 2, 3, 5, 6], [8, 9, 10, 11, 0]]
    assert batch.targets.tolist() == [[2, 3, 4, 6, 7], [9, 10, 11, 12, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True, True, True], [True, True, True, True, False]]
    assert batch.starts.tolist() == [[True, False, False, True, False], [True, False, False, False, False]]
    assert (batch.n_real, batch.n_targets, batch.n_sequences, batch.cu_seqlens) == (9, 8, 3, None)
    assert batch.scored.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, -1, -1]  # scored positions, padded to rows of 5
    with pytest.raises(ValueError, match="do not fit 1 rows of 5 tokens"):
        pack_rows_collate(samples, width=5, rows=1)
