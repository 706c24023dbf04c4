"""Stage `dedupe`: drop exact and near-duplicate dialogues, then split train/validation by record-id hash.

Contract: dialogue jsonl files (seeds, transcribed, generated) + `params.yaml[dedupe]` → `train.jsonl`,
`val.jsonl` (records unchanged), a report jsonl with one row per dropped record (why, and which kept record it
duplicates) and a stats JSON.

Order of precedence: records are visited by origin (id prefix `seed-` < `srt-` < `gen-` < anything else), then
input order, and a record is only ever dropped in favour of one visited before it, so a seed always survives
its synthetic copies.
1. Exact pass: `normalize` (NFKC, casefold, punctuation → space, whitespace collapsed) of all message texts.
2. Near pass (only texts of at least `min_chars_near` normalized characters): MinHash of character
   `shingle_chars`-grams, LSH candidates at Jaccard ≈ `lsh_threshold`, confirmed by rapidfuzz
   `fuzz.ratio ≥ min_ratio` against the kept candidate. Short texts are exact-only: a few changed characters
   in a 20-character sentence are a different sentence.
3. Split: a record goes to validation when `sha256(id) mod 1000 < val_fraction * 1000`. The test depends on the
   id alone, so adding records never moves existing ones. If that leaves validation empty (or train empty)
   while there are ≥ 2 records and `val_fraction > 0`, the kept record with the lowest (or highest) bucket is
   moved across; this is the only record whose side can change when records are added later.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field
from rapidfuzz import fuzz

from tasks.common import DataError, StageStats, load_section, read_jsonl, stage_errors, stage_parser, write_jsonl

log = logging.getLogger(__name__)

ORIGIN_RANK = {"seed": 0, "srt": 1, "gen": 2}
UNKNOWN_ORIGIN_RANK = len(ORIGIN_RANK)
SPLIT_BUCKETS = 1000
PREVIEW_CHARS = 160
_PUNCT = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")


class DedupeParams(BaseModel):
    """`params.yaml[dedupe]`."""

    model_config = ConfigDict(extra="forbid")

    shingle_chars: int = Field(5, ge=1)
    num_perm: int = Field(128, ge=16)
    lsh_threshold: float = Field(0.6, gt=0.0, lt=1.0)
    min_ratio: float = Field(85.0, ge=0.0, le=100.0)
    min_chars_near: int = Field(40, ge=0)
    minhash_seed: int = 1
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)


@dataclass(frozen=True)
class Match:
    """Item `dropped` duplicates the earlier item `kept`; `similarity` is rapidfuzz ratio (100 for exact)."""

    dropped: int
    kept: int
    reason: str
    similarity: float


def normalize(text: str) -> str:
    """NFKC, casefold, punctuation/symbols-free, single spaces.

    >>> normalize("  Hello,\\tWORLD!  It's me ")
    'hello world it s me'
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def record_text(record: dict[str, Any]) -> str:
    """The dialogue's user/assistant texts; a shared system prompt would make distinct dialogues look alike."""
    return "\n".join(m["content"] for m in record["messages"] if m.get("role") != "system")


def origin_rank(record_id: str) -> int:
    return ORIGIN_RANK.get(record_id.split("-", 1)[0], UNKNOWN_ORIGIN_RANK)


def _shingles(text: str, k: int) -> list[bytes]:
    return [s.encode("utf-8") for s in {text[i : i + k] for i in range(max(1, len(text) - k + 1))}]


def find_duplicates(texts: Sequence[str], p: DedupeParams) -> dict[int, Match]:
    """Duplicates among normalized `texts`, where an earlier index always wins; returns {dropped index: Match}.

    Deterministic: the shingle hash is crc32 (not Python's salted `hash`) and MinHash uses a fixed seed.
    """
    drops: dict[int, Match] = {}
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        if t in first:
            drops[i] = Match(i, first[t], "exact_duplicate", 100.0)
        else:
            first[t] = i
    near = [i for i in first.values() if len(texts[i]) >= p.min_chars_near]
    lsh = MinHashLSH(threshold=p.lsh_threshold, num_perm=p.num_perm)
    sketches = MinHash.generator((_shingles(texts[i], p.shingle_chars) for i in near),
                                 num_perm=p.num_perm, seed=p.minhash_seed, hashfunc=zlib.crc32)
    for i, sketch in zip(near, sketches):
        best_score, best_j = 0.0, -1
        for j in sorted(lsh.query(sketch)):
            score = fuzz.ratio(texts[i], texts[j], score_cutoff=p.min_ratio)
            if score > best_score:
                best_score, best_j = score, j
        if best_j >= 0:
            drops[i] = Match(i, best_j, "near_duplicate", round(best_score, 1))
        else:
            lsh.insert(i, sketch)
    return drops


