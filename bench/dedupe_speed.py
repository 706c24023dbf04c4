"""Dedupe speed and quality on synthetic dialogues with known injected near-duplicates.

    .venv/bin/python bench/dedupe_speed.py --n 10000 --n 100000

For each N: builds N records (a fraction `--dup-fraction` of them are copies of others with every message edited:
1–3 character typos, case/punctuation changes, 1–2 adjacent word swaps, or typos + case/punctuation), writes them
as jsonl, then runs the real `tasks.dedupe` stage in a fresh subprocess so its peak RSS is the stage's alone.
Prints N, wall seconds of the stage, CPU seconds of the subprocess (imports included; robust to a busy machine),
peak RSS and RSS right after imports, recall (copies dropped as a duplicate of their own group) and false drops
(records dropped as a duplicate of another group).
`make_corpus` is also used by the tests.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SYLLABLES = ["ka", "to", "ri", "men", "sa", "lo", "vi", "der", "po", "na", "tu", "gel", "mi", "ras", "be", "ko",
             "lin", "fa", "du", "ser", "ne", "ho", "zu", "pat", "ve", "qui", "ro", "las", "mo", "tin"]
PUNCT = [".", ",", "!", "?", ";"]
EDIT_KINDS = ("typos", "case_punct", "word_swap", "mixed")
WORDS_PER_TURN = (3, 18)
TURNS = (2, 6)
COLUMNS = [("N", 8), ("seconds", 8), ("cpu s", 6), ("peak RSS MB", 12), ("after import", 13), ("recall", 7),
           ("false drops", 12), ("dropped", 8)]


def _words(rng: random.Random, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(*WORDS_PER_TURN))) + rng.choice(PUNCT)


def _typos(text: str, rng: random.Random, n: int) -> str:
    chars = list(text)
    for _ in range(n):
        k = rng.randrange(len(chars))
        op = rng.choice(("sub", "ins", "del"))
        if op == "sub":
            chars[k] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        elif op == "ins":
            chars.insert(k, rng.choice("abcdefghijklmnopqrstuvwxyz"))
        elif len(chars) > 1:
            del chars[k]
    return "".join(chars)


def _case_punct(text: str, rng: random.Random) -> str:
    words = [w.upper() if rng.random() < 0.2 else w.capitalize() if rng.random() < 0.2 else w for w in text.split()]
    return " ".join(w + rng.choice(PUNCT) if rng.random() < 0.15 else w for w in words)


def _swap(text: str, rng: random.Random, n: int) -> str:
    words = text.split()
    for _ in range(n):
        if len(words) > 1:
            k = rng.randrange(len(words) - 1)
            words[k], words[k + 1] = words[k + 1], words[k]
    return " ".join(words)


def edit(text: str, kind: str, rng: random.Random) -> str:
    """One near-duplicate of `text` of the given kind (see EDIT_KINDS)."""
    if kind == "typos":
        return _typos(text, rng, rng.randint(1, 3))
    if kind == "case_punct":
        return _case_punct(text, rng)
    if kind == "word_swap":
        return _swap(text, rng, rng.randint(1, 2))
    return _case_punct(_typos(text, rng, rng.randint(1, 2)), rng)


def make_corpus(n: int, dup_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """N dialogue records (ids `gen-…`, shuffled) and {id: group}; copies share their original's group."""
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(5000)})
    n_copies = int(n * dup_fraction)
    originals = []
    for g in range(n - n_copies):
        turns = rng.randint(*TURNS)
        originals.append([{"role": "user" if t % 2 == 0 else "assistant", "content": _words(rng, vocab)}
                          for t in range(turns)])
    groups = list(range(len(originals)))
    convs = list(originals)
    for c in range(n_copies):
        g = rng.randrange(len(originals))
        kind = EDIT_KINDS[c % len(EDIT_KINDS)]
        msgs = [{**m, "content": edit(m["content"], kind, rng)} for m in originals[g]]
        convs.append(msgs)
        groups.append(g)
    order = list(range(n))
    rng.shuffle(order)
    records, group_of = [], {}
    for k in order:
        rid = f"gen-{k:08d}"
        records.append({"id": rid, "messages": convs[k], "source": {"origin": "bench"}})
        group_of[rid] = groups[k]
    return records, group_of


def score(report: list[dict[str, Any]], group_of: dict[str, int], n_copies: int) -> tuple[float, int]:
    """(recall over injected copies, number of drops whose kept record is in another group)."""
    correct = sum(group_of[r["id"]] == group_of[r["duplicate_of"]] for r in report)
    return (correct / n_copies if n_copies else 1.0), len(report) - correct


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space, so unlike ru_maxrss it does not inherit the
    parent's peak across fork+exec (the parent holds the whole corpus)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage_child(data: Path) -> None:
    """Runs in the subprocess: the real stage on `data/in.jsonl`; prints its stats plus memory and CPU."""
    from tasks.dedupe import DedupeParams, dedupe

    after_import = _peak_rss_mb()
    stats = dedupe([data / "in.jsonl"], data / "train.jsonl", data / "val.jsonl", data / "report.jsonl",
                   data / "stats.json", DedupeParams())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.update(peak_rss_mb=_peak_rss_mb(), import_rss_mb=after_import, cpu_seconds=usage.ru_utime + usage.ru_stime)
    print(json.dumps(stats))


def _run_stage(data: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--stage-dir", str(data)], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, action="append", help="corpus size (repeatable); default 10000")
    ap.add_argument("--dup-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage_dir:
        _stage_child(args.stage_dir)
        return
    print(" ".join(f"{h:>{w}}" for h, w in COLUMNS))
    for n in args.n or [10000]:
        records, group_of = make_corpus(n, args.dup_fraction, args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            stats = _run_stage(d)
            report = [json.loads(line) for line in (d / "report.jsonl").read_text().splitlines()]
        recall, false_drops = score(report, group_of, int(n * args.dup_fraction))
        row = [n, f"{stats['seconds']:.2f}", f"{stats['cpu_seconds']:.1f}", f"{stats['peak_rss_mb']:.0f}",
               f"{stats['import_rss_mb']:.0f}", f"{recall:.3f}", false_drops, stats["dropped_total"]]
        print(" ".join(f"{v:>{w}}" for v, (_, w) in zip(row, COLUMNS)))


if __name__ == "__main__":
    main()
