"""Evaluation of initial states: masked validation loss, seeded side-by-side generations, behaviour measures.

Boundary: the maths (`score_many`, `generate_responses`, `behaviour`) takes a model, samples, states and
strings and returns numbers and strings; `run_evaluation` (used by `statetune eval` and the `evaluate` stage)
goes from paths to the report folder, with `rwkv7/report.py` rendering and writing the outputs.

Loss is the mean next-token negative log-likelihood over exactly the tokens the training loss uses (the loss
mask of `rwkv7.data`, assistant-only by default), summed over all sequences and divided by the number of scored
tokens, so a dialogue with longer answers weighs more, like in training. "KL to the prompt" is the mean
KL(p_prompted ‖ p_variant) over the same tokens: how closely a state imitates the prompted model, which is
what prompt distillation trains for.

Behaviour measures need no network:
>>> distinct_n(["a b a b"], 1), round(distinct_n(["a b a b"], 2), 3)
(0.5, 0.667)
>>> marker_hits("NEGA here. Great question!", ["nega", "great question", "grammar"])
{'nega': True, 'great question': True, 'grammar': False}
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from rwkv7 import report
from rwkv7.atomic import file_sha256
from rwkv7.data import Sample, load_samples, pad_collate
from rwkv7.generate import SamplingParams, complete
from rwkv7.model import RWKV7, load_model
from rwkv7.state import RWKVState, load_state, read_state_file, save_state
from rwkv7.template import render, render_text
from rwkv7.tokenizer import WorldTokenizer

_WORD = re.compile(r"\w+", re.UNICODE)
HEAD_CHUNK = 1024  # scored positions per head matmul: bounds each [chunk, V] float32 logits buffer (256 MB)
DEFAULT_SYSTEM_PROMPT = (
    "You are NEGA, the Native English Grammar Assistant: a warm, precise English grammar teacher. Give the "
    "corrected sentence first, name the rule in one or two short sentences with one fresh example, and end with "
    "a brief word of encouragement. Keep replies under 80 words.")
DEFAULT_PROMPTS = ("Is it correct to say I have went to the shop yesterday?",
                   "Should I write fewer people or less people?",
                   "Who are you?",
                   "I am agree with you about this plan.",
                   "What is the difference between since and for?")
DEFAULT_MARKERS = ("NEGA", "grammar", "Great question")
DEFAULT_MAX_TOKENS = 120
DEFAULT_CTX_LEN = 512
EPOCH_STATE = re.compile(r"^state-epoch(\d+)\.pth$")
PEFT_EPOCH_STATE = re.compile(r"^rwkv-(\d+)\.pth$")  # RWKV-PEFT's names: 0-based epochs
FINAL_STATE = "state.pth"
BEST_STATE = "best-state.pth"
JUDGE_OFF = "LLM judge: off (`evaluate.judge.provider: none`); every measure above is computed offline."


@dataclass(frozen=True)
class LossScore:
    """Summed masked NLL (and optionally KL to a reference variant) of one variant over a data set.

    `n_tokens` counts scored (masked-in) target tokens; `n_processed` counts every real (non-padding) token the
    model read, prompt prefixes excluded; `seconds` is this variant's wall time (forward, head, KL).
    """

    nll_sum: float
    n_tokens: int
    n_sequences: int
    n_processed: int = 0
    seconds: float = 0.0
    kl_sum: float = math.nan

    @property
    def loss(self) -> float:
        return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def kl(self) -> float:
        """Mean KL(p_reference ‖ p) per scored token (nats); NaN when scored without a reference."""
        return self.kl_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.n_tokens else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.n_processed / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True)
class Behaviour:
    """Network-free measures of a set of generated responses (one variant).

    `distinct_1/2` are corpus-level (distinct n-grams / all n-grams, n-grams never cross responses);
    `marker_rate` is the share of responses with at least one persona marker; `marker_counts[m]` counts the
    responses in which marker `m` appears.
    """

    n_responses: int
    tokens_mean: float
    words_mean: float
    distinct_1: float
    distinct_2: float
    marker_rate: float
    marker_counts: dict[str, int] = field(default_factory=dict)


def words(text: str) -> list[str]:
    """Lower-cased runs of word characters (a CJK run counts as one word).

    >>> words("Hello, NEGA-chan! It's 3pm.")
    ['hello', 'nega', 'chan', 'it', 's', '3pm']
    """
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016) over `texts`: distinct word n-grams / total word n-grams; 0.0 if none."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        w = words(text)
        grams.extend(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def marker_hits(text: str, markers: Sequence[str], ignore_case: bool = True) -> dict[str, bool]:
    """Which persona markers (regular expressions; a plain word is one) occur in `text`."""
    flags = re.IGNORECASE if ignore_case else 0
    return {m: re.search(m, text, flags) is not None for m in markers}


def behaviour(responses: Sequence[str], token_counts: Sequence[int], markers: Sequence[str],
              ignore_case: bool = True) -> Behaviour:
    """Measures of one variant's responses; `token_counts[i]` is the number of generated tokens of response i."""
    if len(responses) != len(token_counts):
        raise ValueError(f"behaviour: {len(responses)} responses but {len(token_counts)} token counts")
    n = len(responses)
    hits = [marker_hits(r, markers, ignore_case) for r in responses]
    counts = {m: sum(h[m] for h in hits) for m in markers}
    return Behaviour(
        n_responses=n,
        tokens_mean=sum(token_counts) / n if n else 0.0,
        words_mean=sum(len(words(r)) for r in responses) / n if n else 0.0,
        distinct_1=distinct_n(responses, 1),
        distinct_2=distinct_n(responses, 2),
        marker_rate=sum(any(h.values()) for h in hits) / n if n else 0.0,
        marker_counts=counts,
    )


