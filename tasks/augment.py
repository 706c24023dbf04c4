"""Stage `augment`: grow the dialogue set from seed dialogues with an LLM (Gemini, OpenAI-compatible, or none).

Contract: seeds jsonl (+ optional transcribed dialogues used as style examples) + `params.yaml[augment]`
→ `augmented.jsonl` of validated dialogue records (`gen-…` ids, provenance in `source`) + a stats JSON.

How it works: for each round and each prompt template (`samples/prompts/<name>.txt`, `string.Template` with
`$character $n $examples $style $used_topics`), few-shot examples are drawn with an RNG seeded by
(seed, round, template), the model answers with JSON matching `Batch`, and every dialogue is validated. A reply
that is blocked, truncated or does not match the schema is re-asked at most `max_reasks` times. HTTP 429/5xx and
timeouts are retried with bounded exponential backoff; a client-side limiter keeps `requests_per_minute`.
Every completed reply is stored under `cache_dir` keyed by sha256(provider, model, template, prompt, settings,
attempt), so a re-run makes no requests and an interrupted run resumes where it stopped.

Keys come from the environment only (`GEMINI_API_KEY`, `OPENAI_API_KEY`) and are never logged or written.
With no key / no endpoint the stage logs one message and follows `on_unavailable` (`skip`: empty output and
stats saying why; `fail`: exit with that message).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.common import (DataError, ParamsError, StageStats, content_id, load_section, read_jsonl, stage_errors,
                          stage_parser, write_json, write_jsonl)

log = logging.getLogger(__name__)

CACHE_VERSION = 1
RETRYABLE_HTTP = frozenset({408, 429})
SERVER_ERROR_MIN = 500
SECONDS_PER_MINUTE = 60.0
MS_PER_SECOND = 1000
TEMPLATE_FIELDS = frozenset({"character", "n", "examples", "style", "used_topics"})
USED_TOPICS_SHOWN = 40
DEFAULT_TEMPLATES = ("dialogues", "topics_then_dialogues", "grammar_explainer", "topics_grammar_explainer")


class AugmentParams(BaseModel):
    """`params.yaml[augment]`. API keys are not settings: they come from the environment only."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["none", "gemini", "openai"] = "none"
    model: str = "gemini-2.5-flash"
    base_url: str | None = None  # gemini: None = Google's endpoint; openai: e.g. http://127.0.0.1:8000/v1
    prompts_dir: Path = Path("samples/prompts")
    character_file: str = "character.txt"
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)
    rounds: int = Field(3, ge=1)
    target_count: int = Field(60, ge=0)
    dialogues_per_request: int = Field(6, ge=1, le=50)
    few_shot: int = Field(3, ge=0)
    few_shot_generated: int = Field(1, ge=0)  # examples drawn from earlier rounds' output (round ≥ 1)
    style_examples: int = Field(2, ge=0)
    seed: int = 0
    temperature: float = Field(0.9, ge=0.0, le=2.0)
    max_output_tokens: int = Field(8192, ge=64)
    requests_per_minute: float = Field(10.0, gt=0.0)
    max_retries: int = Field(4, ge=0)
    backoff_initial_s: float = Field(2.0, ge=0.0)
    backoff_max_s: float = Field(60.0, ge=0.0)
    max_reasks: int = Field(2, ge=0)
    timeout_s: float = Field(120.0, gt=0.0)
    on_unavailable: Literal["skip", "fail"] = "skip"
    cache_dir: Path = Path(".cache/statetune/augment")
    openai_response_format: Literal["json_schema", "json_object", "none"] = "json_schema"
    min_turns: int = Field(2, ge=2)
    max_turns: int = Field(12, ge=2)
    max_message_chars: int = Field(2000, ge=1)

    @model_validator(mode="after")
    def _turn_bounds(self) -> AugmentParams:
        if self.max_turns < self.min_turns:
            raise ValueError(f"max_turns ({self.max_turns}) is below min_turns ({self.min_turns})")
        return self


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str


class Dialogue(BaseModel):
    topic: str = ""
    messages: list[Message]


