"""srt_to_jsonl stage: subtitle files (.srt) → dialogue records `{"id", "messages", "source"}` (jsonl).

Per file: bytes → text (encoding chain) → cue blocks → cleaned pieces → roles (speaker strategy) → utterances
(merged by timing) → messages → windows, each a record that starts with the user and ends with the assistant.
Reading (encodings, strict cue parsing with `file:line` problems) lives in `tasks/srt_read.py`.

Speaker strategies (`speaker_strategy`, one small function each, picked by name in `STRATEGIES`):
- `tags`: explicit labels (`NEGA: …`, `[User] …`, names from `speaker_labels`); an unlabelled line continues
  the previous speaker, a dash line (`- …`) switches speaker.
- `alternating`: every cue (and every dash line) is a new turn of the other speaker, starting with
  `first_speaker`; a cue that follows within `continuation_gap_s` a cue without final punctuation continues it,
  and with `turn_gap_s` set the speaker changes only at a pause at least that long (transcripts of speech).
- `monologue`: everything is the assistant; each record pairs a chunk with `monologue_prompt` as the user turn.
- `auto`: `tags` when the file has any label, else `alternating` (provenance records the one used).
"""

from __future__ import annotations

import codecs
import fnmatch
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.common import DataError, StageStats, content_id, load_section, stage_errors, stage_parser, write_jsonl
from tasks.srt_read import Cue, FileReport, decode_srt, read_cues

Role = Literal["user", "assistant"]
Strategy = Literal["auto", "tags", "alternating", "monologue"]

HTML_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
ASS_TAG_RE = re.compile(r"\{\\[^{}]*\}")
BRACKETED_RE = re.compile(r"\[[^\[\]]*\]")
PARENTHESIZED_RE = re.compile(r"\(([^()]*)\)")
BRACKET_LABEL_RE = re.compile(r"^\[([^\[\]]{1,40})\]\s*:?\s*")
COLON_LABEL_RE = re.compile(r"^([^\W\d][\w .'-]{0,39}?)\s*:(?:\s+|$)")
DASH_RE = re.compile(r"^[-\u2010-\u2015]\s*")
MUSIC_CHARS = "♪♫♬♩"
FINAL_PUNCTUATION = ".?!…\"'”’)"

DEFAULT_SOUND_WORDS = [
    "music", "applause", "laughter", "laughs", "laughing", "chuckles", "sighs", "silence", "inaudible",
    "noise", "cheering", "clapping", "coughs", "static", "beep", "blank_audio",
]
DEFAULT_HALLUCINATIONS = [
    "thanks for watching", "thank you for watching", "thank you so much for watching",
    "thanks for watching and see you next time", "please subscribe", "please like and subscribe",
    "like and subscribe", "don't forget to like and subscribe", "subtitles by the amara.org community",
    "subtitles by amara.org", "subtitles made by the community of amara.org", "transcription by castingwords",
    "you", "字幕由amara.org社区提供", "请不吝点赞 订阅 转发 打赏支持明镜与点点栏目",
]


class FileOverride(BaseModel):
    """Settings for files whose name matches a glob in `per_file`."""

    model_config = ConfigDict(extra="forbid")
    speaker_strategy: Strategy | None = None
    first_speaker: Role | None = None