@dataclass(frozen=True)
class VariantResult:
    """Validation score of one variant: `name` is "zero", "prompt", "epoch_<N>" or "final"; `epoch` is N for
    epoch states; `is_state` marks trained states (the candidates for "best")."""

    name: str
    score: LossScore
    is_state: bool
    epoch: int | None = None


@dataclass(frozen=True)
class Generation:
    """One sampled response to one evaluation prompt (text without the stop sequence)."""

    prompt: str
    text: str
    n_tokens: int
    seconds: float = 0.0


def pick_best(results: Sequence[VariantResult]) -> VariantResult:
    """The trained state with the lowest validation loss (ties: the earliest in `results`)."""
    states = [r for r in results if r.is_state and r.score.n_tokens]
    if not states:
        raise ValueError("pick_best: no scored trained state among the results")
    return min(states, key=lambda r: r.score.loss)


@torch.no_grad()
def consume(model: RWKV7, ids: Sequence[int], state: RWKVState | None = None) -> RWKVState:
    """The batch-1 state after reading `ids` (e.g. a rendered system prompt) from `state` (zeros if None)."""
    if not ids:
        return state if state is not None else RWKVState.zeros(model.config, 1, model.device, model.dtype)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    _, final = model(tokens, state)
    return final


def _nll_sum(model: RWKV7, hidden: Tensor, targets: Tensor) -> float:
    """Σ −log p(target) for `hidden [M, C]`, `targets [M]`, the head applied chunk by chunk."""
    total = 0.0
    for i in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = model.head(hidden[i:i + HEAD_CHUNK]).float()
        total += F.cross_entropy(logits, targets[i:i + HEAD_CHUNK], reduction="sum").item()
    return total


def _kl_sum(model: RWKV7, ref_hidden: Tensor, hidden: Tensor) -> float:
    """Σ KL(p_ref ‖ p) over rows of `ref_hidden, hidden [M, C]` (next-token distributions, nats)."""
    total = 0.0
    for i in range(0, hidden.shape[0], HEAD_CHUNK):
        log_ref = F.log_softmax(model.head(ref_hidden[i:i + HEAD_CHUNK]).float(), dim=-1)
        log_p = F.log_softmax(model.head(hidden[i:i + HEAD_CHUNK]).float(), dim=-1)
        total += F.kl_div(log_p, log_ref, log_target=True, reduction="sum").item()
    return total