class Batch(BaseModel):
    """The JSON every template asks for: optional new topics, then dialogues."""

    topics: list[str] = Field(default_factory=list)
    dialogues: list[Dialogue]


class AugmentError(RuntimeError):
    """The provider failed in a way retries cannot fix (bad request, auth, retries exhausted)."""


class ProviderUnavailable(AugmentError):
    """No key, no endpoint, or the endpoint cannot be reached: `on_unavailable` decides what happens."""


class TransientError(Exception):
    """A retryable failure (429, 5xx, timeout, connection); `connect` marks an unreachable endpoint."""

    def __init__(self, what: str, connect: bool = False) -> None:
        super().__init__(what)
        self.connect = connect


@dataclass(frozen=True)
class Reply:
    """One completed model answer. `finish`: "stop" | "truncated" | "blocked"; `detail`: the raw reason."""

    text: str
    finish: str
    detail: str = ""


class Provider(Protocol):
    name: str

    def __call__(self, prompt: str) -> Reply: ...


def validate_dialogue(messages: list[dict[str, str]], p: AugmentParams) -> str | None:
    """Return None for a usable dialogue, else the rejection reason (a stats key)."""
    if len(messages) < p.min_turns:
        return "too_few_turns"
    if len(messages) > p.max_turns:
        return "too_many_turns"
    if messages[0]["role"] != "user":
        return "not_starting_with_user"
    if messages[-1]["role"] != "assistant":
        return "not_ending_with_assistant"
    if any(a["role"] == b["role"] for a, b in zip(messages, messages[1:])):
        return "roles_not_alternating"
    if any(not m["content"].strip() for m in messages):
        return "empty_message"
    if any(len(m["content"]) > p.max_message_chars for m in messages):
        return "message_too_long"
    return None


class RateLimiter:
    """Spaces request starts at least 60/per_minute seconds apart (clock and sleep injectable for tests)."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = SECONDS_PER_MINUTE / per_minute
        self.clock, self.sleep = clock, sleep
        self._next = float("-inf")

    def wait(self) -> None:
        now = self.clock()
        if now < self._next:
            self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


def backoff_delay(attempt: int, p: AugmentParams, rng: random.Random) -> float:
    """Delay before retry `attempt` (0-based): capped exponential with "equal jitter" (half fixed, half random)."""
    base = min(p.backoff_max_s, p.backoff_initial_s * 2**attempt)
    return base / 2 + rng.random() * base / 2


class GeminiProvider:
    """google-genai client; SDK retries are off because `ask` retries (and counts) itself."""

    name = "gemini"

    def __init__(self, p: AugmentParams, api_key: str) -> None:
        from google import genai
        from google.genai import types

        http = types.HttpOptions(base_url=p.base_url, api_version="v1beta", timeout=int(p.timeout_s * MS_PER_SECOND),
                                 retry_options=types.HttpRetryOptions(attempts=1))
        self._client = genai.Client(api_key=api_key, http_options=http)
        self._model = p.model
        self._config = types.GenerateContentConfig(
            response_mime_type="application/json", response_schema=Batch,
            temperature=p.temperature, max_output_tokens=p.max_output_tokens)

    def __call__(self, prompt: str) -> Reply:
        import httpx
        from google.genai import errors

        try:
            resp = self._client.models.generate_content(model=self._model, contents=prompt, config=self._config)
        except errors.APIError as e:
            if e.code in RETRYABLE_HTTP or e.code >= SERVER_ERROR_MIN:
                raise TransientError(f"HTTP {e.code}") from None
            raise AugmentError(f"gemini: HTTP {e.code} {e.status}: {e.message}") from None
        except httpx.TransportError as e:
            raise TransientError(type(e).__name__, connect=isinstance(e, httpx.ConnectError)) from None
        if not resp.candidates:
            block = resp.prompt_feedback.block_reason if resp.prompt_feedback else None
            return Reply("", "blocked", f"prompt blocked: {getattr(block, 'value', block) or 'no candidates'}")
        cand = resp.candidates[0]
        reason = getattr(cand.finish_reason, "value", None) or "STOP"
        text = "".join(part.text or "" for part in (cand.content.parts or [])) if cand.content else ""
        if reason == "STOP":
            return Reply(text, "stop", reason)
        return Reply(text, "truncated" if reason == "MAX_TOKENS" else "blocked", reason)


class OpenAIProvider:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, Ollama, RWKV-Runner) through httpx."""

    name = "openai"
    FINISH = {"stop": "stop", "length": "truncated", "content_filter": "blocked"}

    def __init__(self, p: AugmentParams, api_key: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=p.timeout_s, headers=headers)
        self._url = f"{(p.base_url or '').rstrip('/')}/chat/completions"
        self._body: dict[str, Any] = {"model": p.model, "temperature": p.temperature, "max_tokens": p.max_output_tokens}
        if p.openai_response_format == "json_schema":
            schema = {"name": "dialogue_batch", "schema": Batch.model_json_schema()}
            self._body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif p.openai_response_format == "json_object":
            self._body["response_format"] = {"type": "json_object"}

    def __call__(self, prompt: str) -> Reply:
        import httpx

        try:
            r = self._client.post(self._url, json={**self._body, "messages": [{"role": "user", "content": prompt}]})
        except httpx.TransportError as e:
            raise TransientError(type(e).__name__, connect=isinstance(e, httpx.ConnectError)) from None
        if r.status_code in RETRYABLE_HTTP or r.status_code >= SERVER_ERROR_MIN:
            raise TransientError(f"HTTP {r.status_code}")
        if r.status_code >= 400:
            raise AugmentError(f"openai: HTTP {r.status_code} from {self._url}: {r.text[:200]}")
        try:
            choice = r.json()["choices"][0]
            text, reason = choice["message"].get("content") or "", choice.get("finish_reason") or "stop"
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return Reply(r.text, "stop", "unexpected response shape")
        return Reply(text, self.FINISH.get(reason, "blocked"), reason)


