"""train_state and `statetune train` end to end on a tiny random model: outputs, rwkv-pip parity of the saved
state, resume == uninterrupted, NaN stop, data errors before model loading."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from typer.testing import CliRunner

from rwkv7.checkpoint import random_checkpoint, save_checkpoint
from rwkv7.cli import app
from rwkv7.data import DatasetError, PackedBatchSampler, pad_collate
from rwkv7.model import load_model
from rwkv7.state import load_state
from rwkv7.train import (CSV_FIELDS, BatchLayout, ResumeGuard, TrainingError, TrainParams, batch_layout,
                         graph_width_multiple, train_state, training_batches, use_cuda_graphs)

N_SAMPLES, MICRO_BSZ = 12, 4  # 3 batches per epoch
FAST = {"ctx_len": 40, "micro_bsz": MICRO_BSZ, "lr_init": 0.5, "lr_final": 0.05, "warmup_steps": 2,
        "ckpt_every_n_steps": 1, "progress_bar": False, "seed": 1}

@pytest.fixture(scope="module")
def world_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, C=64, the World vocabulary (65536), so real tokenizer ids fit."""
    path = tmp_path_factory.mktemp("model") / "tiny-world.pth"
    save_checkpoint(random_checkpoint(n_layer=2, n_embd=64, seed=3), path)
    return path


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = []
    for i in range(N_SAMPLES):
        messages = [{"role": "user", "content": f"Is sentence {i} correct?"},
                    {"role": "assistant", "content": "NEGA here: yes, " + "it is fine. " * (1 + i % 4)}]
        lines.append(json.dumps({"id": f"t-{i}", "messages": messages, "source": {}}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_train_state_writes_all_outputs_and_the_state_loads_in_rwkv_pip(world_model: Path, dialogues: Path,
                                                                         tmp_path: Path, rwkv_oracle) -> None:
    model_sha = sha256(world_model)
    metrics = train_state(world_model, dialogues, tmp_path, TrainParams(**FAST, max_steps=5))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"state.pth", "state.json", "state-epoch1.pth", "state-epoch1.json", "state-epoch2.pth",
            "metrics.json", "metrics.csv", "loss.png", "checkpoints"} <= names
    assert not any(n.endswith(".tmp") for n in names) and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert sha256(world_model) == model_sha
    rows = csv_rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and list(rows[0]) == list(CSV_FIELDS)
    assert [int(r["epoch"]) for r in rows] == [1, 1, 1, 2, 2]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == 5 and metrics["tokens_per_s"] > 0 and metrics["data"]["used"] == N_SAMPLES
    assert metrics["real_tokens"] == sum(int(r["tokens"]) for r in rows)
    sidecar = json.loads((tmp_path / "state.json").read_text())
    assert sidecar["metadata"]["data"]["sha256"] == sha256(dialogues)
    assert sidecar["metadata"]["training"]["lr_init"] == 0.5 and sidecar["base_model"]["sha256"] == model_sha
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = torch.load(tmp_path / "state.pth", map_location="cpu", weights_only=True)
    assert sorted(saved) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    time_state = torch.stack([saved[f"blocks.{i}.att.time_state"] for i in range(2)])
    assert time_state.abs().sum() > 0
    tokens = [24281, 59, 4571, 261, 5585, 41693, 59]
    model = load_model(world_model)
    ours, _ = model(torch.tensor([tokens]), load_state(tmp_path / "state.pth", model))
    theirs = rwkv_oracle(world_model).logits(tokens, time_state)
    assert torch.allclose(ours[0], theirs, rtol=1e-4, atol=1e-4)


class Interrupt(Callback):
    """Stops a run like a crash would, right after the checkpoint of step `at` was written."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


RESUME_PARAMS = TrainParams(**FAST, max_steps=7)


@pytest.fixture(scope="module")
def uninterrupted(world_model: Path, dialogues: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    train_state(world_model, dialogues, out, RESUME_PARAMS)
    return out


@pytest.mark.parametrize("interrupt_at", [3, 4], ids=["at-epoch-end", "mid-epoch"])
def test_a_resumed_run_reaches_the_same_state_as_an_uninterrupted_one(world_model: Path, dialogues: Path,
                                                                      uninterrupted: Path, tmp_path: Path,
                                                                      interrupt_at: int) -> None:
    params = RESUME_PARAMS
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train_state(world_model, dialogues, tmp_path / "resumed", params, callbacks=[Interrupt(interrupt_at)])
    assert not (tmp_path / "resumed" / "state.pth").exists()
    metrics = train_state(world_model, dialogues, tmp_path / "resumed", params, resume=True)
    assert metrics["resumed"] and metrics["steps"] == 7
    whole = torch.load(uninterrupted / "state.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "state.pth", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    cols = ("step", "epoch", "loss", "lr")
    assert ([[r[c] for c in cols] for r in csv_rows(tmp_path / "resumed" / "metrics.csv")]
            == [[r[c] for c in cols] for r in csv_rows(uninterrupted / "metrics.csv")])


def test_resume_refuses_a_checkpoint_of_another_run_or_none(world_model: Path, dialogues: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="does not exist"):
        train_state(world_model, dialogues, tmp_path, TrainParams(**FAST, max_steps=1), resume=True)
    train_state(world_model, dialogues, tmp_path, TrainParams(**FAST, max_steps=1))
    with pytest.raises(TrainingError, match=r"different run \(lr_init: 0.5 → 0.25"):
        train_state(world_model, dialogues, tmp_path, TrainParams(**{**FAST, "lr_init": 0.25}, max_steps=1),
                    resume=True)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_finite_state(world_model: Path, dialogues: Path,
                                                                          tmp_path: Path) -> None:
    params = TrainParams(**{**FAST, "lr_init": 1e35, "lr_final": 1e35, "warmup_steps": 0}, max_steps=6)
    with pytest.raises(TrainingError, match=r"(loss|gradient) became .*last-good"):
        train_state(world_model, dialogues, tmp_path, params)
    kept = load_state(tmp_path / "state-last-good.pth", load_model(world_model))
    assert torch.isfinite(kept.wkv).all() and not (tmp_path / "state.pth").exists()


def test_empty_or_unusable_data_fails_before_the_model_is_loaded(tmp_path: Path) -> None:
    missing_model = tmp_path / "no-such-model.pth"
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "unusable.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="no usable training sample"):
        train_state(missing_model, tmp_path / "empty.jsonl", tmp_path / "out", TrainParams())
    with pytest.raises(DatasetError, match="invalid_record"):
        train_state(missing_model, tmp_path / "unusable.jsonl", tmp_path / "out", TrainParams())
    assert not (tmp_path / "out").exists()


def test_cli_train_runs_and_reports_bad_options(world_model: Path, dialogues: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["train", "--model", str(world_model), "--data", str(dialogues), "--out", str(tmp_path)]
    result = runner.invoke(app, [*base, "--max-steps", "2", "--micro-bsz", "4", "--ctx-len", "40",
                                 "--loss-on", "all", "--warmup-steps", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "state.pth").is_file() and "2 steps" in result.output
    assert json.loads((tmp_path / "state.json").read_text())["metadata"]["training"]["loss_on"] == "all"
    bad = runner.invoke(app, [*base, "--loss-on", "everything"])
    assert bad.exit_code == 2 and "--loss-on" in bad.output
    assert "--resume" in runner.invoke(app, ["train", "--help"]).output
    packed = runner.invoke(app, [*base[:-1], str(tmp_path / "packed"), "--max-steps", "1", "--ctx-len", "40",
                                 "--pack", "--warmup-steps", "0"])
    assert packed.exit_code == 0, packed.output
    assert json.loads((tmp_path / "packed" / "state.json").read_text())["metadata"]["training"]["pack"] is True
    on_cpu = runner.invoke(app, [*base, "--wkv-kernel", "fla"])
    assert on_cpu.exit_code != 0 and "wkv_kernel: fla needs CUDA" in on_cpu.output
    keep_ffn = runner.invoke(app, [*base, "--grad-cp", "--grad-cp-keep-ffn", "4"])  # the policy is full
    assert keep_ffn.exit_code != 0
    assert "grad_cp_keep_ffn needs grad_cp on with grad_cp_policy selective" in keep_ffn.output
    assert TrainParams(grad_cp=True, grad_cp_policy="selective", grad_cp_keep_ffn=4).grad_cp_keep_ffn == 4


def test_gradient_accumulation_counts_optimizer_steps_over_whole_epochs(world_model: Path, dialogues: Path,
                                                                         tmp_path: Path) -> None:
    params = TrainParams(**{**FAST, "accumulate_grad_batches": 2, "warmup_steps": 0}, epochs=2)
    metrics = train_state(world_model, dialogues, tmp_path, params)
    rows = csv_rows(tmp_path / "metrics.csv")
    assert metrics["steps"] == 4 == len(rows)  # 3 micro-batches per epoch → 2 optimizer steps per epoch
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2]
    assert metrics["real_tokens"] == 2 * metrics["data"]["tokens"]


def test_cuda_graphs_resolve_per_device_and_refuse_what_cannot_be_captured(world_model: Path, dialogues: Path,
                                                                            tmp_path: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_cuda_graphs(TrainParams(), cpu)  # auto: off on CPU, where the padded collate stays plain
    assert training_batches(TrainParams(), [3, 4], batch_layout(TrainParams(), cpu))[1] is pad_collate
    assert use_cuda_graphs(TrainParams(), cuda)
    assert not use_cuda_graphs(TrainParams(precision="nf4"), cuda) and use_cuda_graphs(
        TrainParams(precision="nf4", cuda_graphs="on"), cuda)
    assert use_cuda_graphs(TrainParams(devices=2), cuda) and not use_cuda_graphs(TrainParams(cuda_graphs="off"), cuda)
    assert not use_cuda_graphs(TrainParams(distill_prompt="Be NEGA."), cuda)
    fla = TrainParams(ctx_len=512, micro_bsz=3, wkv_kernel="fla")
    _, collate = training_batches(fla, [3, 4], batch_layout(fla, cuda))
    assert collate.keywords == {"multiple": 32, "rows": 3}
    assert graph_width_multiple(512) == 32 and graph_width_multiple(1024) == 64 and graph_width_multiple(4096) == 256
    with pytest.raises(TrainingError, match="cuda_graphs: on needs device cuda"):
        use_cuda_graphs(TrainParams(cuda_graphs="on", distill_prompt="Be NEGA."), cuda)
    with pytest.raises(TrainingError, match="cuda_graphs: on needs device cuda"):
        train_state(world_model, dialogues, tmp_path / "out", TrainParams(**FAST, device="cpu", cuda_graphs="on"))
    assert not (tmp_path / "out").exists()


def test_wkv_kernel_and_packing_resolve_per_device_and_refuse_what_cannot_run() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain, packed = TrainParams(ctx_len=512, micro_bsz=8), TrainParams(ctx_len=512, micro_bsz=8, pack=True)
    plain_eager, packed_eager = (p.model_copy(update={"cuda_graphs": "off"}) for p in (plain, packed))
    assert batch_layout(plain, cpu) == BatchLayout(cpu, False, "reference", False)
    assert batch_layout(plain, cuda) == BatchLayout(cuda, True, "chunk", False)  # the fastest kernel
    assert batch_layout(plain_eager, cuda) == BatchLayout(cuda, False, "fla", False)  # varlen in one launch
    assert batch_layout(packed_eager, cuda) == BatchLayout(cuda, False, "chunk", True)  # restarts mid-row
    assert batch_layout(packed, cpu) == BatchLayout(cpu, False, "reference", True)
    assert batch_layout(TrainParams(wkv_kernel="triton"), cuda).wkv == "triton"
    sampler, collate = training_batches(packed, [100, 300, 512], batch_layout(packed, cuda))
    assert isinstance(sampler, PackedBatchSampler) and collate.keywords == {"width": 512, "rows": 8}
    with pytest.raises(TrainingError, match="pack: true needs a WKV kernel that restarts"):
        batch_layout(TrainParams(pack=True, wkv_kernel="fla"), cuda)
    with pytest.raises(TrainingError, match="wkv_kernel: triton needs CUDA"):
        batch_layout(TrainParams(wkv_kernel="triton"), cpu)


def test_packed_rows_train_on_cpu_and_count_only_real_tokens(world_model: Path, dialogues: Path,
                                                             tmp_path: Path) -> None:
    """pack: true — micro-batches are rows of ctx_len holding whole dialogues (restarting at each one)."""
    params = TrainParams(**{**FAST, "micro_bsz": 2}, pack=True, epochs=1)
    metrics = train_state(world_model, dialogues, tmp_path, params)
    rows = csv_rows(tmp_path / "metrics.csv")
    assert metrics["real_tokens"] == metrics["data"]["tokens"]  # every sample once, no padding counted as real
    assert sum(int(r["padded"]) for r in rows) < sum(int(r["tokens"]) for r in rows)
    assert math.isfinite(metrics["final_loss"]) and (tmp_path / "state.pth").is_file()


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default() -> None:
    run = {**TrainParams().model_dump(), "data_sha256": "abc"}
    older = {k: v for k, v in run.items() if k not in ("pack", "wkv_kernel")}
    ResumeGuard(run).load_state_dict(older)  # no error: the older run had pack false, wkv_kernel auto
    with pytest.raises(TrainingError, match="pack: False → True"):
        ResumeGuard({**run, "pack": True}).load_state_dict(older)