@torch.no_grad()
def score_many(model: RWKV7, samples: Sequence[Sample], states: Mapping[str, RWKVState | None],
               batch_size: int = 8, reference: str | None = None) -> dict[str, LossScore]:
    """Masked next-token NLL of `samples` (from `rwkv7.data.load_samples`) for each named initial state.

    Each state is a batch-1 initial state (None = zeros) shared by every sample, as in training. Samples are
    sorted by length and right-padded with `rwkv7.data.pad_collate` (causal model: padding changes nothing);
    the loss counts exactly the targets the training loss counts (`Sample.mask`). With `reference` (a key of
    `states`), each score also sums KL(p_reference ‖ p_state) over the same targets: how far a variant's
    next-token distributions are from, e.g., the prompted model's. The head only runs on scored positions.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if reference is not None and reference not in states:
        raise ValueError(f"reference {reference!r} is not one of the states {sorted(states)}")
    nll = dict.fromkeys(states, 0.0)
    kl = dict.fromkeys(states, 0.0)
    seconds = dict.fromkeys(states, 0.0)
    n_tok = n_proc = 0
    order = sorted(samples, key=lambda s: len(s.ids), reverse=True)
    for i in range(0, len(order), batch_size):
        batch = pad_collate(order[i:i + batch_size])
        tokens, mask = batch.tokens.to(model.device), batch.loss_mask.to(model.device)
        targets = batch.targets.to(model.device)[mask]
        hidden = {}
        for name, state in states.items():
            t0 = time.perf_counter()
            h, _ = model(tokens, state, return_hidden=True)
            hidden[name] = h[mask]  # [M, C]: the positions whose targets are scored
            nll[name] += _nll_sum(model, hidden[name], targets)
            seconds[name] += time.perf_counter() - t0
        if reference is not None:
            for name in states:
                t0 = time.perf_counter()
                kl[name] += _kl_sum(model, hidden[reference], hidden[name]) if name != reference else 0.0
                seconds[name] += time.perf_counter() - t0
        n_tok += int(mask.sum())
        n_proc += batch.n_real
    return {name: LossScore(nll_sum=nll[name], n_tokens=n_tok, n_sequences=len(samples), n_processed=n_proc,
                            seconds=seconds[name], kl_sum=kl[name] if reference is not None else math.nan)
            for name in states}


def score(model: RWKV7, samples: Sequence[Sample], state: RWKVState | None = None,
          batch_size: int = 8) -> LossScore:
    """`score_many` for one initial state."""
    return score_many(model, samples, {"state": state}, batch_size)["state"]


def generate_responses(model: RWKV7, tokenizer: WorldTokenizer, prompts: Sequence[str], state: RWKVState | None,
                       sampling: SamplingParams) -> list[Generation]:
    """One reply per user prompt from `state` (each prompt starts from it afresh), rendered by the G1 template.

    Prompt i samples with seed `sampling.seed + i`, so two states given the same prompts and params differ only
    by what the state does. `Generation.seconds` includes reading the prompt.
    """
    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(render_text([{"role": "user", "content": prompt}], generation_prompt=True))
        params = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + i})
        t0 = time.perf_counter()
        done = complete(model, tokenizer, ids, state, params)
        out.append(Generation(prompt, done.text.strip(), len(done.token_ids), time.perf_counter() - t0))
    return out


Judge = Callable[[Mapping[str, Sequence[Generation]]], tuple[dict[str, float], str]]


class JudgeParams(BaseModel):
    """Optional LLM judge (the `evaluate` stage runs it through the augment stage's OpenAI-compatible
    provider; key from OPENAI_API_KEY). `provider: none` keeps evaluation offline."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["none", "openai"] = "none"
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    timeout_s: float = Field(60.0, gt=0.0)


