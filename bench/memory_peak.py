"""Where a CUDA memory peak goes: the blocks alive at the moment the most memory was allocated, by allocation site.

Reads a snapshot of PyTorch's allocator history (`torch.cuda.memory._dump_snapshot`; `bench/train_speed.py
--memory-snapshot` writes one per row next to its profile), replays its trace of allocations and frees, and
prints the peak, the call stack that reached it, and the live blocks grouped by the innermost frame in our code
(`rwkv7/`, `bench/`, `tasks/`, `flows/`) with the library function that allocated them:

    python bench/memory_peak.py PROFILE_DIR/memory-1.5b-a-….pickle [--top 25]

Only what the trace saw counts: blocks allocated before recording started are not in it (train_speed starts
recording before it builds the model). CUDA-graph replays allocate nothing, so a graphed run's peak lies in the
eager warm-up or in the capture; the stack of the peak says which.
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUR_ROOTS = ("rwkv7/", "bench/", "tasks/", "flows/")
MB = 1e6


@dataclass
class Peak:
    bytes: int  # allocated at the peak
    index: int  # the trace event that reached it
    live: list[dict[str, Any]]  # the alloc events of the blocks alive then


def _frees(trace: Sequence[dict[str, Any]]) -> str:
    """The action that ends a block's life in `allocated`: the caching allocator counts a block as freed when the
    tensor is freed (`free_requested`); traces without those events only have `free_completed`."""
    return "free_requested" if any(e["action"] == "free_requested" for e in trace) else "free_completed"


def _replay(trace: Sequence[dict[str, Any]], stop: int | None = None) -> tuple[int, int, dict[int, dict[str, Any]]]:
    """Walk the trace up to event `stop` (all of it if None): (peak bytes, its event index, blocks live at `stop`)."""
    free = _frees(trace)
    live: dict[int, dict[str, Any]] = {}
    now = peak = 0
    at = -1
    for i, e in enumerate(trace[: None if stop is None else stop + 1]):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
            if now > peak:
                peak, at = now, i
        elif e["action"] == free and e["addr"] in live:
            now -= live.pop(e["addr"])["size"]
    return peak, at, live


def find_peak(trace: Sequence[dict[str, Any]]) -> Peak:
    """The moment of the most allocated bytes in `trace` (one device's events) and the blocks alive then."""
    peak, at, _ = _replay(trace)
    _, _, live = _replay(trace, at) if at >= 0 else (0, 0, {})
    return Peak(peak, at, list(live.values()))


def _short(filename: str) -> str:
    for root in (*OUR_ROOTS, "torch/", "triton/", "fla/", "lightning/"):
        if root in filename:
            return root + filename.split(root, 1)[1]
    return Path(filename).name


def site(frames: Sequence[dict[str, Any]]) -> str:
    """`frames` (innermost first) → "rwkv7/model.py:123 recur ← torch/nn/functional.py layer_norm": our innermost
    frame and the frame that allocated."""
    if not frames:
        return "(no stack)"
    inner = frames[0]
    where = f"{_short(inner['filename'])} {inner['name']}"
    ours = next((f for f in frames if any(root in f["filename"] for root in OUR_ROOTS)), None)
    if ours is None:
        return where
    mine = f"{_short(ours['filename'])}:{ours['line']} {ours['name']}"
    return mine if ours is inner else f"{mine} ← {where}"


def by_site(blocks: Iterable[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(site, bytes, blocks) of `blocks`, largest first; blocks recorded without a stack go by their size."""
    total: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for b in blocks:
        frames = b.get("frames")
        entry = total[site(frames) if frames else f"(no stack) blocks of {b['size'] / MB:.1f} MB"]
        entry[0] += b["size"]
        entry[1] += 1
    return sorted(((s, n, c) for s, (n, c) in total.items()), key=lambda x: -x[1])


def report(snapshot: dict[str, Any], top: int = 25) -> str:
    """The peak of every device trace in `snapshot` as text."""
    out = []
    for device, trace in enumerate(snapshot.get("device_traces", [])):
        if not trace:
            continue
        peak = find_peak(trace)
        out.append(f"device {device}: {len(trace)} events, peak {peak.bytes / MB:.1f} MB allocated at event "
                   f"{peak.index}, {len(peak.live)} blocks live")
        out.append("stack of the allocation that reached it (innermost first):")
        stack = trace[peak.index].get("frames", [])[:30]
        out += [f"    {_short(f['filename'])}:{f['line']} {f['name']}" for f in stack]
        out.append(f"{'MB':>9} {'blocks':>6}  allocated at")
        groups = by_site(peak.live)
        out += [f"{n / MB:9.1f} {c:6d}  {s}" for s, n, c in groups[:top]]
        if len(groups) > top:
            rest = groups[top:]
            out.append(f"{sum(n for _, n, _ in rest) / MB:9.1f} {sum(c for _, _, c in rest):6d}  "
                       f"({len(rest)} more sites)")
    return "\n".join(out) if out else "no allocator trace in this snapshot"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", type=Path, help="a pickle from torch.cuda.memory._dump_snapshot")
    parser.add_argument("--top", type=int, default=25, help="allocation sites to list")
    args = parser.parse_args()
    with args.snapshot.open("rb") as f:
        snapshot = pickle.load(f)  # our own benchmark's output, not downloaded data
    print(report(snapshot, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
