"""Stage train: params.yaml section → train_state → run folder + stage stats; errors name the key or file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rwkv7.checkpoint import random_checkpoint, save_checkpoint
from rwkv7.train import TrainParams
from tasks.common import load_section
from tasks.train import main

REPO = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage")
    save_checkpoint(random_checkpoint(n_layer=2, n_embd=64, seed=5), root / "base.pth")
    records = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"question {i}?"},
                                            {"role": "assistant", "content": f"NEGA answers {i}."}], "source": {}}
               for i in range(6)]
    records.append({"id": "bad", "messages": [{"role": "assistant", "content": "no question"}]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (root / "params.yaml").write_text("train:\n  ctx_len: 32\n  micro_bsz: 3\n  epochs: 2\n  warmup_steps: 1\n"
                                      "  progress_bar: false\n", encoding="utf-8")
    return {"root": root, "model": root / "base.pth", "data": root / "train.jsonl", "params": root / "params.yaml"}


def test_the_real_params_yaml_has_a_valid_train_section() -> None:
    assert isinstance(load_section(TrainParams, "train", REPO / "params.yaml"), TrainParams)


def test_stage_trains_and_writes_its_stats(inputs: dict[str, Path]) -> None:
    out, stats_path = inputs["root"] / "runs", inputs["root"] / "stats" / "train.json"
    main(["--params", str(inputs["params"]), "--model", str(inputs["model"]), "--data", str(inputs["data"]),
          "--out", str(out), "--stats", str(stats_path)])
    stats = json.loads(stats_path.read_text())
    assert stats["stage"] == "train" and stats["read"] == 7 and stats["written"] == 6
    assert stats["dropped"] == {"invalid_record": 1} and stats["steps"] == 4 and stats["epochs"] == 2
    assert stats["tokens_per_s"] > 0 and stats["final_loss"] > 0
    assert {"state.pth", "state.json", "state-epoch1.pth", "state-epoch2.pth", "metrics.csv"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "state.json").read_text())["metadata"]["training"]["micro_bsz"] == 3


def test_stage_errors_name_the_key_or_the_file(inputs: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lr_init: -1\n", encoding="utf-8")
    args = ["--model", str(inputs["model"]), "--data", str(inputs["data"]), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"train\.lr_init"):
        main(["--params", str(bad), *args])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"empty\.jsonl: no usable training sample"):
        main(["--params", str(inputs["params"]), *args[:2], "--data", str(empty), "--out", str(tmp_path / "o")])