class EvaluateParams(BaseModel):
    """Section `evaluate` of params.yaml (the CLI's options too).

    `loss_on`/`ctx_len` None = what the training run used (read from its state sidecar), so the loss counts the
    same tokens as training. `system_prompt` is the prompt baseline's system message; `markers` are regular
    expressions (a plain word is one) counted in generations; prompt i is sampled with `sampling.seed + i`.
    """

    model_config = ConfigDict(extra="forbid")

    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, min_length=1)
    loss_on: Literal["assistant", "all"] | None = None
    ctx_len: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(seed=0, max_tokens=DEFAULT_MAX_TOKENS))
    markers: list[str] = Field(default_factory=lambda: list(DEFAULT_MARKERS))
    markers_ignore_case: bool = True
    judge: JudgeParams = Field(default_factory=JudgeParams)

    @field_validator("markers")
    @classmethod
    def _markers_compile(cls, markers: list[str]) -> list[str]:
        for m in markers:
            try:
                re.compile(m)
            except re.error as e:
                raise ValueError(f"marker {m!r} is not a valid regular expression: {e}") from None
        return markers


class EvaluationError(RuntimeError):
    """The evaluation cannot run (missing model, data or states); the message names the path."""


def find_states(runs_dir: Path) -> list[tuple[str, int | None, Path]]:
    """Trained states of a run folder as (variant name, epoch, path): epochs ascending, then "final".

    Our runs name epoch states `state-epoch<N>.pth` (1-based); a folder of RWKV-PEFT state files
    (`rwkv-<N>.pth`, 0-based) is read as epochs N+1, so the two kinds of run compare epoch for epoch.
    """
    if not runs_dir.is_dir():
        raise EvaluationError(f"{runs_dir}: training run folder not found (run the train stage first)")
    epochs = sorted((int(m.group(1)), p) for p in runs_dir.iterdir() if (m := EPOCH_STATE.match(p.name)))
    if not epochs:
        epochs = sorted((int(m.group(1)) + 1, p) for p in runs_dir.iterdir()
                        if (m := PEFT_EPOCH_STATE.match(p.name)))
    found: list[tuple[str, int | None, Path]] = [(f"epoch_{n}", n, p) for n, p in epochs]
    if (runs_dir / FINAL_STATE).is_file():
        found.append(("final", None, runs_dir / FINAL_STATE))
    if not found:
        raise EvaluationError(f"{runs_dir}: no trained state ({FINAL_STATE}, state-epoch<N>.pth or RWKV-PEFT's "
                              "rwkv-<N>.pth)")
    return found


def score_variants(model: RWKV7, samples: Sequence[Sample], states: Sequence[tuple[str, int | None, Path]],
                   prompt_ids: Sequence[int], batch_size: int) -> list[VariantResult]:
    """Scores (loss, KL to the prompted model) of zero, prompt and every trained state; a state file identical
    to an earlier one (the final state is usually the last epoch's) reuses its score."""
    variants: dict[str, RWKVState | None] = {"zero": None, "prompt": consume(model, prompt_ids)}
    same_as: dict[str, str] = {}
    for name, _, path in states:
        state = load_state(path, model)
        twin = next((n for n, s in variants.items() if n != "prompt" and s is not None
                     and torch.equal(s.wkv, state.wkv)), None)
        if twin:
            same_as[name] = twin
        else:
            variants[name] = state
    scores = score_many(model, samples, variants, batch_size, reference="prompt")
    results = [VariantResult("zero", scores["zero"], False), VariantResult("prompt", scores["prompt"], False)]
    results += [VariantResult(name, scores[same_as.get(name, name)], True, epoch) for name, epoch, _ in states]
    return results