def split_bucket(record_id: str) -> int:
    return int(hashlib.sha256(record_id.encode("utf-8")).hexdigest(), 16) % SPLIT_BUCKETS


def assign_split(ids: Sequence[str], val_fraction: float) -> tuple[list[bool], str | None]:
    """Per id: True = validation. Returns (flags, note on the fallback move, if one was needed)."""
    buckets = [split_bucket(i) for i in ids]
    cutoff = round(val_fraction * SPLIT_BUCKETS)
    is_val = [b < cutoff for b in buckets]
    if len(ids) < 2 or val_fraction <= 0:
        return is_val, None
    order = sorted(range(len(ids)), key=lambda k: (buckets[k], ids[k]))
    if not any(is_val):
        is_val[order[0]] = True
        return is_val, f"validation was empty: moved {ids[order[0]]} (lowest bucket) to validation"
    if all(is_val):
        is_val[order[-1]] = False
        return is_val, f"train was empty: moved {ids[order[-1]]} (highest bucket) to train"
    return is_val, None


def load_records(paths: Sequence[Path]) -> list[tuple[dict[str, Any], str]]:
    """All records with a `path:line` locator; a record without id/messages is a DataError."""
    out = []
    for path in paths:
        for lineno, rec in read_jsonl(path):
            msgs = rec.get("messages")
            if not isinstance(rec.get("id"), str) or not isinstance(msgs, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                raise DataError(f"{path}:{lineno}: a dialogue record needs 'id' (str) and 'messages' with 'content'")
            out.append((rec, f"{path}:{lineno}"))
    return out


def dedupe(inputs: Sequence[Path], train_path: Path, val_path: Path, report_path: Path, stats_path: Path,
           p: DedupeParams) -> dict[str, Any]:
    """Write train/val/report/stats; return the stats dict."""
    stats = StageStats("dedupe")
    loaded = load_records(inputs)
    stats.read = len(loaded)
    order = sorted(range(len(loaded)), key=lambda k: (origin_rank(loaded[k][0]["id"]), k))
    texts = [normalize(record_text(loaded[k][0])) for k in order]
    drops = find_duplicates(texts, p)
    report = []
    for m in sorted(drops.values(), key=lambda m: order[m.dropped]):
        rec, where = loaded[order[m.dropped]]
        kept, kept_where = loaded[order[m.kept]]
        stats.drop(m.reason)
        report.append({"id": rec["id"], "reason": m.reason, "duplicate_of": kept["id"], "similarity": m.similarity,
                       "at": where, "kept_at": kept_where, "text": record_text(rec)[:PREVIEW_CHARS],
                       "kept_text": record_text(kept)[:PREVIEW_CHARS]})
    dropped = {order[i] for i in drops}
    kept = [rec for k, (rec, _) in enumerate(loaded) if k not in dropped]
    is_val, note = assign_split([r["id"] for r in kept], p.val_fraction)
    if note:
        log.info("dedupe split: %s", note)
    n_train = write_jsonl(train_path, (r for r, v in zip(kept, is_val) if not v))
    n_val = write_jsonl(val_path, (r for r, v in zip(kept, is_val) if v))
    write_jsonl(report_path, report)
    stats.written = n_train + n_val
    stats.extra.update(train=n_train, val=n_val, split_fallback=note, inputs=[str(x) for x in inputs],
                       kept_by_origin=dict(sorted(Counter(r["id"].split("-", 1)[0] for r in kept).items())))
    return stats.save(stats_path)


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("dedupe", __doc__)
    ap.add_argument("--in", dest="inputs", type=Path, action="append", required=True,
                    help="dialogue jsonl (repeatable; order breaks ties within one origin)")
    ap.add_argument("--train", type=Path, required=True, help="train jsonl to write")
    ap.add_argument("--val", type=Path, required=True, help="validation jsonl to write")
    ap.add_argument("--report", type=Path, required=True, help="jsonl of dropped records and why")
    ap.add_argument("--stats", type=Path, required=True, help="stats JSON to write")
    args = ap.parse_args(argv)
    with stage_errors("dedupe", OSError):
        params = load_section(DedupeParams, "dedupe", args.params)
        stats = dedupe(args.inputs, args.train, args.val, args.report, args.stats, params)
    log.info("dedupe: %d read, %d train, %d val, %d dropped", stats["read"], stats["train"], stats["val"],
             stats["dropped_total"])


if __name__ == "__main__":
    main()
