"""Evaluation of initial states: masked validation loss, seeded side-by-side generations, behaviour measures.

Boundary: model, token ids, states and strings in; numbers and strings out. No files (the `evaluate` stage in
`tasks/evaluate.py` finds and writes them; `rwkv7/report.py` renders them).

Loss is the mean next-token negative log-likelihood over exactly the tokens the training loss uses (the loss
mask of `rwkv7.data`, assistant-only by default), summed over all sequences and divided by the number of scored
tokens, so a variant with longer answers weighs more, like in training.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv7.data import Sample, pad_collate
from rwkv7.model import RWKV7
from rwkv7.state import RWKVState

_WORD = re.compile(r"\w+", re.UNICODE)
HEAD_CHUNK = 4096  # scored positions per head matmul: bounds the [chunk, V] logits buffer (V = 65536)


@dataclass(frozen=True)
class LossScore:
    """Summed masked NLL of one variant over a data set.

    `n_tokens` counts scored (masked-in) target tokens; `n_processed` counts every real (non-padding) token the
    model read, prompt prefixes excluded; `seconds` is wall time of the forward passes.
    """

    nll_sum: float
    n_tokens: int
    n_sequences: int
    n_processed: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

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


def _masked_nll(model: RWKV7, hidden: Tensor, targets: Tensor, mask: Tensor) -> float:
    """Sum of −log p(target) over masked positions; the head runs only on the scored positions.

    `hidden [B, T, C]`, `targets [B, T]`, `mask [B, T]` bool.
    """
    h, t = hidden[mask], targets[mask]  # [M, C], [M]
    total = 0.0
    for i in range(0, h.shape[0], HEAD_CHUNK):
        logits = model.head(h[i:i + HEAD_CHUNK]).float()
        total += F.cross_entropy(logits, t[i:i + HEAD_CHUNK], reduction="sum").item()
    return total


@torch.no_grad()
def score(model: RWKV7, samples: Sequence[Sample], state: RWKVState | None = None,
          batch_size: int = 8) -> LossScore:
    """Masked next-token NLL of `samples` (from `rwkv7.data.load_samples`) read from `state`, batched.

    `state` is a batch-1 initial state (zeros if None) shared by every sample, as in training. Samples are
    sorted by length and right-padded with `rwkv7.data.pad_collate` (causal model: padding changes nothing);
    the loss counts exactly the targets the training loss counts (`Sample.mask`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(samples, key=lambda s: len(s.ids), reverse=True)
    nll, n_tok, n_proc = 0.0, 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(order), batch_size):
        batch = pad_collate(order[i:i + batch_size])
        mask = batch.loss_mask.to(model.device)
        hidden, _ = model(batch.tokens.to(model.device), state, return_hidden=True)
        nll += _masked_nll(model, hidden, batch.targets.to(model.device), mask)
        n_tok += int(mask.sum())
        n_proc += batch.n_real
    return LossScore(nll_sum=nll, n_tokens=n_tok, n_sequences=len(samples), n_processed=n_proc,
                     seconds=time.perf_counter() - t0)
