"""dedupe: normalization, recall/precision on a generated set with known duplicates, precedence, split, report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from tasks.common import DataError, ParamsError, load_section
from tasks.dedupe import DedupeParams, assign_split, dedupe, main, normalize

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO / "samples" / "seeds.jsonl"


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("dedupe_speed", REPO / "bench" / "dedupe_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(tmp_path: Path, inputs: list[Path], p: DedupeParams | None = None) -> tuple[dict, list, list, list]:
    out = {k: tmp_path / f"{k}.jsonl" for k in ("train", "val", "report")}
    stats = dedupe(inputs, out["train"], out["val"], out["report"], tmp_path / "stats.json", p or DedupeParams())
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    return stats, read(out["train"]), read(out["val"]), read(out["report"])


def rec(rid: str, *texts: str) -> dict[str, Any]:
    roles = ["user", "assistant"] * len(texts)
    return {"id": rid, "messages": [{"role": r, "content": t} for r, t in zip(roles, texts)], "source": {}}


def test_normalize() -> None:
    assert normalize("Ｆｕｌｌ-width\u00a0TEXT…  it's\tFINE!") == "full width text it s fine"
    assert normalize("Straße") == normalize("STRASSE")


def test_recall_and_no_false_drops_on_generated_set(tmp_path: Path) -> None:
    bench = _bench()
    records, group_of = bench.make_corpus(3000, dup_fraction=0.1, seed=1)
    stats, train, val, report = run(tmp_path, [write(tmp_path / "in.jsonl", records)])
    recall, false_drops = bench.score(report, group_of, 300)
    assert recall >= 0.85 and false_drops == 0
    assert stats["read"] == 3000 and stats["written"] == len(train) + len(val) == 3000 - len(report)
    assert set(stats["dropped"]) <= {"exact_duplicate", "near_duplicate"} and stats["dropped"]["near_duplicate"] > 0


def test_seeds_kept_over_synthetic_copies_and_report(tmp_path: Path) -> None:
    seeds = read(SEEDS)
    s0, s1 = seeds[0], seeds[1]
    text0 = [m["content"] for m in s0["messages"]]
    gen = [rec("gen-a", *[t.upper().replace(".", "!") for t in text0]),       # exact after normalization
           rec("gen-b", *[t.replace("elephant", "elefant") for t in text0]),  # near
           rec("gen-c", "Completely different question about modal verbs here?", "Use can for ability.")]
    srt = [rec("srt-x", *[m["content"].replace("Paris", "Pariss") for m in s1["messages"]])]
    # Synthetic and transcribed files come first on the command line: precedence still keeps the seeds.
    stats, train, val, report = run(tmp_path, [write(tmp_path / "gen.jsonl", gen), write(tmp_path / "srt.jsonl", srt),
                                               SEEDS])
    kept = {r["id"] for r in train + val}
    assert {s["id"] for s in seeds} <= kept and "gen-c" in kept
    assert not kept & {"gen-a", "gen-b", "srt-x"}
    rows = {r["id"]: r for r in report}
    assert rows["gen-a"]["reason"] == "exact_duplicate" and rows["gen-a"]["duplicate_of"] == s0["id"]
    assert rows["gen-b"]["reason"] == "near_duplicate" and rows["gen-b"]["duplicate_of"] == s0["id"]
    assert 85 <= rows["gen-b"]["similarity"] < 100 and rows["gen-b"]["at"].endswith("gen.jsonl:2")
    assert rows["srt-x"]["duplicate_of"] == s1["id"] and rows["srt-x"]["kept_at"].endswith("seeds.jsonl:2")
    assert "elefant" in rows["gen-b"]["text"]
    assert stats["dropped"] == {"exact_duplicate": 1, "near_duplicate": 2}
    assert stats["kept_by_origin"] == {"gen": 1, "seed": len(seeds)}


def test_short_texts_are_exact_only(tmp_path: Path) -> None:
    recs = [rec("seed-1", "I go school.", "Say: I go to school."), rec("gen-1", "I go school.", "Say: I go to schol."),
            rec("gen-2", "i go school", "say i go to school")]
    stats, train, val, report = run(tmp_path, [write(tmp_path / "a.jsonl", recs)])
    assert [r["id"] for r in report] == ["gen-2"] and len(train + val) == 2
    stats, *_ , report = run(tmp_path, [write(tmp_path / "a.jsonl", recs)], DedupeParams(min_chars_near=10))
    assert [r["id"] for r in report] == ["gen-1", "gen-2"]


def test_shared_system_prompt_does_not_make_duplicates(tmp_path: Path) -> None:
    system = {"role": "system", "content": (
        "You are NEGA, the Native English Grammar Assistant: a warm and precise teacher. Correct the learner's "
        "sentence first, then name the rule in one or two short sentences with a fresh example, and end with a "
        "brief word of encouragement. Never mock, never lecture at length, prefer plain words to jargon, keep "
        "replies under eighty words, and ask a small follow-up question when it helps the learner practise.")}
    a = rec("srt-a", "She don't like coffee at all.", "Say: she doesn't like coffee.")
    b = rec("srt-b", "We was at home yesterday evening.", "Say: we were at home.")
    for r in (a, b):
        r["messages"].insert(0, system)
    stats, train, val, report = run(tmp_path, [write(tmp_path / "a.jsonl", [a, b])], DedupeParams(min_chars_near=0))
    assert report == [] and len(train + val) == 2


def test_split_is_stable_when_records_are_added() -> None:
    ids = [f"gen-{i}" for i in range(2000)]
    first, note = assign_split(ids[:1000], 0.1)
    more, _ = assign_split(ids, 0.1)
    assert note is None and first == more[:1000]
    assert 140 < sum(more) < 260
    again, _ = assign_split(list(reversed(ids)), 0.1)
    assert list(reversed(again)) == more


def test_split_guarantees_nonempty_validation() -> None:
    for n in range(2, 12):
        ids = [f"seed-{i}" for i in range(n)]
        flags, _ = assign_split(ids, 0.05)
        assert 1 <= sum(flags) < n
    assert assign_split(["only"], 0.5)[0] in ([True], [False])
    assert sum(assign_split([f"x{i}" for i in range(5)], 0.0)[0]) == 0


def test_end_to_end_split_stability(tmp_path: Path) -> None:
    bench = _bench()
    records, _ = bench.make_corpus(400, dup_fraction=0.0, seed=2)
    _, train1, val1, _ = run(tmp_path, [write(tmp_path / "a.jsonl", records[:200])])
    _, train2, val2, _ = run(tmp_path, [write(tmp_path / "a.jsonl", records)])
    assert val1 and {r["id"] for r in val1} <= {r["id"] for r in val2}
    assert {r["id"] for r in train1} <= {r["id"] for r in train2}


def test_bad_input_and_params_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "messages": []}\n{"messages": []}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run(tmp_path, [bad])
    f = tmp_path / "params.yaml"
    f.write_text("dedupe:\n  lsh_threshold: 1.5\n  val_fracton: 0.2\n")
    with pytest.raises(ParamsError, match=r"dedupe\.lsh_threshold") as e:
        load_section(DedupeParams, "dedupe", f)
    assert "dedupe.val_fracton" in str(e.value)


def test_cli(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("dedupe:\n  val_fraction: 0.2\n")
    out = [tmp_path / n for n in ("train.jsonl", "val.jsonl", "report.jsonl", "stats.json")]
    main(["--params", str(f), "--in", str(SEEDS), "--in", str(SEEDS), "--train", str(out[0]), "--val", str(out[1]),
          "--report", str(out[2]), "--stats", str(out[3])])
    stats = json.loads(out[3].read_text())
    assert stats["read"] == 34 and stats["dropped"] == {"exact_duplicate": 17}
    assert stats["train"] + stats["val"] == 17 and stats["val"] >= 1


def test_real_params_file_section_loads() -> None:
    if not (REPO / "params.yaml").is_file():
        pytest.skip("params.yaml not written yet")
    assert 0.0 <= load_section(DedupeParams, "dedupe", REPO / "params.yaml").val_fraction < 1.0
