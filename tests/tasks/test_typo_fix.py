"""typo_fix: whole-word rules with guards, per-rule counts, near-miss review, blocklist flag vs drop, params errors,
and the CLI chained after srt_to_jsonl on the shipped samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks import srt_to_jsonl
from tasks.common import DataError, ParamsError, parse_section, write_jsonl
from tasks.typo_fix import TypoFixParams, TypoRule, apply_rule, cased, main, near_misses, typo_fix

REPO = Path(__file__).resolve().parents[2]
# Stand-ins for words that must never reach training data; tests never need the real ones.
TEST_BLOCKLIST = ["slurtoken", "n-word"]


def rule(**kw: Any) -> TypoRule:
    return TypoRule(replacement="NEGA", **kw)


def fix(text: str, **kw: Any) -> tuple[str, int, list]:
    return apply_rule(rule(**kw), text)


def record(rid: str, *contents: str) -> dict[str, Any]:
    roles = ["user", "assistant"] * len(contents)
    return {"id": rid, "messages": [{"role": r, "content": c} for r, c in zip(roles, contents)], "source": {}}


def run(tmp_path: Path, records: list[dict], **kw: Any) -> tuple[list[dict], list[dict], dict]:
    src, out, review, stats = (tmp_path / n for n in ("in.jsonl", "out.jsonl", "review.jsonl", "stats.json"))
    write_jsonl(src, records)
    result = typo_fix(src, out, review, stats, TypoFixParams(**kw))
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]  # noqa: E731
    assert json.loads(stats.read_text(encoding="utf-8")) == result
    return read(out), read(review), result


@pytest.mark.parametrize("text, kw, expected", [
    ("Hi Nagar!", {"word": "Nagar"}, "Hi NEGA!"),
    ("hi nagar, NAGAR", {"word": "Nagar"}, "hi NEGA, NEGA"),
    ("Nagarkot and Nagar's book", {"word": "Nagar"}, "Nagarkot and NEGA's book"),   # whole words only
    ("hi nagar", {"word": "Nagar", "ignore_case": False}, "hi nagar"),
    ("Nagar, NAGAR, nagar", {"word": "Nagar", "case": "match"}, "NEGA, NEGA, nega"),
    ("Nagar and Negar", {"pattern": "N[ae]gar"}, "NEGA and NEGA"),
    ("Hi N-word.", {"word": "N-word"}, "Hi NEGA."),
])
def test_word_boundary_replacements(text: str, kw: dict, expected: str) -> None:
    assert fix(text, **kw)[0] == expected


def test_cased_copies_case_of_match() -> None:
    assert [cased("Nega", m, "match") for m in ("EDGAR", "Edgar", "edgar")] == ["NEGA", "Nega", "nega"]
    assert cased("NEGA", "edgar", "as_written") == "NEGA"


def test_guards_keep_listed_contexts() -> None:
    text, n, guarded = fix("Thanks, Edgar! I read Edgar Allan Poe.", word="Edgar", not_if_followed_by=["Allan"])
    assert (text, n) == ("Thanks, NEGA! I read Edgar Allan Poe.", 1)
    assert guarded == [(22, 27, "not_if_followed_by")]
    assert fix("Dr. Edgar and Edgar", word="Edgar", not_if_preceded_by=["Dr."])[0] == "Dr. Edgar and NEGA"
    near = {"word": "Edgar", "only_if_near": ["grammar"], "near_words": 3}
    assert fix("Edgar, is my grammar right?", **near)[0] == "NEGA, is my grammar right?"
    assert fix("Edgar went to the shop to buy grammar books", **near)[1] == 0


def test_counts_per_rule_roles_and_provenance(tmp_path: Path) -> None:
    rules = [{"word": "Nagar", "replacement": "NEGA"},
             {"name": "edgar", "word": "Edgar", "replacement": "NEGA", "roles": ["user"]}]
    out, _, stats = run(tmp_path, [record("a", "Nagar? Nagar!", "Edgar here"), record("b", "fine", "ok")],
                        rules=rules, blocklist=[])
    assert [m["content"] for m in out[0]["messages"]] == ["NEGA? NEGA!", "Edgar here"]
    assert out[0]["source"]["typo_fixes"] == {"Nagar": 2} and "typo_fixes" not in out[1]["source"]
    assert [r["id"] for r in out] == ["a", "b"]                   # ids stay stable
    assert stats["rules"] == {"Nagar": {"replaced": 2, "guarded": 0}, "edgar": {"replaced": 0, "guarded": 0}}
    assert (stats["read"], stats["written"], stats["records_changed"]) == (2, 2, 1)


def test_near_misses_are_reported_not_replaced(tmp_path: Path) -> None:
    out, review, stats = run(tmp_path, [record("a", "Hello Nagar and nagar", "I am NEGA, near the Nege.")],
                             rules=[], blocklist=[])
    assert out[0]["messages"][0]["content"] == "Hello Nagar and nagar"
    assert [(e["message"], e["word"], e["near"], e["score"]) for e in review] == [
        (0, "Nagar", "NEGA", 66.7), (1, "Nege", "NEGA", 75.0),      # lowercase and ignored words are skipped
    ]
    assert review[0]["context"] == "Hello Nagar and nagar" and stats["review"] == {"near_miss": 2}
    params = TypoFixParams(rules=[], review_capitalized_only=False, review_threshold=70)
    assert [m[0] for m, _, _ in near_misses("nagar nege Nega", params)] == ["nege"]
    assert list(near_misses("Nagar", TypoFixParams(protected_words=[]))) == []


def test_default_rules_fix_all_shipped_mishearings() -> None:
    params = TypoFixParams()
    text = "Nagar, Nege, Negar, N-word, Nega and Edgar; but Edgar Allan Poe stays."
    for r in params.rules:
        text = apply_rule(r, text)[0]
    assert text == "NEGA, NEGA, NEGA, NEGA, NEGA and NEGA; but Edgar Allan Poe stays."


@pytest.mark.parametrize("action", ["drop", "flag"])
def test_blocklist_flag_or_drop(tmp_path: Path, action: str) -> None:
    records = [record("bad", "you slurtokens", "hello"), record("ok", "fine", "fine"),
               record("fixed", "hi n-word", "hello")]
    rules = [{"word": "n-word", "replacement": "NEGA"}]
    out, review, stats = run(tmp_path, records, rules=rules, blocklist=TEST_BLOCKLIST, blocklist_action=action)
    blocked = [e for e in review if e["reason"] == "blocklist"]
    assert [(e["id"], e["word"], e["action"]) for e in blocked] == [("bad", "slurtokens", action)]
    if action == "drop":
        assert [r["id"] for r in out] == ["ok", "fixed"] and stats["dropped"] == {"blocklist": 1}
    else:
        assert [(r["id"], r.get("flags")) for r in out] == [("bad", ["blocklist"]), ("ok", None), ("fixed", None)]
        assert stats["flagged"] == 1 and stats["dropped"] == {}


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "text": "User: hi"}', r"in\.jsonl:2: a dialogue record needs"),
    ('{"id": "a", "messages": [{"role": "user", "content": 3}]}', r"in\.jsonl:2: messages\[0\] needs"),
    ("not json", r"in\.jsonl:2: not valid JSON"),
])
def test_bad_input_records_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(record("ok", "hi", "hello")) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        typo_fix(src, tmp_path / "o.jsonl", tmp_path / "r.jsonl", tmp_path / "s.json", TypoFixParams())
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("raw, key", [
    ({"rules": [{"word": "a", "pattern": "b", "replacement": "c"}]}, "typo_fix.rules.0: Value error, set exactly"),
    ({"rules": [{"replacement": "c"}]}, "typo_fix.rules.0: Value error, set exactly"),
    ({"rules": [{"pattern": "(", "replacement": "c"}]}, "typo_fix.rules.0.pattern"),
    ({"rules": [{"word": "a"}]}, "typo_fix.rules.0.replacement"),
    ({"rules": [{"word": "a", "replacement": "b", "only_if": ["x"]}]}, "typo_fix.rules.0.only_if"),
    ({"blocklist_action": "delete"}, "typo_fix.blocklist_action"),
    ({"review_threshold": 150}, "typo_fix.review_threshold"),
])
def test_params_errors_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_section(TypoFixParams, "typo_fix", raw)


def test_cli_reports_params_errors_without_traceback(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("typo_fix:\n  blocklist_action: delete\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"typo_fix: .*typo_fix\.blocklist_action"):
        main(["--params", str(params), "--in", "x", "--out", "o", "--review", "r", "--stats", "s"])


def test_cli_after_srt_to_jsonl_on_shipped_samples(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("srt_to_jsonl: {}\ntypo_fix: {}\n", encoding="utf-8")
    transcribed, fixed, review, stats = (tmp_path / n for n in ("t.jsonl", "f.jsonl", "r.jsonl", "s.json"))
    srt_to_jsonl.main(["--params", str(params), "--in", str(REPO / "samples" / "srt"), "--out", str(transcribed),
                       "--stats", str(tmp_path / "srt.json")])
    assert main(["--params", str(params), "--in", str(transcribed), "--out", str(fixed), "--review", str(review),
                 "--stats", str(stats)]) == 0
    records = [json.loads(line) for line in fixed.read_text(encoding="utf-8").splitlines()]
    text = "\n".join(m["content"] for r in records for m in r["messages"])
    for misheard in ("Nagar", "Nege", "N-word", "Thanks, Edgar"):
        assert misheard not in text
    assert "Hi NEGA, can you check my sentence" in text and "Who are you, NEGA?" in text
    assert "reading Edgar Allan Poe" in text
    entries = [json.loads(line) for line in review.read_text(encoding="utf-8").splitlines()]
    assert [(e["reason"], e["word"]) for e in entries] == [("guarded", "Edgar")]
    summary = json.loads(stats.read_text(encoding="utf-8"))
    assert (summary["read"], summary["written"], summary["records_changed"]) == (5, 5, 1)
    assert {k: v["replaced"] for k, v in summary["rules"].items() if v["replaced"]} == {
        "Edgar->NEGA": 1, "Nagar->NEGA": 1, "Nege->NEGA": 1, "N-word placeholder->NEGA": 1,
    }
