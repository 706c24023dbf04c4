"""typo_fix stage: fix words the transcriber keeps mishearing, report near-misses, guard against a blocklist.

Input and output are dialogue records (`{"id", "messages", "source"}` jsonl). Three passes per record:
1. rules (`typo_fix.rules`), in order: whole-word replacements (`word` literal or `pattern` regex, never inside a
   longer word) with optional context guards (`only_if_near`, `not_if_followed_by`, `not_if_preceded_by`);
   counts per rule in the stats; a record that changed gets `source.typo_fixes` ({rule: count}); its `id` is
   kept, so ids stay stable across rule edits (the train/validation split hashes ids).
2. review: words that look like a protected word (rapidfuzz `fuzz.ratio` ≥ `review_threshold`, e.g. "Nagar" vs
   "NEGA") but were not replaced, and matches a guard kept, go to the review file; nothing is changed.
3. blocklist: a record still containing a blocklisted word (whole word, plural `s`/`es`/`'s` included) is
   dropped, or kept with `"flags": ["blocklist"]`, per `blocklist_action`; either way it is in the review file.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rapidfuzz import fuzz

from tasks.common import DataError, StageStats, load_section, read_jsonl, stage_errors, stage_parser, write_jsonl

Role = Literal["system", "user", "assistant"]
CONTEXT_CHARS = 40
WORD_RE = re.compile(r"[^\W\d_][\w'-]*")
BLOCKLIST_SUFFIX = r"(?:s|es|'s)?"


class TypoRule(BaseModel):
    """One replacement: exactly one of `word` (literal) or `pattern` (regex), matched as a whole word."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    word: str | None = None
    pattern: str | None = None
    replacement: str
    ignore_case: bool = True
    case: Literal["as_written", "match"] = "as_written"
    only_if_near: list[str] = Field(default_factory=list)
    near_words: int = Field(8, ge=1)
    not_if_followed_by: list[str] = Field(default_factory=list)
    not_if_preceded_by: list[str] = Field(default_factory=list)
    roles: list[Role] = Field(default_factory=lambda: ["system", "user", "assistant"])

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return pattern

    @model_validator(mode="after")
    def _word_xor_pattern(self) -> TypoRule:
        if (self.word is None) == (self.pattern is None):
            raise ValueError("set exactly one of `word` or `pattern`")
        if self.word is not None and not self.word.strip():
            raise ValueError("`word` must not be empty")
        return self

    @property
    def label(self) -> str:
        return self.name or self.word or self.pattern or ""

    @cached_property
    def regex(self) -> re.Pattern[str]:
        body = re.escape(self.word) if self.word is not None else self.pattern
        return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE if self.ignore_case else 0)


def _default_rules() -> list[TypoRule]:
    nega = "NEGA"
    return [
        TypoRule(name="Edgar->NEGA", word="Edgar", replacement=nega,
                 not_if_followed_by=["Allan", "Poe", "Degas"]),
        TypoRule(name="Nagar->NEGA", word="Nagar", replacement=nega),
        TypoRule(name="Nege->NEGA", word="Nege", replacement=nega),
        TypoRule(name="Negar->NEGA", word="Negar", replacement=nega),
        TypoRule(name="N-word placeholder->NEGA", word="N-word", replacement=nega),
        TypoRule(name="Nega->NEGA", word="Nega", replacement=nega),
    ]


