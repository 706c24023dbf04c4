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

from rwkv7.model import RWKV7
from rwkv7.state import RWKVState

_WORD = re.compile(r"\w+", re.UNICODE)
PAD_ID = 0
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


@dataclass(frozen=True)
class Scored:
    """One sequence to score: `ids [T]` and `mask [T]`, mask[t] true when token t is a target of the loss
    (predicted from tokens < t). Position 0 is never scored: from the zero state nothing predicts it."""

    ids: Sequence[int]
    mask: Sequence[bool]


@torch.no_grad()
def consume(model: RWKV7, ids: Sequence[int], state: RWKVState | None = None) -> RWKVState:
    """The batch-1 state after reading `ids` (e.g. a system prompt) from `state` (zeros if None)."""
    if not ids:
        return state if state is not None else RWKVState.zeros(model.config, 1, model.device, model.dtype)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    _, final = model(tokens, state)
    return final


def _batches(seqs: Sequence[Scored], batch_size: int) -> list[list[Scored]]:
    order = sorted(seqs, key=lambda s: len(s.ids), reverse=True)  # similar lengths together: little padding
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(batch: Sequence[Scored], device: torch.device) -> tuple[Tensor, Tensor]:
    """`tokens [B, T]` right-padded with PAD_ID, `mask [B, T]` (False on padding)."""
    T = max(len(s.ids) for s in batch)
    tokens = torch.full((len(batch), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, s in enumerate(batch):
        if len(s.ids) != len(s.mask):
            raise ValueError(f"sequence {i}: {len(s.ids)} ids but {len(s.mask)} mask entries")
        tokens[i, :len(s.ids)] = torch.tensor(list(s.ids), dtype=torch.long)
        mask[i, :len(s.mask)] = torch.tensor(list(s.mask), dtype=torch.bool)
    return tokens.to(device), mask.to(device)


def _masked_nll(model: RWKV7, hidden: Tensor, tokens: Tensor, mask: Tensor) -> float:
    """Sum of −log p(token t | < t) over masked t ≥ 1; the head runs only on the positions that are scored."""
    scored = mask[:, 1:]
    h = hidden[:, :-1][scored]       # [M, C]: the hidden state that predicts each scored target
    targets = tokens[:, 1:][scored]  # [M]
    total = 0.0
    for i in range(0, h.shape[0], HEAD_CHUNK):
        logits = model.head(h[i:i + HEAD_CHUNK]).float()
        total += F.cross_entropy(logits, targets[i:i + HEAD_CHUNK], reduction="sum").item()
    return total


@torch.no_grad()
def score(model: RWKV7, seqs: Sequence[Scored], state: RWKVState | None = None,
          batch_size: int = 8) -> LossScore:
    """Masked next-token NLL of `seqs` read from `state` (a batch-1 initial state; zeros if None), batched.

    Right padding is safe: the model is causal, so pad tokens after a sequence never change its scores.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nll, n_tok, n_proc = 0.0, 0, 0
    t0 = time.perf_counter()
    for batch in _batches(seqs, batch_size):
        tokens, mask = _pad(batch, model.device)
        hidden, _ = model(tokens, state, return_hidden=True)
        nll += _masked_nll(model, hidden, tokens, mask)
        n_tok += int(mask[:, 1:].sum())
        n_proc += sum(len(s.ids) for s in batch)
    return LossScore(nll_sum=nll, n_tokens=n_tok, n_sequences=len(seqs), n_processed=n_proc,
                     seconds=time.perf_counter() - t0)