class SrtToJsonlParams(BaseModel):
    """The `srt_to_jsonl` section of params.yaml (times in seconds, sizes in characters)."""

    model_config = ConfigDict(extra="forbid")
    strict: bool = False
    legacy_encodings: list[str] = Field(default_factory=lambda: ["cp1252"])
    speaker_strategy: Strategy = "auto"
    first_speaker: Role = "user"
    per_file: dict[str, FileOverride] = Field(
        default_factory=lambda: {"*monologue*": FileOverride(speaker_strategy="monologue")}
    )
    speaker_labels: dict[str, Role] = Field(
        default_factory=lambda: {"NEGA": "assistant", "User": "user", "Learner": "user", "Student": "user"}
    )
    monologue_prompt: str = "NEGA, could you teach me a bit of English grammar?"
    system_prompt: str | None = None
    merge_gap_s: float = Field(1.5, ge=0)
    continuation_gap_s: float = Field(0.5, ge=0)
    # Pause-based turns for `alternating`: when set, the speaker changes only at a pause at least this long
    # (transcripts of real conversation split one turn into several cues; a cue count says nothing of turns).
    turn_gap_s: float | None = Field(None, gt=0)
    max_turns: int = Field(12, ge=2)
    max_chars: int = Field(3000, gt=0)
    overlap_turns: int = Field(0, ge=0)
    sound_words: list[str] = Field(default_factory=lambda: list(DEFAULT_SOUND_WORDS))
    hallucinations: list[str] = Field(default_factory=lambda: list(DEFAULT_HALLUCINATIONS))

    @field_validator("legacy_encodings")
    @classmethod
    def _known_codecs(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                codecs.lookup(name)
            except LookupError:
                raise ValueError(f"unknown codec {name!r}") from None
        return names

    @field_validator("max_turns", "overlap_turns")
    @classmethod
    def _even(cls, n: int) -> int:
        if n % 2:
            raise ValueError(f"must be even (user + assistant pairs), got {n}")
        return n

    @model_validator(mode="after")
    def _overlap_below_max(self) -> SrtToJsonlParams:
        if self.overlap_turns >= self.max_turns:
            raise ValueError(f"overlap_turns ({self.overlap_turns}) must be below max_turns ({self.max_turns})")
        return self


@dataclass
class Piece:
    """One speaker's text inside one cue; `label` is an explicit role, `dash` marks a dash turn."""

    cue: Cue
    text: str
    label: Role | None = None
    dash: bool = False


@dataclass
class Utterance:
    role: Role
    text: str
    start: float
    end: float
    cues: tuple[int, int]


def normalize_for_match(text: str) -> str:
    """Lowercase, punctuation to spaces: `Thanks for watching!` → `thanks for watching`."""
    return " ".join(re.sub(r"[^\w']+", " ", text.casefold()).split())


def clean_line(line: str, sound_words: frozenset[str]) -> str:
    """Remove sound/music annotations: `[Music]`, `(applause)`, a line of lyrics (starting with ♪), ♪ marks."""
    if line[:1] in MUSIC_CHARS:
        return ""
    line = BRACKETED_RE.sub(" ", line.translate({ord(c): " " for c in MUSIC_CHARS}))
    line = PARENTHESIZED_RE.sub(lambda m: " " if sound_words & set(normalize_for_match(m[1]).split()) else m[0], line)
    return " ".join(line.split())


def cue_pieces(cue: Cue, params: SrtToJsonlParams, report: FileReport) -> list[Piece]:
    """A cue's text → pieces: tags stripped, labels/dashes read, sound marks removed; lines of one turn joined."""
    labels = {name.casefold(): role for name, role in params.speaker_labels.items()}
    sound_words = frozenset(w.casefold() for w in params.sound_words)
    text = ASS_TAG_RE.sub("", HTML_TAG_RE.sub("", cue.text))
    if not text.strip():
        report.dropped["empty_cue"] += 1
    pieces: list[Piece] = []
    pending: tuple[Role | None, bool] = (None, False)  # a label or dash alone on its line applies to the next
    for raw in text.split("\n"):
        line, dash, label = raw.strip(), False, None
        if DASH_RE.match(line):
            line, dash = DASH_RE.sub("", line, count=1), True
        for pattern in (BRACKET_LABEL_RE, COLON_LABEL_RE):
            m = pattern.match(line)
            if m and m[1].strip().casefold() in labels:
                line, label = line[m.end():], labels[m[1].strip().casefold()]
                break
        if not line and (label or dash):
            pending = (label, dash)
            continue
        label, dash = label or pending[0], dash or pending[1]
        pending = (None, False)
        line = clean_line(line, sound_words)
        if not re.search(r"\w", line):
            report.dropped["sound_or_empty_line"] += 1
        elif pieces and not dash and label is None:
            pieces[-1].text += " " + line
        else:
            pieces.append(Piece(cue, line, label, dash))
    return pieces


def clean_pieces(pieces: list[Piece], hallucinations: frozenset[str], report: FileReport) -> list[Piece]:
    """Drop known Whisper hallucinations and a piece that repeats the previous one (same label and text)."""
    kept: list[Piece] = []
    for piece in pieces:
        norm = normalize_for_match(piece.text)
        if norm in hallucinations:
            report.dropped["hallucination"] += 1
        elif kept and kept[-1].label == piece.label and normalize_for_match(kept[-1].text) == norm:
            report.dropped["repeated_line"] += 1
        else:
            kept.append(piece)
    return kept


def _other(role: Role | None, first: Role) -> Role:
    if role is None:
        return first
    return "assistant" if role == "user" else "user"


def roles_tags(pieces: list[Piece], params: SrtToJsonlParams, first: Role) -> list[Role]:
    """A label decides; a dash switches speaker; anything else continues the previous speaker."""
    roles: list[Role] = []
    for piece in pieces:
        prev = roles[-1] if roles else None
        roles.append(piece.label or (_other(prev, first) if piece.dash else prev or first))
    return roles


def roles_alternating(pieces: list[Piece], params: SrtToJsonlParams, first: Role) -> list[Role]:
    """Each piece is the other speaker's turn, unless it continues the current one.

    A piece continues the current turn when it follows an unfinished sentence right away (within
    `continuation_gap_s`) or, with `turn_gap_s` set, when the pause before it is shorter than `turn_gap_s`.
    """
    roles: list[Role] = []
    for i, piece in enumerate(pieces):
        prev = pieces[i - 1] if i else None
        gap = piece.cue.start - prev.cue.end if prev is not None else 0.0
        unfinished = (
            prev is not None and prev.cue is not piece.cue and gap <= params.continuation_gap_s
            and not prev.text.endswith(tuple(FINAL_PUNCTUATION))
        )
        short_pause = prev is not None and params.turn_gap_s is not None and gap < params.turn_gap_s
        continues = not piece.dash and (unfinished or short_pause)
        roles.append(roles[-1] if continues else _other(roles[-1] if roles else None, first))
    return roles


def roles_monologue(pieces: list[Piece], params: SrtToJsonlParams, first: Role) -> list[Role]:
    return ["assistant"] * len(pieces)


STRATEGIES: dict[str, Callable[[list[Piece], SrtToJsonlParams, Role], list[Role]]] = {
    "tags": roles_tags, "alternating": roles_alternating, "monologue": roles_monologue,
}


def merge_utterances(pieces: list[Piece], roles: list[Role], merge_gap_s: float) -> list[Utterance]:
    """Join consecutive pieces of the same role that are at most `merge_gap_s` apart into one utterance."""
    out: list[Utterance] = []
    for piece, role in zip(pieces, roles, strict=True):
        last = out[-1] if out else None
        if last and last.role == role and piece.cue.start - last.end <= merge_gap_s:
            last.text += " " + piece.text
            last.end, last.cues = max(last.end, piece.cue.end), (last.cues[0], piece.cue.number)
        else:
            out.append(Utterance(role, piece.text, piece.cue.start, piece.cue.end, (piece.cue.number,) * 2))
    return out


def to_messages(utterances: list[Utterance]) -> list[Utterance]:
    """Consecutive utterances of one role become one message (a pause becomes a line break)."""
    out: list[Utterance] = []
    for u in utterances:
        if out and out[-1].role == u.role:
            last = out[-1]
            out[-1] = Utterance(u.role, f"{last.text}\n{u.text}", last.start, u.end, (last.cues[0], u.cues[1]))
        else:
            out.append(Utterance(u.role, u.text, u.start, u.end, u.cues))
    return out


def window_dialogue(messages: list[Utterance], params: SrtToJsonlParams, report: FileReport) -> list[list[Utterance]]:
    """Alternating messages → windows of whole (user, assistant) exchanges within max_turns and max_chars.

    A leading assistant message and a trailing user message have no partner and are dropped (counted);
    a single exchange longer than `max_chars` still makes a window of its own (noted as window_over_max_chars).
    """
    while messages and messages[0].role == "assistant":
        messages = messages[1:]
        report.dropped["leading_assistant_message"] += 1
    if messages and messages[-1].role == "user":
        messages = messages[:-1]
        report.dropped["trailing_user_message"] += 1
    exchanges = [messages[i:i + 2] for i in range(0, len(messages), 2)]
    max_ex, overlap_ex = params.max_turns // 2, params.overlap_turns // 2
    windows: list[list[Utterance]] = []
    start = 0
    while start < len(exchanges):
        end, chars = start, 0
        while end < len(exchanges) and end - start < max_ex:
            size = sum(len(m.text) for m in exchanges[end])
            if end > start and chars + size > params.max_chars:
                break
            end, chars = end + 1, chars + size
        if chars > params.max_chars:
            report.notes["window_over_max_chars"] += 1
        windows.append([m for ex in exchanges[start:end] for m in ex])
        if end == len(exchanges):
            break
        start = max(end - overlap_ex, start + 1)
    return windows


def window_monologue(utterances: list[Utterance], params: SrtToJsonlParams) -> list[list[Utterance]]:
    """Monologue utterances → chunks of at most `max_chars` (a longer utterance alone), each answering
    `monologue_prompt`: `[[user prompt, assistant chunk]]`."""
    chunks: list[list[Utterance]] = []
    for u in utterances:
        if chunks and sum(len(x.text) + 1 for x in chunks[-1]) + len(u.text) <= params.max_chars:
            chunks[-1].append(u)
        else:
            chunks.append([u])
    windows = []
    for chunk in chunks:
        (answer,) = to_messages(chunk)
        prompt = Utterance("user", params.monologue_prompt, answer.start, answer.start, answer.cues)
        windows.append([prompt, answer])
    return windows


def make_record(window: list[Utterance], path: Path, strategy: str, encoding: str, system: str | None) -> dict:
    """A window → dialogue record with a content-hash id and provenance."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m.role, "content": m.text} for m in window
    ]
    source = {
        "origin": "srt", "file": path.as_posix(), "cues": [window[0].cues[0], window[-1].cues[1]],
        "start": round(window[0].start, 3), "end": round(window[-1].end, 3),
        "speaker_strategy": strategy, "encoding": encoding,
    }
    return {"id": content_id("srt", messages), "messages": messages, "source": source}


def file_settings(path: Path, pieces: list[Piece], params: SrtToJsonlParams) -> tuple[str, Role]:
    """(strategy, first speaker) for a file: the first matching `per_file` glob overrides the defaults;
    `auto` becomes `tags` when any piece has a label, else `alternating`."""
    strategy, first = params.speaker_strategy, params.first_speaker
    for pattern, override in params.per_file.items():
        if fnmatch.fnmatchcase(path.name.casefold(), pattern.casefold()):
            strategy, first = override.speaker_strategy or strategy, override.first_speaker or first
            break
    if strategy == "auto":
        strategy = "tags" if any(p.label for p in pieces) else "alternating"
    return strategy, first


def convert_file(path: Path, params: SrtToJsonlParams, report: FileReport) -> tuple[list[dict], str, int]:
    """One .srt file → (records, encoding, number of cues)."""
    text, encoding = decode_srt(path.read_bytes(), params.legacy_encodings, path)
    cues = read_cues(path, text, params.strict, report)
    pieces = [p for cue in cues for p in cue_pieces(cue, params, report)]
    pieces = clean_pieces(pieces, frozenset(map(normalize_for_match, params.hallucinations)), report)
    strategy, first = file_settings(path, pieces, params)
    utterances = merge_utterances(pieces, STRATEGIES[strategy](pieces, params, first), params.merge_gap_s)
    if strategy == "monologue":
        windows = window_monologue(utterances, params)
    else:
        windows = window_dialogue(to_messages(utterances), params, report)
    return [make_record(w, path, strategy, encoding, params.system_prompt) for w in windows], encoding, len(cues)


def find_srt_files(inputs: Sequence[Path]) -> list[Path]:
    """Every `.srt` file (any case) under the inputs (files or directories), sorted per input."""
    files: list[Path] = []
    for inp in inputs:
        if inp.is_file():
            files.append(inp)
        elif inp.is_dir():
            files.extend(sorted(p for p in inp.rglob("*") if p.is_file() and p.suffix.lower() == ".srt"))
        else:
            raise DataError(f"{inp}: input path does not exist")
    return files


def srt_to_jsonl(inputs: Sequence[Path], out: Path, stats_path: Path, params: SrtToJsonlParams) -> dict[str, Any]:
    """Convert every .srt under `inputs` into `out` (jsonl records); write and return the stats."""
    stats = StageStats("srt_to_jsonl")
    report, encodings, seen, empty_files = FileReport(), Counter[str](), set(), 0
    records: list[dict] = []
    files = find_srt_files(inputs)
    for path in files:
        file_records, encoding, n_cues = convert_file(path, params, report)
        encodings[encoding] += 1
        stats.read += n_cues
        empty_files += n_cues == 0
        for record in file_records:
            if record["id"] in seen:
                report.dropped["duplicate_record"] += 1
                continue
            seen.add(record["id"])
            records.append(record)
    stats.written = write_jsonl(out, records)
    stats.dropped.update(+report.dropped)
    stats.extra.update(
        unit_read="cues", unit_written="records", files=len(files), empty_files=empty_files,
        encodings=dict(sorted(encodings.items())), notes=dict(sorted(report.notes.items())),
        messages=sum(len(r["messages"]) for r in records), problems=report.problems,
    )
    return stats.save(stats_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("srt_to_jsonl", __doc__)
    parser.add_argument("--in", dest="inputs", type=Path, action="append", required=True,
                        help="a directory searched recursively for .srt files, or one .srt file (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="output jsonl of dialogue records")
    parser.add_argument("--stats", type=Path, required=True, help="output stats JSON")
    args = parser.parse_args(argv)
    with stage_errors("srt_to_jsonl"):
        params = load_section(SrtToJsonlParams, "srt_to_jsonl", args.params)
        stats = srt_to_jsonl(args.inputs, args.out, args.stats, params)
    print(f"srt_to_jsonl: {stats['files']} files, {stats['read']} cues -> {stats['written']} records; "
          f"dropped {stats['dropped']}; {len(stats['problems'])} problems (see {args.stats})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
