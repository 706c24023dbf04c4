"""The speed/memory frontier of state tuning: real tokens/s against whole-process peak memory, one point per row.

Reads rows that `bench/train_speed.py` wrote (`--json`) and draws, for one model, each workload's rows as points
labelled by their recompute setting (none, full, selective, selective keeping FFNs or whole blocks), with the
issue's targets as lines (60 k tokens/s, 7.9 GB). Rows of the same setting from several calls are all drawn: their
spread is the call-to-call noise.

    python bench/plot_frontier.py bench/results/h200-2026-11-30-call-{aj,al,am,an}-train_speed.json \
        --model 1.5b [--workloads a,c] -o bench/results/h200-2026-11-30-frontier-1.5b.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv7.report import save_figure  # noqa: E402

TARGET_TOKENS_PER_S = 60_000  # issue 4: 1.5B, workload (a), bf16
TARGET_PROCESS_GB = 7.9
MARKERS = {"a": "o", "c": "s", "b": "^"}


def setting(row: dict[str, Any]) -> str:
    """A row's recompute setting in words: "none", "full", "selective", "selective, FFN kept ×15", …"""
    if not row.get("grad_cp"):
        return "none"
    name = row.get("grad_cp_policy") or "full"
    if row.get("grad_cp_keep_ffn"):
        name += f", FFN kept ×{row['grad_cp_keep_ffn']}"
    if row.get("grad_cp_keep"):
        name += f", blocks kept ×{row['grad_cp_keep']}"
    return name


def points(rows: Iterable[dict[str, Any]], model: str, workloads: Sequence[str] = ("a", "c")
           ) -> list[tuple[str, str, float, float]]:
    """(workload, setting, process GB, tokens/s) of the measured rows of `model` in bf16 for `workloads` (errors
    and rows without a whole-process peak left out)."""
    return [(r["workload"], setting(r), r["peak_process_gb"], r["tokens_per_s"]) for r in rows
            if r.get("model") == model and r.get("workload") in workloads and r.get("precision") == "bf16"
            and "error" not in r and r.get("peak_process_gb") and r.get("tokens_per_s")]


def plot(pts: Sequence[tuple[str, str, float, float]], dest: Path, title: str) -> Path:
    """Scatter of `pts`, one colour per setting, one marker per workload; written atomically as PNG."""
    fig = Figure(figsize=(8.0, 5.0))
    ax = fig.add_subplot()
    settings = sorted({s for _, s, _, _ in pts}, key=lambda s: min(gb for _, t, gb, _ in pts if t == s))
    colours = {s: f"C{i % 10}" for i, s in enumerate(settings)}
    for workload in sorted({w for w, _, _, _ in pts}):
        for name in settings:
            mine = [(gb, tps) for w, s, gb, tps in pts if w == workload and s == name]
            if mine:
                ax.scatter([gb for gb, _ in mine], [tps / 1e3 for _, tps in mine], color=colours[name],
                           marker=MARKERS.get(workload, "x"), label=f"({workload}) {name}", alpha=0.8)
    ax.axhline(TARGET_TOKENS_PER_S / 1e3, color="grey", linestyle="--", linewidth=1)
    ax.axvline(TARGET_PROCESS_GB, color="grey", linestyle=":", linewidth=1)
    ax.annotate("target: 60 k tokens/s within 7.9 GB", (TARGET_PROCESS_GB, TARGET_TOKENS_PER_S / 1e3),
                textcoords="offset points", xytext=(4, 4), fontsize="small", color="grey")
    ax.set_xlabel("whole-process peak GPU memory (GB)")
    ax.set_ylabel("real tokens/s (thousands)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return save_figure(fig, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="train_speed.py --json files")
    parser.add_argument("--model", default="1.5b", help="the model whose rows to draw")
    parser.add_argument("--workloads", default="a,c", help="comma list of the workloads to draw")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="", help="default: the model and the files' count")
    args = parser.parse_args(argv)
    rows = [row for path in args.json for row in json.loads(path.read_text())]
    pts = points(rows, args.model, args.workloads.split(","))
    if not pts:
        parser.error(f"no measured bf16 rows of model {args.model!r} in {len(args.json)} file(s)")
    title = args.title or f"State tuning {args.model}, bf16: speed against memory ({len(pts)} rows)"
    print(plot(pts, args.out, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