def make_provider(p: AugmentParams, env: Mapping[str, str]) -> Provider:
    """Build the configured provider, or raise ProviderUnavailable saying what is missing."""
    if p.provider == "none":
        raise ProviderUnavailable("augment.provider is 'none'")
    if p.provider == "gemini":
        key = env.get("GEMINI_API_KEY", "")
        if not key:
            raise ProviderUnavailable("GEMINI_API_KEY is not set (export it to use augment.provider 'gemini')")
        return GeminiProvider(p, key)
    if not p.base_url:
        raise ProviderUnavailable("augment.base_url is not set (needed by augment.provider 'openai')")
    return OpenAIProvider(p, env.get("OPENAI_API_KEY") or None)


class ResponseCache:
    """Completed replies on disk, one JSON file per key (`<root>/<key[:2]>/<key>.json`); unreadable = miss."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Reply | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return Reply(d["text"], d["finish"], d.get("detail", ""))
        except (ValueError, KeyError, TypeError):
            log.warning("augment cache: ignoring unreadable entry %s", path)
            return None

    def put(self, key: str, reply: Reply, meta: dict[str, Any]) -> None:
        write_json(self._path(key), {"key": key, **meta, "finish": reply.finish, "detail": reply.detail,
                                     "text": reply.text})


def cache_key(p: AugmentParams, template: str, prompt: str, attempt: int) -> str:
    """sha256 over everything that changes the answer; the endpoint URL and keys are deliberately not in it."""
    settings = {"temperature": p.temperature, "max_output_tokens": p.max_output_tokens,
                "response_format": p.openai_response_format if p.provider == "openai" else "schema",
                "schema": Batch.model_json_schema()}
    blob = {"v": CACHE_VERSION, "provider": p.provider, "model": p.model, "template": template,
            "prompt": prompt, "settings": settings, "attempt": attempt}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def parse_reply(reply: Reply) -> tuple[Batch | None, str]:
    """Classify a reply: (batch, "ok") or (None, "blocked"|"truncated"|"invalid_json"|"schema_violation")."""
    if reply.finish != "stop":
        return None, reply.finish
    text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", reply.text)
    try:
        data = json.loads(text)
    except ValueError:
        return None, "invalid_json"
    try:
        return Batch.model_validate(data), "ok"
    except ValidationError:
        return None, "schema_violation"


class Asker:
    """Turns a prompt into a parsed Batch: cache → rate limit → retries → re-asks, counting everything."""

    def __init__(self, p: AugmentParams, provider: Provider, cache: ResponseCache, limiter: RateLimiter) -> None:
        self.p, self.provider, self.cache, self.limiter = p, provider, cache, limiter
        self.rng = random.Random(p.seed)
        self.counts: Counter[str] = Counter()

    def _request(self, prompt: str) -> Reply:
        for attempt in range(self.p.max_retries + 1):
            self.limiter.wait()
            self.counts["http_requests"] += 1
            try:
                return self.provider(prompt)
            except TransientError as e:
                self.counts[f"retry_{e}".replace(" ", "_")] += 1
                if attempt == self.p.max_retries:
                    if e.connect:
                        raise ProviderUnavailable(f"{self.provider.name} endpoint unreachable ({e})") from None
                    raise AugmentError(f"{self.provider.name}: gave up after {attempt + 1} tries (last: {e})") from None
                time.sleep(backoff_delay(attempt, self.p, self.rng))
        raise AssertionError("unreachable")

    def ask(self, template: str, prompt: str) -> tuple[Batch | None, str]:
        """Return (batch or None, cache key of the last attempt); re-asks at most `max_reasks` times."""
        key = ""
        for attempt in range(self.p.max_reasks + 1):
            key = cache_key(self.p, template, prompt, attempt)
            reply = self.cache.get(key)
            if reply is None:
                reply = self._request(prompt)
                self.cache.put(key, reply, {"provider": self.p.provider, "model": self.p.model, "template": template})
            else:
                self.counts["cache_hits"] += 1
            batch, outcome = parse_reply(reply)
            self.counts[f"reply_{outcome}"] += 1
            if batch is not None:
                return batch, key
            log.warning("augment: %s reply for template %s (attempt %d): %s", outcome, template, attempt, reply.detail)
        self.counts["requests_given_up"] += 1
        return None, key


def load_templates(p: AugmentParams) -> tuple[str, dict[str, string.Template]]:
    """Read the character text and each template; unknown `$fields` or missing files are ParamsError."""
    def read(name: str, key: str) -> str:
        path = p.prompts_dir / name
        if not path.is_file():
            raise ParamsError(f"{key}: prompt file {path} not found")
        return path.read_text(encoding="utf-8")

    character = read(p.character_file, "augment.character_file").strip()
    templates = {}
    for name in p.templates:
        tpl = string.Template(read(f"{name}.txt", "augment.templates"))
        unknown = set(tpl.get_identifiers()) - TEMPLATE_FIELDS
        if unknown or not tpl.is_valid():
            raise ParamsError(f"augment.templates: {p.prompts_dir / (name + '.txt')} has unknown or bad "
                              f"placeholders {sorted(unknown)}; allowed: {sorted(TEMPLATE_FIELDS)}")
        templates[name] = tpl
    return character, templates


def load_dialogues(path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec.get("id"), str) or not isinstance(rec.get("messages"), list):
            raise DataError(f"{path}:{lineno}: a dialogue record needs 'id' (str) and 'messages' (list)")
        records.append(rec)
    return records


def _shots(records: list[dict[str, Any]]) -> str:
    """Few-shot block: one `{"messages": [...]}` JSON object per line (system turns left out)."""
    lines = []
    for r in records:
        turns = [{"role": m["role"], "content": m["content"]} for m in r["messages"] if m["role"] != "system"]
        lines.append(json.dumps({"messages": turns}, ensure_ascii=False))
    return "\n".join(lines)


def generate(seeds: list[dict[str, Any]], style: list[dict[str, Any]], p: AugmentParams, asker: Asker,
             character: str, templates: dict[str, string.Template], stats: StageStats) -> list[dict[str, Any]]:
    """Run rounds × templates until `target_count` dialogues are accepted; return the `gen-…` records."""
    accepted: list[dict[str, Any]] = []
    seen: set[str] = set()
    topics: list[str] = []
    for rnd in range(p.rounds):
        earlier = list(accepted)
        for name, tpl in templates.items():
            if len(accepted) >= p.target_count:
                return accepted[: p.target_count]
            rng = random.Random(f"{p.seed}:{rnd}:{name}")
            shots = rng.sample(seeds, min(p.few_shot, len(seeds)))
            shots += rng.sample(earlier, min(p.few_shot_generated, len(earlier)))
            styles = rng.sample(style, min(p.style_examples, len(style)))
            prompt = tpl.substitute(character=character, n=p.dialogues_per_request, examples=_shots(shots),
                                    style=_shots(styles) or "(none)",
                                    used_topics="; ".join(topics[-USED_TOPICS_SHOWN:]) or "(none yet)")
            batch, key = asker.ask(name, prompt)
            if batch is None:
                continue
            topics += [t for t in batch.topics if t not in topics]
            for d in batch.dialogues:
                messages = [{"role": m.role, "content": m.content.strip()} for m in d.messages]
                reason = validate_dialogue(messages, p)
                rid = content_id("gen", messages)
                if reason is None and rid in seen:
                    reason = "duplicate_in_run"
                if reason:
                    stats.drop(reason)
                    continue
                seen.add(rid)
                source = {"origin": "generated", "provider": p.provider, "model": p.model, "template": name,
                          "round": rnd, "few_shot_ids": [s["id"] for s in shots], "cache_key": key, "topic": d.topic}
                accepted.append({"id": rid, "messages": messages, "source": source})
    return accepted[: p.target_count]


def augment(seeds_path: Path, style_paths: list[Path], out_path: Path, stats_path: Path, p: AugmentParams,
            env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write `out_path` (generated records) and `stats_path`; return the stats dict.

    Raises ProviderUnavailable only when `on_unavailable` is "fail"; AugmentError on unrecoverable API errors.
    """
    stats = StageStats("augment")
    seeds = load_dialogues(seeds_path)
    style = [r for path in style_paths for r in load_dialogues(path)]
    stats.read = len(seeds) + len(style)
    stats.extra.update(provider=p.provider, model=p.model, seeds=len(seeds), style_examples=len(style),
                       target_count=p.target_count)
    if not seeds:
        raise DataError(f"{seeds_path}: no seed dialogues")
    character, templates = load_templates(p)
    try:
        provider = make_provider(p, os.environ if env is None else env)
        asker = Asker(p, provider, ResponseCache(p.cache_dir), RateLimiter(p.requests_per_minute))
        records = generate(seeds, style, p, asker, character, templates, stats)
        stats.extra["requests"] = dict(sorted(asker.counts.items()))
    except ProviderUnavailable as e:
        if p.on_unavailable == "fail" and p.provider != "none":
            raise
        if p.provider == "none":
            log.info("augment skipped: %s; writing an empty augmented set", e)
        else:
            log.warning("augment skipped: %s; writing an empty augmented set (augment.on_unavailable=skip)", e)
        records = []
        stats.extra.update(status="skipped", reason=str(e))
    else:
        stats.extra.update(status="ok", by_template=dict(Counter(r["source"]["template"] for r in records)))
    stats.written = write_jsonl(out_path, records)
    return stats.save(stats_path)


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("augment", __doc__)
    ap.add_argument("--seeds", type=Path, required=True, help="seed dialogues jsonl (few-shot examples)")
    ap.add_argument("--in", dest="style", type=Path, action="append", default=[],
                    help="dialogues jsonl used as style examples (repeatable, optional)")
    ap.add_argument("--out", type=Path, required=True, help="augmented dialogues jsonl to write")
    ap.add_argument("--stats", type=Path, required=True, help="stats JSON to write")
    args = ap.parse_args(argv)
    with stage_errors("augment", AugmentError, OSError):
        params = load_section(AugmentParams, "augment", args.params)
        stats = augment(args.seeds, args.style, args.out, args.stats, params)
    log.info("augment: %s written (%s)", stats["written"], stats.get("status"))


if __name__ == "__main__":
    main()