class TypoFixParams(BaseModel):
    """The `typo_fix` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")
    rules: list[TypoRule] = Field(default_factory=_default_rules)
    protected_words: list[str] = Field(default_factory=lambda: ["NEGA"])
    review_threshold: float = Field(65.0, ge=0, le=100)
    review_capitalized_only: bool = True
    review_ignore: list[str] = Field(default_factory=lambda: ["near", "mega", "omega", "vega", "negative"])
    blocklist: list[str] = Field(default_factory=lambda: ["N-word"])
    blocklist_action: Literal["flag", "drop"] = "drop"

    @cached_property
    def blocklist_regex(self) -> re.Pattern[str] | None:
        if not self.blocklist:
            return None
        words = "|".join(re.escape(w) for w in self.blocklist)
        return re.compile(rf"(?<!\w)(?:{words}){BLOCKLIST_SUFFIX}(?!\w)", re.IGNORECASE)


def _snippet(text: str, start: int, end: int) -> str:
    return text[max(0, start - CONTEXT_CHARS):end + CONTEXT_CHARS]


def _words(text: str) -> list[str]:
    return [w.casefold() for w in WORD_RE.findall(text)]


def guard_blocks(rule: TypoRule, text: str, start: int, end: int) -> str | None:
    """Name of the guard that keeps the match `text[start:end]` unchanged, or None if the rule applies."""
    before, after = text[:start], text[end:]
    for phrase in rule.not_if_followed_by:
        if re.match(rf"\W*{re.escape(phrase)}(?!\w)", after, re.IGNORECASE):
            return "not_if_followed_by"
    for phrase in rule.not_if_preceded_by:
        if re.search(rf"(?<!\w){re.escape(phrase)}\W*$", before, re.IGNORECASE):
            return "not_if_preceded_by"
    if rule.only_if_near:
        nearby = set(_words(before)[-rule.near_words:] + _words(after)[:rule.near_words])
        if not nearby & {w.casefold() for w in rule.only_if_near}:
            return "only_if_near"
    return None


def cased(replacement: str, matched: str, case: str) -> str:
    """`case="match"` copies the match's case (`EDGAR`→upper, `Edgar`→capitalized, `edgar`→lower)."""
    if case == "as_written":
        return replacement
    if matched.isupper():
        return replacement.upper()
    if matched[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement.lower()


def apply_rule(rule: TypoRule, text: str) -> tuple[str, int, list[tuple[int, int, str]]]:
    """Apply one rule to a text → (new text, replacements made, [(start, end, guard) of guarded matches])."""
    replaced, guarded = 0, []

    def substitute(m: re.Match[str]) -> str:
        nonlocal replaced
        guard = guard_blocks(rule, text, m.start(), m.end())
        if guard:
            guarded.append((m.start(), m.end(), guard))
            return m[0]
        new = cased(rule.replacement, m[0], rule.case)
        replaced += new != m[0]
        return new

    return rule.regex.sub(substitute, text), replaced, guarded


def near_misses(text: str, params: TypoFixParams) -> Iterable[tuple[re.Match[str], str, float]]:
    """Words that resemble a protected word without being it: (match, protected word, score 0–100)."""
    protected = {p.casefold(): p for p in params.protected_words}
    ignore = {w.casefold() for w in params.review_ignore}
    if not protected:
        return
    for m in WORD_RE.finditer(text):
        word = m[0].rstrip("-'")
        key = word.casefold()
        if key in protected or key in ignore or (params.review_capitalized_only and not word[:1].isupper()):
            continue
        score, best = max((fuzz.ratio(key, p), original) for p, original in protected.items())
        if score >= params.review_threshold:
            yield m, best, score


def fix_record(record: dict[str, Any], params: TypoFixParams, counts: dict[str, Counter[str]]) -> list[dict]:
    """Apply rules to the record in place; return its review entries (guarded matches, near-misses)."""
    review: list[dict] = []
    fixes: Counter[str] = Counter()
    for i, message in enumerate(record["messages"]):
        base = {"id": record["id"], "message": i, "role": message["role"]}
        for rule in params.rules:
            if message["role"] not in rule.roles:
                continue
            text = message["content"]
            message["content"], n, guarded = apply_rule(rule, text)
            fixes[rule.label] += n
            counts[rule.label]["replaced"] += n
            counts[rule.label]["guarded"] += len(guarded)
            review += [{**base, "reason": "guarded", "rule": rule.label, "guard": guard, "word": text[s:e],
                        "context": _snippet(text, s, e)} for s, e, guard in guarded]
        text = message["content"]
        already = {entry["word"].casefold() for entry in review if entry["message"] == i}
        review += [{**base, "reason": "near_miss", "word": m[0], "near": best, "score": round(score, 1),
                    "context": _snippet(text, m.start(), m.end())}
                   for m, best, score in near_misses(text, params) if m[0].casefold() not in already]
    if +fixes:
        record.setdefault("source", {})["typo_fixes"] = dict(+fixes)
    return review


def blocklisted(record: dict[str, Any], params: TypoFixParams) -> list[dict]:
    """Review entries for every blocklisted word still in the record (empty list: the record is clean)."""
    regex = params.blocklist_regex
    if regex is None:
        return []
    return [{"id": record["id"], "message": i, "role": message["role"], "reason": "blocklist", "word": m[0],
             "action": params.blocklist_action, "context": _snippet(message["content"], m.start(), m.end())}
            for i, message in enumerate(record["messages"]) for m in regex.finditer(message["content"])]


def check_record(record: dict[str, Any], where: str) -> None:
    """Raise DataError (naming `file:line`) unless the record has an id and messages with string contents."""
    messages = record.get("messages")
    if not isinstance(record.get("id"), str) or not isinstance(messages, list):
        raise DataError(f"{where}: a dialogue record needs a string `id` and a `messages` list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: messages[{i}] needs string `role` and `content`")


def typo_fix(in_path: Path, out: Path, review_path: Path, stats_path: Path, params: TypoFixParams) -> dict[str, Any]:
    """Fix `in_path` into `out`; write the review jsonl and the stats JSON; return the stats."""
    stats = StageStats("typo_fix")
    counts: dict[str, Counter[str]] = {rule.label: Counter(replaced=0, guarded=0) for rule in params.rules}
    kept, review = [], []
    changed = 0
    for lineno, record in read_jsonl(in_path):
        stats.read += 1
        check_record(record, f"{in_path}:{lineno}")
        before = [m["content"] for m in record["messages"]]
        review += fix_record(record, params, counts)
        changed += before != [m["content"] for m in record["messages"]]
        hits = blocklisted(record, params)
        review += hits
        if hits and params.blocklist_action == "drop":
            stats.drop("blocklist")
            continue
        if hits:
            record["flags"] = sorted({*record.get("flags", []), "blocklist"})
        kept.append(record)
    stats.written = write_jsonl(out, kept)
    write_jsonl(review_path, review)
    stats.extra.update(
        records_changed=changed, rules={label: dict(c) for label, c in counts.items()},
        review=dict(sorted(Counter(entry["reason"] for entry in review).items())),
        flagged=sum("blocklist" in r.get("flags", []) for r in kept),
    )
    return stats.save(stats_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("typo_fix", __doc__)
    parser.add_argument("--in", dest="in_path", type=Path, required=True, help="input dialogue jsonl")
    parser.add_argument("--out", type=Path, required=True, help="output dialogue jsonl")
    parser.add_argument("--review", type=Path, required=True, help="output review jsonl (nothing auto-fixed)")
    parser.add_argument("--stats", type=Path, required=True, help="output stats JSON")
    args = parser.parse_args(argv)
    with stage_errors("typo_fix"):
        params = load_section(TypoFixParams, "typo_fix", args.params)
        stats = typo_fix(args.in_path, args.out, args.review, args.stats, params)
    replaced = sum(c["replaced"] for c in stats["rules"].values())
    print(f"typo_fix: {stats['read']} records -> {stats['written']}; {replaced} replacements; "
          f"dropped {stats['dropped']}; review {stats['review']} (see {args.review})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
