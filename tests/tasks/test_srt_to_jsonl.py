"""srt_to_jsonl: the SRT fixture matrix (strict and lenient), cleaning, speaker strategies, merging, windowing,
params validation, and the CLI on the shipped samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pysrt
import pytest

from tasks.common import DataError, ParamsError, parse_section
from tasks.srt_read import Block, Cue, FileReport, decode_srt, parse_block, split_blocks
from tasks.srt_to_jsonl import (
    Piece,
    SrtToJsonlParams,
    Utterance,
    convert_file,
    main,
    merge_utterances,
    srt_to_jsonl,
    window_dialogue,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "srt"
SAMPLES = REPO / "samples" / "srt"
BASE = [
    ("user", "Is this sentence correct?"),
    ("assistant", "Yes, it is correct."),
    ("user", "Thank you!"),
    ("assistant", "You're welcome."),
]


def params(**kw: Any) -> SrtToJsonlParams:
    return SrtToJsonlParams(**kw)


def convert(path: Path, **kw: Any) -> tuple[list[dict], FileReport, str, int]:
    report = FileReport()
    records, encoding, n_cues = convert_file(path, params(**kw), report)
    return records, report, encoding, n_cues


def turns(record: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record["messages"]]


def write_srt(tmp_path: Path, text: str, name: str = "t.srt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def srt(*cues: tuple[float, float, str]) -> str:
    """Build SRT text from (start_s, end_s, text) triples."""
    def ts(s: float) -> str:
        ms = round(s * 1000)
        return f"00:{ms // 60000:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
    return "\n\n".join(f"{i}\n{ts(a)} --> {ts(b)}\n{t}" for i, (a, b, t) in enumerate(cues, 1)) + "\n"


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name, encoding", [
    ("utf8_bom.srt", "utf-8-bom"), ("crlf.srt", "utf-8"),
    ("utf16le_bom.srt", "utf-16-le-bom"), ("utf16le_nobom.srt", "utf-16-le"),
])
def test_encodings_and_line_ends_give_the_base_dialogue(name: str, encoding: str, strict: bool) -> None:
    records, report, found, n_cues = convert(FIXTURES / name, strict=strict)
    assert (found, n_cues) == (encoding, 4)
    assert [turns(r) for r in records] == [BASE]
    assert not report.problems and not report.dropped
    assert records[0]["source"]["cues"] == [1, 4] and records[0]["source"]["encoding"] == encoding


def test_legacy_codec_keeps_curly_quotes_and_accents() -> None:
    records, _, encoding, _ = convert(FIXTURES / "cp1252_legacy.srt")
    assert encoding == "cp1252"
    assert turns(records[0]) == [("user", "Is “café” spelled right?"),
                                 ("assistant", "Yes – “café” has an é at the end.")]


def test_undecodable_file_names_file_and_codecs(tmp_path: Path) -> None:
    path = tmp_path / "bad.srt"
    path.write_bytes(b"1\n00:00:01,000 --> 00:00:02,000\n\x81\x8d\x8f\n")  # undefined in cp1252, invalid UTF-8
    with pytest.raises(DataError, match=r"bad\.srt: not UTF-8 .*cp1252"):
        convert(path)
    assert decode_srt(path.read_bytes(), ["latin-1"], path)[1] == "latin-1"


def test_bad_timestamp_strict_names_file_and_line() -> None:
    with pytest.raises(DataError, match=r"bad_timestamp\.srt:6: bad_timestamp"):
        convert(FIXTURES / "bad_timestamp.srt", strict=True)


def test_bad_timestamp_lenient_skips_and_counts() -> None:
    records, report, _, n_cues = convert(FIXTURES / "bad_timestamp.srt")
    assert n_cues == 3
    assert report.dropped == {"malformed_bad_timestamp": 1}
    assert [(p["line"], p["reason"], p["action"]) for p in report.problems] == [(6, "bad_timestamp", "skipped")]
    # The two user cues (gap 3 s > merge_gap_s) become one message with a line break.
    assert turns(records[0]) == [("user", "Is this sentence correct?\nThank you!"), ("assistant", "You're welcome.")]


def test_pysrt_alone_loses_the_bad_cue_silently() -> None:
    text = (FIXTURES / "bad_timestamp.srt").read_text(encoding="utf-8")
    assert len(pysrt.from_string(text)) == 3  # why the stage reports problems itself


def test_missing_blank_line_strict_fails_lenient_repairs() -> None:
    with pytest.raises(DataError, match=r"missing_blank_line\.srt:8: missing_blank_line"):
        convert(FIXTURES / "missing_blank_line.srt", strict=True)
    records, report, _, n_cues = convert(FIXTURES / "missing_blank_line.srt")
    assert n_cues == 4 and [turns(r) for r in records] == [BASE]
    assert report.notes == {"missing_blank_line_repaired": 1} and not report.dropped


@pytest.mark.parametrize("strict", [True, False])
def test_empty_file_gives_no_records(strict: bool) -> None:
    records, report, _, n_cues = convert(FIXTURES / "empty.srt", strict=strict)
    assert (records, n_cues, report.problems) == ([], 0, [])


def test_index_gap_is_a_warning_not_a_drop() -> None:
    records, report, _, _ = convert(FIXTURES / "index_gap.srt", strict=True)
    assert [turns(r) for r in records] == [BASE]
    assert [(p["line"], p["reason"], p["action"]) for p in report.problems] == [(9, "index_gap", "warning")]
    assert records[0]["source"]["cues"] == [1, 8]


def test_tags_and_music_marks_are_removed() -> None:
    records, report, _, _ = convert(FIXTURES / "tags_and_music.srt")
    assert turns(records[0]) == [
        ("user", 'Is "have went" correct?'),
        ("assistant", 'No, say "have gone" (gone is the participle).'),
        ("user", "Got it, thanks!"),
        ("assistant", "Any time!"),
    ]
    assert report.dropped == {"sound_or_empty_line": 2}


def test_hallucinations_and_repeated_lines_are_dropped() -> None:
    records, report, _, _ = convert(FIXTURES / "hallucinations.srt")
    assert [turns(r) for r in records] == [BASE]
    assert report.dropped == {"hallucination": 2, "repeated_line": 1}
    records, report, _, _ = convert(FIXTURES / "hallucinations.srt", hallucinations=[])
    assert turns(records[0])[-1] == ("assistant", "Subtitles by the Amara.org community")


@pytest.mark.parametrize("lines, expected", [
    (["1", "00:00:01,000 --> 00:00:02,000", "Hi"], (1.0, 2.0, "Hi")),
    (["00:00:01.500 --> 00:00:02.250", "no index"], (1.5, 2.25, "no index")),
    (["1", "00:00:01.5 --> 00:00:02.250", "Hi"], (11, "bad_timestamp")),  # pysrt alone reads .5 as 5 ms
    (["1", "00:00:0x,000 --> 00:00:02,000", "Hi"], (11, "bad_timestamp")),  # pysrt alone reads 0x as 0
    (["x1", "00:00:01,000 --> 00:00:02,000", "Hi"], (10, "bad_index")),
    (["stray", "text"], (10, "stray_text")),
    (["1", "00:00:05,000 --> 00:00:02,000", "Hi"], (11, "end_before_start")),
])
def test_parse_block(lines: list[str], expected: tuple) -> None:
    parsed = parse_block(Block(10, lines), position=1)
    got = parsed if isinstance(parsed, tuple) else (parsed.start, parsed.end, parsed.text)
    assert got == expected


def test_split_blocks_repairs_missing_blank_line_with_line_numbers() -> None:
    blocks = split_blocks("1\n00:00:01,000 --> 00:00:02,000\nHi\n2\n00:00:03,000 --> 00:00:04,000\nYo\n\n\n3\nx")
    assert [(b.line, b.lines[0], b.missing_blank) for b in blocks] == [(1, "1", False), (4, "2", True), (9, "3", False)]


def test_tags_strategy_labels_continuation_and_dashes(tmp_path: Path) -> None:
    path = write_srt(tmp_path, srt(
        (0, 1, "[User] Is it 'fewer people'?"),
        (1.2, 2, "NEGA: Yes! 'Fewer' goes with things you can count."),
        (2.1, 3, "Like 'fewer books'."),          # unlabelled: still NEGA, merged (gap 0.1 s)
        (3.5, 4, "- And 'less water'?\n- Right, water is uncountable."),  # dashes switch speaker
    ))
    records, _, _, _ = convert(path, speaker_strategy="tags")
    assert turns(records[0]) == [
        ("user", "Is it 'fewer people'?"),
        ("assistant", "Yes! 'Fewer' goes with things you can count. Like 'fewer books'."),
        ("user", "And 'less water'?"),
        ("assistant", "Right, water is uncountable."),
    ]


def test_alternating_strategy_uses_dashes_and_unfinished_sentences(tmp_path: Path) -> None:
    path = write_srt(tmp_path, srt(
        (0, 1, "Can you help me?"),
        (1.5, 3, "Sure. When a sentence is not finished,"),
        (3.2, 4, "the next cue continues it."),      # gap 0.2 s, no final punctuation before → same turn
        (4.5, 5, "- I see.\n- Great!"),
    ))
    records, _, _, _ = convert(path, speaker_strategy="alternating")
    assert turns(records[0]) == [
        ("user", "Can you help me?"),
        ("assistant", "Sure. When a sentence is not finished, the next cue continues it."),
        ("user", "I see."),
        ("assistant", "Great!"),
    ]
    records, report, _, _ = convert(path, speaker_strategy="alternating", first_speaker="assistant")
    assert turns(records[0])[0] == ("user", "Sure. When a sentence is not finished, the next cue continues it.")
    assert report.dropped == {"leading_assistant_message": 1, "trailing_user_message": 1}


def test_alternating_with_turn_gap_switches_speaker_only_at_long_pauses(tmp_path: Path) -> None:
    path = write_srt(tmp_path, srt(
        (0, 1, "Hello NEGA."),
        (1.3, 2, "When do I say a?"),                  # 0.3 s pause: the same speaker goes on
        (3.2, 4, "Before a consonant sound."),         # 1.2 s pause: a new turn
        (4.6, 5, "Like a cat."),
        (6.5, 7, "Thanks!"),
    ))
    records, _, _, _ = convert(path, speaker_strategy="alternating", turn_gap_s=0.9)
    assert turns(records[0]) == [
        ("user", "Hello NEGA. When do I say a?"),
        ("assistant", "Before a consonant sound. Like a cat."),
    ]
    records, _, _, _ = convert(path, speaker_strategy="alternating")   # without it, every cue is a turn
    assert [role for role, _ in turns(records[0])] == ["user", "assistant"] * 2
    assert turns(records[0])[1] == ("assistant", "When do I say a?")


def test_monologue_strategy_pairs_chunks_with_prompt(tmp_path: Path) -> None:
    path = write_srt(tmp_path, srt((0, 1, "First sentence."), (1.2, 2, "Second one."), (5, 6, "After a pause.")),
                     name="lesson_monologue.srt")   # the default per_file glob picks monologue
    records, _, _, _ = convert(path, monologue_prompt="Teach me.")
    assert [turns(r) for r in records] == [[("user", "Teach me."),
                                            ("assistant", "First sentence. Second one.\nAfter a pause.")]]
    assert records[0]["source"]["speaker_strategy"] == "monologue"
    records, _, _, _ = convert(path, monologue_prompt="Teach me.", max_chars=30)
    assert [r["messages"][1]["content"] for r in records] == ["First sentence. Second one.", "After a pause."]


def test_merge_utterances_by_gap_and_speaker() -> None:
    times = [(0.0, 1.0), (1.4, 2.0), (4.0, 5.0), (5.1, 6.0)]
    pieces = [Piece(Cue(i + 1, i, a, b, f"p{i + 1}"), f"p{i + 1}") for i, (a, b) in enumerate(times)]
    merged = merge_utterances(pieces, ["user", "user", "user", "assistant"], merge_gap_s=1.0)
    assert [(u.role, u.text, u.start, u.end, u.cues) for u in merged] == [
        ("user", "p1 p2", 0.0, 2.0, (1, 2)), ("user", "p3", 4.0, 5.0, (3, 3)), ("assistant", "p4", 5.1, 6.0, (4, 4)),
    ]


def _messages(n_exchanges: int, size: int = 10) -> list[Utterance]:
    out = []
    for i in range(n_exchanges):
        for role in ("user", "assistant"):
            out.append(Utterance(role, f"{role[0]}{i}".ljust(size, "."), float(i), float(i) + 0.5, (i, i)))
    return out


@pytest.mark.parametrize("kw, expected", [
    ({"max_turns": 4}, [["u0", "a0", "u1", "a1"], ["u2", "a2"]]),
    ({"max_turns": 4, "overlap_turns": 2}, [["u0", "a0", "u1", "a1"], ["u1", "a1", "u2", "a2"]]),
    ({"max_turns": 12, "max_chars": 45}, [["u0", "a0", "u1", "a1"], ["u2", "a2"]]),   # 40 chars fit, 60 don't
    ({"max_turns": 12, "max_chars": 5}, [["u0", "a0"], ["u1", "a1"], ["u2", "a2"]]),  # over-long: alone
])
def test_window_dialogue(kw: dict, expected: list[list[str]]) -> None:
    windows = window_dialogue(_messages(3), params(**kw), FileReport())
    assert [[m.text.rstrip(".") for m in w] for w in windows] == expected


def test_windows_become_records_starting_with_user_and_system_prompt(tmp_path: Path) -> None:
    path = write_srt(tmp_path, srt(*[(i, i + 0.8, f"Line {i}.") for i in range(7)]))  # 7 alternating cues
    records, report, _, _ = convert(path, max_turns=2, system_prompt="You are NEGA.")
    assert [turns(r) for r in records] == [
        [("system", "You are NEGA."), ("user", f"Line {i}."), ("assistant", f"Line {i + 1}.")] for i in (0, 2, 4)
    ]
    assert [r["source"]["cues"] for r in records] == [[1, 2], [3, 4], [5, 6]]
    assert report.dropped == {"trailing_user_message": 1}
    assert len({r["id"] for r in records}) == 3 and all(r["id"].startswith("srt-") for r in records)


@pytest.mark.parametrize("raw, key", [
    ({"max_turns": 5}, "srt_to_jsonl.max_turns"),
    ({"overlap_turns": 12}, "srt_to_jsonl: Value error, overlap_turns"),
    ({"legacy_encodings": ["klingon"]}, "srt_to_jsonl.legacy_encodings"),
    ({"speaker_strategy": "diarize"}, "srt_to_jsonl.speaker_strategy"),
    ({"per_file": {"*.srt": {"first_speaker": "narrator"}}}, "srt_to_jsonl.per_file.*.srt.first_speaker"),
    ({"merge_gap": 1.0}, "srt_to_jsonl.merge_gap"),
])
def test_params_errors_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key.replace(".", r"\.").replace("*", r"\*")):
        parse_section(SrtToJsonlParams, "srt_to_jsonl", raw)


def test_missing_input_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere: input path does not exist"):
        srt_to_jsonl([tmp_path / "nowhere"], tmp_path / "o.jsonl", tmp_path / "s.json", params())


def test_cli_on_shipped_samples(tmp_path: Path) -> None:
    params_path = tmp_path / "params.yaml"
    params_path.write_text("srt_to_jsonl: {}\n", encoding="utf-8")
    out, stats_path = tmp_path / "t.jsonl", tmp_path / "s.json"
    args = ["--params", str(params_path), "--in", str(SAMPLES), "--out", str(out), "--stats", str(stats_path)]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    assert (stats["files"], stats["read"], stats["written"]) == (5, 54, 5)
    assert stats["dropped"] == {"hallucination": 2, "malformed_bad_timestamp": 1, "repeated_line": 1,
                                "sound_or_empty_line": 3}
    assert stats["notes"] == {"missing_blank_line_repaired": 1}
    assert stats["encodings"] == {"cp1252": 1, "utf-8": 3, "utf-8-bom": 1}
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant" and record["id"].startswith("srt-")
        assert all(a != b for a, b in zip(roles, roles[1:]))
    assert [r["source"]["speaker_strategy"] for r in records] == ["tags", "alternating", "alternating", "monologue",
                                                                  "tags"]
    assert "I'm NEGA, your Native English Grammar Assistant." in out.read_text(encoding="utf-8")
    first_ids = [r["id"] for r in records]
    main(args)
    assert [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()] == first_ids


def test_strict_cli_fails_on_the_broken_sample(tmp_path: Path) -> None:
    params_path = tmp_path / "params.yaml"
    params_path.write_text("srt_to_jsonl:\n  strict: true\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"srt_to_jsonl: .*05_legacy_cp1252_hand_edited\.srt:8: missing_blank_line"):
        main(["--params", str(params_path), "--in", str(SAMPLES), "--out", str(tmp_path / "o.jsonl"),
              "--stats", str(tmp_path / "s.json")])