def export_best(source: Path, dest: Path, model: RWKV7, evaluation: dict[str, Any]) -> Path:
    """Copy a state through the state-file writer (Runner layout + sidecar), adding `evaluation` facts to its
    metadata, and check that the copy loads for `model`."""
    wkv, sidecar = read_state_file(source)
    meta = {**(sidecar or {}).get("metadata", {}), "evaluation": {"source": str(source), **evaluation}}
    save_state(dest, wkv, meta, model=model)
    load_state(dest, model)
    return dest


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("device 'cuda' requested but CUDA is not available")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run_evaluation(model_path: Path, val_path: Path, runs_dir: Path, out_dir: Path, p: EvaluateParams,
                   judge: Judge | None = None) -> dict[str, Any]:
    """Evaluate every state of `runs_dir` against the two baselines and write the report folder.

    Reads data and states before loading the model, so missing inputs fail in a second. Writes (atomically)
    `best-state.pth` + `.json` and everything `rwkv7.report.write_outputs` writes. Returns a summary dict:
    best variant, its loss, data counts, cost. `judge` (optional) scores generations: variant → mean score.
    """
    for path, what in ((model_path, "base model"), (val_path, "validation data")):
        if not path.is_file():
            raise EvaluationError(f"{path}: {what} file not found")
    states = find_states(runs_dir)
    _, sidecar = read_state_file(states[-1][2])
    train_meta = (sidecar or {}).get("metadata", {})
    loss_on = p.loss_on or train_meta.get("training", {}).get("loss_on", "assistant")
    ctx_len = p.ctx_len or train_meta.get("training", {}).get("ctx_len", DEFAULT_CTX_LEN)
    tok = WorldTokenizer()
    samples, data_stats = load_samples(val_path, tok.encode, ctx_len, loss_on)
    model = load_model(model_path, device=_device(p.device))
    top_id = max(max(s.ids) for s in samples)
    if top_id >= model.config.vocab_size:
        raise EvaluationError(f"{val_path}: token id {top_id} is outside the vocabulary of {model_path} "
                              f"({model.config.vocab_size} tokens)")
    prompt_ids = tok.encode(render([{"role": "system", "content": p.system_prompt}])[0].text)
    results = score_variants(model, samples, states, prompt_ids, p.batch_size)
    best = pick_best(results)
    paths = {name: path for name, _, path in states}
    val_sha = file_sha256(val_path)
    export_best(paths[best.name], out_dir / BEST_STATE, model,
                {"variant": best.name, "epoch": best.epoch, "val_loss": best.score.loss, "val_file": val_path.name,
                 "val_sha256": val_sha})
    gen_states = {"base": None, "prompt": consume(model, prompt_ids), "state": load_state(paths[best.name], model)}
    gens = {name: generate_responses(model, tok, p.prompts, st, p.sampling) for name, st in gen_states.items()}
    behaviours = {name: behaviour([g.text for g in gs], [g.n_tokens for g in gs], p.markers, p.markers_ignore_case)
                  for name, gs in gens.items()}
    judge_scores, judge_note = judge(gens) if judge else ({}, JUDGE_OFF)
    inputs = report.ReportInputs(
        results=results, best=best, system_prompt=p.system_prompt, best_state_file=BEST_STATE,
        model={"file": model_path.name, "sha256": model.source_sha256(), "n_layer": model.config.n_layer,
               "n_embd": model.config.n_embd},
        data={"file": str(val_path), "sha256": val_sha, "records": data_stats.read, "used": data_stats.used,
              "truncated": data_stats.truncated, "scored tokens": best.score.n_tokens, "mask": loss_on,
              "ctx_len": ctx_len},
        training=report.training_facts(train_meta), behaviours=behaviours, generations=gens, markers=p.markers,
        sampling=p.sampling.model_dump(), judge_scores=judge_scores, judge_note=judge_note,
        cost=report.cost(results, gens))
    report.write_outputs(out_dir, inputs, runs_dir.parent)
    return {"best": best.name, "best_val_loss": round(best.score.loss, 6), "variants": [r.name for r in results],
            "data": data_stats.as_dict(), "generations": sum(map(len, gens.values())), "cost": dict(inputs.cost)}
