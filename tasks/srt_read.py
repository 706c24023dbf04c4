"""Strict SRT reading: bytes → text (encoding chain) → cue blocks → `Cue`s, every malformed block reported.

Why we split the cue blocks ourselves and hand each block to pysrt (`SubRipItem.from_lines`, which raises like
`error_handling=ERROR_RAISE` does): pysrt's own splitter silently merges a cue into the previous one when the
blank line between them is missing and, by default, silently drops a cue with a bad timestamp; it also reads
`00:00:0x,000` as zero and `00:00:01.5` as 1.005 s. Our splitter knows the line number of every block, so each
malformed cue is reported as `file:line: reason`; strict mode raises `DataError`, lenient mode counts it in the
stats and skips it (a missing blank line is repaired and noted instead). Every block becomes a cue or a problem.
"""

from __future__ import annotations

import codecs
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pysrt

from tasks.common import DataError

MS_PER_S = 1000
SNIPPET_CHARS = 60
# A BOM-less file is taken as UTF-16 when at least this share of its odd (LE) or even (BE) bytes are NUL.
UTF16_MIN_NUL_SHARE = 0.3
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))  # UTF-32 LE before UTF-16 LE
# Three-digit milliseconds: pysrt reads `00:00:01.5` as 1.005 s.
TIMESTAMP_RE = re.compile(r"^\d+:\d{2}:\d{2}[,.]\d{3}\s*-->\s*\d+:\d{2}:\d{2}[,.]\d{3}(?:\s+\S.*)?$")


@dataclass
class Block:
    line: int  # 1-based line number of the block's first line
    lines: list[str]
    missing_blank: bool = False


@dataclass
class Cue:
    number: int  # the SRT index, or the 1-based position when the index is missing
    line: int
    start: float
    end: float
    text: str


@dataclass
class FileReport:
    """What reading the files found: problems (`file:line: reason`), drops and notes counted by reason."""

    problems: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)  # repairs and kept oddities, by kind


def decode_srt(data: bytes, legacy_encodings: Sequence[str], path: Path) -> tuple[str, str]:
    """Bytes → (text with `\\n` line ends, codec name): a BOM decides; else NUL bytes mean UTF-16 (BOM-less
    UTF-16 is valid UTF-8, so it is checked first); else UTF-8; else each legacy codec in order."""
    candidates: list[tuple[bytes, str, str]] = [(data[len(b):], c, f"{c}-bom") for b, c in BOMS if data.startswith(b)]
    if not candidates and b"\x00" in data:
        half = max(len(data) // 2, 1)
        odd_nul, even_nul = data[1::2].count(0) / half, data[0::2].count(0) / half
        if max(odd_nul, even_nul) < UTF16_MIN_NUL_SHARE:
            raise DataError(f"{path}: contains NUL bytes but does not look like UTF-16")
        codec = "utf-16-le" if odd_nul >= even_nul else "utf-16-be"
        candidates = [(data, codec, codec)]
    candidates = candidates or [(data, c, c) for c in ("utf-8", *legacy_encodings)]
    for payload, codec, name in candidates:
        try:
            return payload.decode(codec).replace("\r\n", "\n").replace("\r", "\n"), name
        except UnicodeDecodeError as e:
            error = f"invalid {codec} at byte {e.start}"
    if len(candidates) == 1:
        raise DataError(f"{path}: {error}")
    raise DataError(f"{path}: not UTF-8 and not decodable with legacy_encodings {list(legacy_encodings)}")


def split_blocks(text: str) -> list[Block]:
    """Split on blank lines; a second timestamp line inside a block starts a new block (missing blank line).

    >>> [(b.line, b.missing_blank) for b in split_blocks("1\\n0:0:1,0 --> 0:0:2,0\\nHi\\n2\\n0:0:3,0 --> 0:0:4,0\\nYo")]
    [(1, False), (4, True)]
    """
    blocks: list[Block] = []
    current: Block | None = None
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            current = None
            continue
        if current is None:
            current = Block(lineno, [])
            blocks.append(current)
        elif "-->" in line and any("-->" in seen for seen in current.lines):
            carried = [current.lines.pop()] if current.lines[-1].isdigit() else []
            current = Block(lineno - len(carried), carried, missing_blank=True)
            blocks.append(current)
        current.lines.append(line)
    return blocks


def parse_block(block: Block, position: int) -> Cue | tuple[int, str]:
    """A block → `Cue`, or `(line, reason)` when it is malformed (reason: bad_index, bad_timestamp, …)."""
    lines = block.lines
    ts_at = 0 if "-->" in lines[0] else 1
    if ts_at == 1 and not lines[0].isdigit():
        return (block.line, "bad_index" if len(lines) > 1 and "-->" in lines[1] else "stray_text")
    if ts_at >= len(lines) or not TIMESTAMP_RE.match(lines[ts_at]):
        return (block.line + ts_at, "bad_timestamp")
    try:
        item = pysrt.SubRipItem.from_lines(lines)
    except pysrt.Error:
        return (block.line + ts_at, "bad_timestamp")
    start, end = item.start.ordinal / MS_PER_S, item.end.ordinal / MS_PER_S
    if end < start:
        return (block.line + ts_at, "end_before_start")
    number = item.index if isinstance(item.index, int) else position
    return Cue(number, block.line, start, end, item.text)


def read_cues(path: Path, text: str, strict: bool, report: FileReport) -> list[Cue]:
    """Parse every block; strict mode raises `DataError` on the first problem, lenient mode records it."""
    cues: list[Cue] = []
    blocks = split_blocks(text)
    malformed, previous_ok = 0, False
    for position, block in enumerate(blocks, 1):
        if block.missing_blank:
            _problem(report, path, block.line, "missing_blank_line", block, "repaired", strict)
            report.notes["missing_blank_line_repaired"] += 1
        parsed = parse_block(block, position)
        if isinstance(parsed, Cue):
            if previous_ok and parsed.number != cues[-1].number + 1:
                _problem(report, path, block.line, "index_gap", block, "warning", strict=False)
            cues.append(parsed)
        else:
            _problem(report, path, parsed[0], parsed[1], block, "skipped", strict)
            report.dropped[f"malformed_{parsed[1]}"] += 1
            malformed += 1
        previous_ok = isinstance(parsed, Cue)
    assert len(cues) + malformed == len(blocks), "every block is a cue or a counted problem"
    return cues


def _problem(report: FileReport, path: Path, line: int, reason: str, block: Block, action: str, strict: bool) -> None:
    """Strict mode: raise naming file:line; lenient mode: record the problem and what was done about it."""
    snippet = " | ".join(block.lines)[:SNIPPET_CHARS]
    if strict:
        raise DataError(f"{path}:{line}: {reason}: {snippet!r} (set srt_to_jsonl.strict: false to skip)")
    report.problems.append({"file": path.as_posix(), "line": line, "reason": reason, "action": action, "text": snippet})
