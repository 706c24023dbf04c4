"""Sampling, streaming completion and multi-turn chat on top of an RWKV7 model and a recurrent state.

Boundary: token ids in the model, text only through `WorldTokenizer`; no files. A chat keeps the whole
conversation in the recurrent state: each turn feeds only the new `User: …\\n\\nAssistant:` text, and after
the reply the state has read exactly `reply + "\\n\\n"` (the G1 template's turn separator, see
`rwkv7.template`), so history is never re-encoded.

>>> session = ChatSession(model, WorldTokenizer(), state=load_state("state.pth", model))  # doctest: +SKIP
>>> session.reply("Who are you?", on_text=print).text                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from rwkv7.model import RWKV7
from rwkv7.state import RWKVState
from rwkv7.template import STOP_STRINGS, TURN_SEPARATOR, render_text
from rwkv7.tokenizer import END_OF_TEXT, WorldTokenizer

StopReason = Literal["stop_string", "end_of_text", "max_tokens"]
TextCallback = Callable[[str], None]
NUCLEUS_FIRST_K = 64  # nuclei up to this size are read off a topk; larger ones off a full sort


class SamplingParams(BaseModel):
    """How to pick tokens. Defaults follow the RWKV chat defaults (temperature 1.0, top-p 0.3).

    temperature 0 means greedy; `seed` makes sampling reproducible (None: nondeterministic).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(0.3, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    seed: int | None = None


def nucleus_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Bool mask `[V]` of the nucleus: the most likely tokens whose probabilities first reach `top_p`.

    Read off the NUCLEUS_FIRST_K largest (a partition, no full sort) when they reach `top_p`, else off a full
    sort. Ties at the threshold are all kept.
    """
    k = min(NUCLEUS_FIRST_K, probs.size)
    top = np.sort(np.partition(probs, probs.size - k)[probs.size - k:])[::-1]
    if top.sum() < top_p:
        top = np.sort(probs)[::-1]
    before = np.cumsum(top, dtype=np.float64) - top
    return probs >= top[int((before < top_p).sum()) - 1]


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> int:
    """One token id from `logits [V]`: nucleus (top-p) sampling at `temperature`; greedy when it is 0.

    The arithmetic runs in single-threaded numpy (float64): on a busy CPU, multi-threaded torch kernels over
    65536 entries (sort, multinomial, masked indexing) were measured 10-100x slower than the model step.
    The draw is an inverse CDF with a uniform from `generator`, so a seed reproduces the sequence.
    """
    scores = logits.detach().float().cpu().numpy().astype(np.float64)
    if temperature == 0:
        return int(scores.argmax())
    probs = np.exp((scores - scores.max()) / temperature)
    probs /= probs.sum()
    if top_p < 1.0:
        probs *= nucleus_mask(probs, top_p)
    cdf = np.cumsum(probs)
    u = float(torch.rand(1, generator=generator)) * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), probs.size - 1)


@dataclass
class Completion:
    """Result of `complete`: `text` excludes any stop string; `token_ids` are all sampled ids (without a final
    token 0); `fed_ids` the ones the returned `state` has read after `prompt_state` (all of `token_ids` except
    one that completed a stop string)."""

    text: str
    token_ids: list[int]
    fed_ids: list[int]
    stop_reason: StopReason
    prompt_state: RWKVState
    state: RWKVState


class _StopFilter:
    """Streams text while holding back any tail that could still become a stop string."""

    def __init__(self, stop_strings: Sequence[str], on_text: TextCallback | None) -> None:
        self.stop_strings, self.on_text = tuple(stop_strings), on_text
        self.text, self.emitted = "", 0

    def add(self, piece: str) -> bool:
        """Append decoded text; True when a stop string appeared (the text is cut before it)."""
        self.text += piece
        hits = [i for s in self.stop_strings if (i := self.text.find(s)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self._emit(len(self.text))
            return True
        held = max((n for s in self.stop_strings for n in range(len(s) - 1, 0, -1)
                    if self.text.endswith(s[:n])), default=0)
        self._emit(len(self.text) - held)
        return False

    def finish(self) -> None:
        self._emit(len(self.text))

    def _emit(self, end: int) -> None:
        if end > self.emitted and self.on_text is not None:
            self.on_text(self.text[self.emitted:end])
        self.emitted = max(self.emitted, end)


@torch.no_grad()
def complete(model: RWKV7, tokenizer: WorldTokenizer, prompt_ids: Sequence[int], state: RWKVState | None = None,
             params: SamplingParams | None = None, stop_strings: Sequence[str] = STOP_STRINGS,
             on_text: TextCallback | None = None, generator: torch.Generator | None = None) -> Completion:
    """Read `prompt_ids` (non-empty) from `state` (zeros if None), then sample until token 0, a stop string
    or `params.max_tokens`. `on_text` receives the text as it streams (never any part of a stop string)."""
    if not prompt_ids:
        raise ValueError("complete needs at least one prompt token")
    params = params or SamplingParams()
    if generator is None and params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    logits, state = model(torch.tensor([list(prompt_ids)], device=model.device), state)
    logits, prompt_state = logits[0, -1], state
    decoder, stream = tokenizer.stream_decoder(), _StopFilter(stop_strings, on_text)
    token_ids: list[int] = []
    fed_ids: list[int] = []
    reason: StopReason = "max_tokens"
    for _ in range(params.max_tokens):
        token = sample_token(logits, params.temperature, params.top_p, generator)
        if token == END_OF_TEXT:
            reason = "end_of_text"
            break
        token_ids.append(token)
        if stream.add(decoder.feed(token)):
            reason = "stop_string"
            break
        logits, state = model.step(torch.tensor([token], device=model.device), state)
        logits = logits[0]
        fed_ids.append(token)
    if reason != "stop_string":
        stream.add(decoder.flush())
        stream.finish()
    return Completion(text=stream.text, token_ids=token_ids, fed_ids=fed_ids, stop_reason=reason,
                      prompt_state=prompt_state, state=state)


@dataclass
class ChatSession:
    """A conversation held in the recurrent state. `history_ids` are all ids the state has read since `state`
    was given (so `model(history_ids, initial state)` reproduces `self.state`)."""

    model: RWKV7
    tokenizer: WorldTokenizer
    state: RWKVState | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    history_ids: list[int] = field(default_factory=list)
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self._generator = torch.Generator().manual_seed(self.params.seed)

    @torch.no_grad()
    def reply(self, user_text: str, on_text: TextCallback | None = None) -> Completion:
        """Feed one user turn, stream and return the assistant's reply (`text` keeps its leading space)."""
        messages = [{"role": "user", "content": user_text}]
        if self.system and not self.history_ids:
            messages.insert(0, {"role": "system", "content": self.system})
        prompt_ids = self.tokenizer.encode(render_text(messages, generation_prompt=True))
        done = complete(self.model, self.tokenizer, prompt_ids, self.state, self.params, on_text=on_text,
                        generator=self._generator)
        self.history_ids += prompt_ids
        self.state = self._close_turn(done)
        return done

    def _close_turn(self, done: Completion) -> RWKVState:
        """State after `reply + "\\n\\n"`: top up what was fed, or re-read the reply if the fed text diverged."""
        target = done.text + TURN_SEPARATOR
        fed_text = self.tokenizer.decode(done.fed_ids)
        if target.startswith(fed_text):
            base, ids = done.state, self.tokenizer.encode(target[len(fed_text):])
            self.history_ids += done.fed_ids
        else:  # e.g. a stop string began inside an already-fed token: re-read this reply only
            base, ids = done.prompt_state, self.tokenizer.encode(target)
        self.history_ids += ids
        if not ids:
            return base
        _, state = self.model(torch.tensor([ids], device=self.model.device), base)
        return state
