"""Stage train: tune the initial RWKV-7 state on the training split (`rwkv7.train.train_state`).

    python -m tasks.train --params params.yaml --model models/base.pth --data data/dataset/train.jsonl \\
        --out runs/train --stats data/stats/train.json

Reads section `train` of params.yaml (`rwkv7.train.TrainParams`, every key optional). Writes into `--out`
`state.pth` + `state.json`, `state-epoch{N}.pth` + `.json`, `metrics.json`, `metrics.csv`, `loss.png` and
`checkpoints/last.ckpt`, plus the stage stats JSON (`--stats`, default `<out>/stats.json`): samples read,
used, truncated, dropped by reason, steps, loss and real tokens/s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rwkv7.checkpoint import CheckpointError
from rwkv7.data import DatasetError
from rwkv7.state import StateFileError
from rwkv7.train import TrainingError, TrainParams, train_state
from tasks.common import DataError, StageStats, load_section, stage_errors, stage_parser

log = logging.getLogger("tasks.train")


def run(model_path: Path, data_path: Path, out_dir: Path, params: TrainParams, stats_path: Path | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Train, then write and return the stage stats (counts from the data, summary from the run)."""
    stats = StageStats("train")
    try:
        metrics = train_state(model_path, data_path, out_dir, params, resume=resume)
    except DatasetError as e:
        raise DataError(str(e)) from None
    data = metrics["data"]
    stats.read, stats.written = data["read"], data["used"]
    for reason, n in data["dropped"].items():
        stats.drop(reason, n)
    stats.extra.update({"truncated": data["truncated"], "tokens": data["tokens"],
                        "trainable_tokens": data["trainable_tokens"],
                        **{k: metrics[k] for k in ("steps", "epochs", "first_loss", "final_loss", "tokens_per_s",
                                                   "train_seconds", "device")}})
    return stats.save(stats_path or out_dir / "stats.json")


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("train", __doc__)
    ap.add_argument("--model", type=Path, required=True, help="base model .pth (BlinkDL RWKV-7)")
    ap.add_argument("--data", type=Path, required=True, help="training jsonl (dialogue records or {\"text\"} lines)")
    ap.add_argument("--out", type=Path, required=True, help="run folder to write")
    ap.add_argument("--stats", type=Path, default=None, help="stats JSON (default: <out>/stats.json)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.ckpt")
    args = ap.parse_args(argv)
    with stage_errors("train", TrainingError, StateFileError, CheckpointError, OSError):
        params = load_section(TrainParams, "train", args.params)
        stats = run(args.model, args.data, args.out, params, args.stats, args.resume)
    log.info("train: loss %.4f → %.4f in %d steps, %.0f real tokens/s; state in %s", stats["first_loss"],
             stats["final_loss"], stats["steps"], stats["tokens_per_s"] or 0.0, args.out / "state.pth")


if __name__ == "__main__":
    main()
