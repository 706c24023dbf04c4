"""Evaluation maths and report rendering: hand-checkable behaviour measures, masked loss against a full-logits
reference, the prompt baseline as a consumed prefix, metrics/plot rows, PNG charts and the Markdown report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

from rwkv7.checkpoint import inspect_checkpoint, random_checkpoint
from rwkv7.data import Sample
from rwkv7.evaluate import (EvaluationError, Generation, LossScore, VariantResult, behaviour, consume, distinct_n,
                            find_states, generate_responses, marker_hits, pick_best, score, score_many, words)
from rwkv7.generate import SamplingParams
from rwkv7.model import build_model
from rwkv7.report import (ReportError, ReportInputs, metrics, plot_training_curves, plot_val_loss, read_curves,
                          render_markdown, val_loss_rows)
from rwkv7.tokenizer import WorldTokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOCAB = 1000


@pytest.fixture(scope="module")
def small_model():
    sd = random_checkpoint(n_layer=2, n_embd=64, vocab_size=VOCAB, seed=3)
    return build_model(sd, inspect_checkpoint(sd))


def _samples(lengths: list[int], seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [Sample(torch.randint(1, VOCAB, (n,), generator=g).tolist(), [i % 3 == 0 for i in range(n)], f"s{n}")
            for n in lengths]


def _reference_nll(model, samples: list[Sample], state=None) -> tuple[float, int]:
    """One sequence at a time, full logits: sum of −log p over targets t with mask[t+1]."""
    total, n = 0.0, 0
    for s in samples:
        logits, _ = model(torch.tensor([s.ids]), state)
        nll = F.cross_entropy(logits[0, :-1], torch.tensor(s.ids[1:]), reduction="none")
        keep = torch.tensor(s.mask[1:])
        total += nll[keep].sum().item()
        n += int(keep.sum())
    return total, n


def test_words_and_distinct_n_by_hand():
    assert words("Hi, NEGA! it's") == ["hi", "nega", "it", "s"]
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # n-grams never cross responses: "b c" is not a bigram here
    assert distinct_n(["a b", "c d"], 2) == 1.0
    assert distinct_n(["", "one"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(["x"], 0)


def test_marker_hits_and_behaviour_by_hand():
    assert marker_hits("Great question! NEGA says", ["nega", "grammar"]) == {"nega": True, "grammar": False}
    assert marker_hits("nega", ["NEGA"], ignore_case=False) == {"NEGA": False}
    assert marker_hits("I said: gramar", [r"gramm?ar"]) == {r"gramm?ar": True}
    b = behaviour(["NEGA is here", "the the the", "Great question about grammar"], [4, 3, 5],
                  ["NEGA", "grammar", "Great question"])
    assert b.n_responses == 3
    assert b.tokens_mean == 4.0
    assert b.words_mean == pytest.approx((3 + 3 + 4) / 3)
    assert b.distinct_1 == pytest.approx(8 / 10)  # nega is here the great question about grammar / 10 words
    assert b.marker_rate == pytest.approx(2 / 3)
    assert b.marker_counts == {"NEGA": 1, "grammar": 1, "Great question": 1}
    with pytest.raises(ValueError, match="token counts"):
        behaviour(["a"], [], [])


def test_score_matches_full_logits_reference_and_ignores_batching(small_model):
    samples = _samples([5, 17, 9, 30, 2])
    ref_nll, ref_n = _reference_nll(small_model, samples)
    for batch_size in (1, 3, 8):
        s = score(small_model, samples, batch_size=batch_size)
        assert s.n_tokens == ref_n
        assert s.n_sequences == 5
        assert s.n_processed == sum(len(x.ids) - 1 for x in samples)
        assert s.loss == pytest.approx(ref_nll / ref_n, rel=1e-5)
    assert s.perplexity == pytest.approx(math.exp(s.loss))
    with pytest.raises(ValueError, match="batch_size"):
        score(small_model, samples, batch_size=0)


def test_prompt_baseline_equals_scoring_the_concatenation(small_model):
    """Consuming a prefix into the state, then scoring, = scoring prefix+sequence with the prefix unscored."""
    prefix = [11, 22, 33, 44]
    samples = _samples([7, 12], seed=1)
    # in the joined sequence the dialogue's first token has a prediction too; the loss never counts it
    joined = [Sample(prefix + s.ids, [False] * (len(prefix) + 1) + s.mask[1:], s.source) for s in samples]
    ref_nll, ref_n = _reference_nll(small_model, joined)
    got = score(small_model, samples, state=consume(small_model, prefix))
    assert got.n_tokens == ref_n
    assert got.loss == pytest.approx(ref_nll / ref_n, rel=1e-5)
    zero = score(small_model, samples)
    assert got.loss != pytest.approx(zero.loss)
    assert consume(small_model, []).wkv.abs().sum() == 0


def _result(name: str, loss: float, epoch: int | None = None, is_state: bool = True) -> VariantResult:
    return VariantResult(name, LossScore(nll_sum=loss * 100, n_tokens=100, n_sequences=4), is_state, epoch)


SYNTHETIC = [_result("zero", 3.0, is_state=False), _result("prompt", 2.0, is_state=False),
             _result("epoch_1", 2.6, 1), _result("epoch_2", 2.1, 2), _result("epoch_3", 2.2, 3),
             _result("final", 2.2)]


def test_pick_best_metrics_and_plot_rows_on_synthetic_numbers():
    best = pick_best(SYNTHETIC)
    assert best.name == "epoch_2"
    b = behaviour(["NEGA ok"], [3], ["NEGA"])
    m = metrics(SYNTHETIC, best, {"base": b, "state": b})
    assert m["val_loss"] == {"zero": 3.0, "prompt": 2.0, "epoch_1": 2.6, "epoch_2": 2.1, "epoch_3": 2.2,
                             "final": 2.2}
    assert m["best"]["variant"] == "epoch_2" and m["best"]["epoch"] == 2
    assert m["best"]["improvement_vs_zero"] == pytest.approx(0.9)
    assert m["best"]["improvement_vs_prompt"] == pytest.approx(-0.1)
    assert m["best"]["prompt_gap_closed"] == pytest.approx(0.9)
    assert m["behaviour"]["state"]["marker_rate"] == 1.0
    json.dumps(m)  # JSON-able as is
    rows = val_loss_rows(SYNTHETIC)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1] == {"epoch": 2, "state": 2.1, "zero": 3.0, "prompt": 2.0}
    with pytest.raises(ValueError, match="no scored trained state"):
        pick_best(SYNTHETIC[:2])


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    height, width = img.shape[:2]
    assert 200 <= width <= 2000 and 150 <= height <= 1500


def test_charts_are_valid_pngs(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,epoch,train_loss,val_loss\n0,0,3.0,\n1,0,2.5,\n2,0,2.2,2.4\n3,1,2.0,\n",
                        encoding="utf-8")
    curves = read_curves(csv_path)
    assert curves["train_loss"] == ([0.0, 1.0, 2.0, 3.0], [3.0, 2.5, 2.2, 2.0])
    assert curves["val_loss"] == ([2.0], [2.4])
    _check_png(plot_training_curves({"train": curves}, tmp_path / "train_loss.png"))
    _check_png(plot_val_loss(SYNTHETIC, tmp_path / "val_loss.png"))
    no_epochs = [r for r in SYNTHETIC if r.epoch is None]
    _check_png(plot_val_loss(no_epochs, tmp_path / "final_only.png"))
    assert not list(tmp_path.glob(".*.tmp"))
    bad = tmp_path / "bad.csv"
    bad.write_text("step,lr\n0,1\n", encoding="utf-8")
    with pytest.raises(ReportError, match="bad.csv: no loss column"):
        read_curves(bad)


def test_markdown_report_has_numbers_generations_and_usage():
    best = pick_best(SYNTHETIC)
    gens = {"base": [Generation("Who are you?", "I am a | model\nok", 5)],
            "state": [Generation("Who are you?", "I am NEGA.", 4)]}
    text = render_markdown(ReportInputs(
        results=SYNTHETIC, best=best, model={"file": "base.pth", "sha256": "ab" * 32},
        data={"file": "val.jsonl", "records": 4}, system_prompt="You are NEGA.", best_state_file="best-state.pth",
        behaviours={"base": behaviour(["I am a | model\nok"], [5], ["NEGA"]),
                    "state": behaviour(["I am NEGA."], [4], ["NEGA"])},
        generations=gens, markers=["NEGA"], sampling={"seed": 0, "temperature": 1.0, "top_p": 0.5,
                                                      "max_tokens": 50},
        charts={"Validation loss": "val_loss.png"}))
    assert "Best state: **state after epoch 2**, validation loss **2.1000**" in text
    assert "| state after epoch 2 (best) | 2.1000 |" in text
    assert "| base model + system prompt | 2.0000 |" in text
    assert "I am a \\| model<br>ok" in text and "I am NEGA." in text
    assert "![Validation loss](val_loss.png)" in text
    assert "state[3 * i + 1]" in text and "RWKV-Runner" in text and "best-state.pth" in text
    assert "| marker `NEGA` | 0/1 | 1/1 |" in text


def test_score_many_kl_to_reference_matches_a_direct_computation(small_model):
    samples = _samples([6, 11], seed=2)
    prompted = consume(small_model, [5, 6, 7])
    got = score_many(small_model, samples, {"zero": None, "prompt": prompted}, batch_size=2, reference="prompt")
    assert got["prompt"].kl == 0.0
    expected, n = 0.0, 0
    for s in samples:
        tokens = torch.tensor([s.ids])
        log_p = F.log_softmax(small_model(tokens)[0][0, :-1], -1)
        log_ref = F.log_softmax(small_model(tokens, prompted)[0][0, :-1], -1)
        keep = torch.tensor(s.mask[1:])
        expected += (log_ref.exp() * (log_ref - log_p)).sum(-1)[keep].sum().item()
        n += int(keep.sum())
    assert got["zero"].kl == pytest.approx(expected / n, rel=1e-4)
    assert got["zero"].loss == pytest.approx(score(small_model, samples).loss, rel=1e-6)
    assert math.isnan(score(small_model, samples).kl)
    with pytest.raises(ValueError, match="reference 'nope'"):
        score_many(small_model, samples, {"zero": None}, reference="nope")


def test_generate_responses_is_seeded_per_prompt():
    sd = random_checkpoint(n_layer=1, n_embd=64, seed=4)
    model = build_model(sd, inspect_checkpoint(sd))
    tok = WorldTokenizer()
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=5, seed=11)
    first = generate_responses(model, tok, ["Who are you?", "Hi"], None, sampling)
    again = generate_responses(model, tok, ["Who are you?", "Hi"], None, sampling)
    assert [g.text for g in first] == [g.text for g in again]
    assert [g.prompt for g in first] == ["Who are you?", "Hi"]
    assert all(1 <= g.n_tokens <= 5 and g.seconds > 0 for g in first)
    other = generate_responses(model, tok, ["Who are you?"], None, sampling.model_copy(update={"seed": 12}))
    assert other[0].text != first[0].text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_score_many_on_cuda_matches_cpu():
    """bf16 weights on the GPU (fla kernels when installed) against the fp32 CPU reference."""
    sd = random_checkpoint(n_layer=2, n_embd=128, vocab_size=VOCAB, seed=5)
    cpu = build_model(sd, inspect_checkpoint(sd))
    gpu = build_model(sd, inspect_checkpoint(sd), device="cuda")
    samples = _samples([40, 64, 23], seed=4)
    prefix = [9, 8, 7, 6]
    want = score_many(cpu, samples, {"zero": None, "prompt": consume(cpu, prefix)}, reference="prompt")
    got = score_many(gpu, samples, {"zero": None, "prompt": consume(gpu, prefix)}, reference="prompt")
    for name in want:
        assert got[name].n_tokens == want[name].n_tokens
        assert got[name].loss == pytest.approx(want[name].loss, rel=2e-2)
    assert got["zero"].kl == pytest.approx(want["zero"].kl, rel=0.2, abs=1e-3)


def test_find_states_reads_our_epochs_and_rwkv_peft_runs(tmp_path: Path) -> None:
    ours, peft = tmp_path / "ours", tmp_path / "peft"
    for folder, names in ((ours, ["state-epoch2.pth", "state-epoch10.pth", "state.pth", "notes.txt"]),
                          (peft, ["rwkv-0.pth", "rwkv-1.pth", "rwkv-final.pth"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"")
    assert [(name, epoch, p.name) for name, epoch, p in find_states(ours)] == [
        ("epoch_2", 2, "state-epoch2.pth"), ("epoch_10", 10, "state-epoch10.pth"), ("final", None, "state.pth")]
    # RWKV-PEFT counts epochs from 0: rwkv-0.pth is the state after the first epoch
    assert [(name, epoch, p.name) for name, epoch, p in find_states(peft)] == [
        ("epoch_1", 1, "rwkv-0.pth"), ("epoch_2", 2, "rwkv-1.pth")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="rwkv-<N>.pth"):
        find_states(tmp_path / "empty")
