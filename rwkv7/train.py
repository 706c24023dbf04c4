"""`train_state`: one state-tuning run from files to files, shared by `statetune train` and `tasks/train.py`.

Boundary: paths and `TrainParams` in; files in `out_dir` and a metrics dict out. Data is read and checked
before the model is loaded, so an empty or unusable data set fails in a second.

Writes (every file atomically): `state.pth` + `state.json` (RWKV-Runner state + sidecar with training params,
data sha256 and metrics), `state-epoch{N}.pth` + `.json` after each epoch (1-based), `metrics.json`,
`metrics.csv` (one row per optimizer step: step, epoch, loss, lr, tokens, padded, seconds, tokens_per_s;
tokens are real input tokens, padded the padding slots next to them), `loss.png`, and
`checkpoints/last.ckpt` (resume with `resume=True`; a resumed run reaches the same state as an uninterrupted
one). A NaN/inf loss stops the run with `TrainingError` after
writing `state-last-good.pth`.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rwkv7.atomic import atomic_path, file_sha256, write_json, write_text
from rwkv7.data import (Batch, BucketBatchSampler, PackedBatchSampler, Sample, load_samples, pack_collate,
                        pack_rows_collate, pad_collate)
from rwkv7.model import RWKV7, load_model
from rwkv7.quant import QuantizationError, check_precision, quantize_model
from rwkv7.state import save_state
from rwkv7.template import render_text
from rwkv7.tokenizer import WorldTokenizer
from rwkv7.tuning import GradCpPolicy, NonFiniteLossError, OptimSettings, StateTuner

CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
CSV_FIELDS = ("step", "epoch", "loss", "lr", "tokens", "padded", "seconds", "tokens_per_s")
# Params that may change between an interrupted run and its resumption without changing the result.
RESUME_FREE_KEYS = frozenset({"ckpt_every_n_steps", "cpu_threads", "progress_bar", "tensorboard"})
GRAPH_WIDTH_STEP = 32
GRAPH_MAX_SHAPES = 16


class TrainingError(RuntimeError):
    """A run cannot start, resume or finish; the message says why and what was kept."""


class TrainParams(BaseModel):
    """Section `train` of params.yaml (also the CLI's options).

    Defaults follow RWKV-PEFT's state-tuning tutorial (ctx_len 512, micro_bsz 8, lr 1 → 0.01 cosine with
    10 warm-up steps, Adam betas 0.9/0.99, eps 1e-8, no weight decay, 1 epoch): state tuning needs a far
    higher learning rate than weight tuning. `max_steps` (optimizer steps) overrides `epochs` when set.
    """

    model_config = ConfigDict(extra="forbid")

    ctx_len: int = Field(512, ge=1, description="max input tokens per sample")
    micro_bsz: int = Field(8, ge=1, description="samples per micro-batch (rows of ctx_len with pack)")
    epochs: int = Field(1, ge=1, description="passes over the data")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    lr_init: float = Field(1.0, gt=0)
    lr_final: float = Field(0.01, ge=0)
    warmup_steps: int = Field(10, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 turns clipping off")
    accumulate_grad_batches: int = Field(1, ge=1)
    grad_cp: bool = Field(False, description="recompute each block in backward (saves memory)")
    grad_cp_keep: int = Field(0, ge=0, description="with grad_cp: the last N blocks keep their activations instead "
                              "(faster; each costs memory: ~0.38 GB at 1.5B with ctx_len 512 × micro_bsz 8)")
    grad_cp_policy: GradCpPolicy = Field(
        "full", description="with grad_cp, what the other blocks recompute: full (everything; least memory) or "
                            "selective (LN2, gates, WKV, ln_x and the FFN's key only; keeps the attention projections' "
                            "outputs: half the recomputed matrix products for ~4 more [micro_bsz, ctx_len, C] "
                            "tensors per block: +15 % tokens/s at 1.5B, ctx_len 512 × micro_bsz 8)")
    grad_cp_keep_ffn: int = Field(0, ge=0, description="with grad_cp_policy selective: N more blocks (before the "
                                  "last grad_cp_keep) keep their FFN's activations instead of recomputing its key "
                                  "product (~0.07 GB each at 1.5B with ctx_len 512 × micro_bsz 8; the most speed "
                                  "per GB of the three grad_cp settings)")
    embedding_on_host: bool = Field(True, description="CUDA: keep the token embedding table in host memory (only "
                                    "the looked-up rows go to the GPU; saves V×C×2 bytes, 0.27 GB at 1.5B)")
    compile: bool = Field(False, description="torch.compile the blocks' non-WKV work (CUDA: fused elementwise "
                                             "kernels, fewer launches; the first step pays the compilation)")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="capture each batch shape's forward+backward in a CUDA graph and replay it (batches "
                            "packed into fixed rows, or padded to widths in steps of 32 tokens); auto: on for "
                            "CUDA in bf16 without distill_prompt, off elsewhere; on: also int8/nf4 (an error on CPU)")
    wkv_kernel: Literal["auto", "fla", "chunk", "triton"] = Field(
        "auto", description="CUDA WKV-7 kernel for training: chunk (ours, chunked on tensor cores: the fastest "
                            "measured; restarts sequences mid-row, which pack needs), triton (ours, step by step) or "
                            "fla (flash-linear-attention's chunk kernel; the only one that runs varlen batches in one "
                            "launch). auto: fla for varlen batches (no CUDA graphs and no pack), else chunk. CPU "
                            "always runs the reference")
    pack: bool = Field(False, description="pack whole samples into micro_bsz rows of ctx_len tokens per "
                                          "micro-batch (the model restarts from the tuned state at each sample: "
                                          "almost no padding, one batch shape); off: micro_bsz samples per "
                                          "micro-batch")
    loss_on: Literal["assistant", "all"] = "assistant"
    overlong: Literal["truncate", "drop"] = "truncate"
    seed: int = 42
    bucket_window: int = Field(16, ge=1, description="batches per length-sorting window (without pack)")
    loss_chunk: int = Field(1024, ge=1, description="scored positions per head matmul")
    ckpt_every_n_steps: int = Field(50, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0 = torch's default")
    precision: Literal["bf16", "int8", "nf4"] = Field(
        "bf16", description="frozen Linear weights: bf16 (float32 on CPU), or int8 / nf4 via bitsandbytes (CUDA only)")
    devices: int = Field(1, ge=1, description="GPUs (processes on CPU) to train on; >1 runs Lightning DDP with a "
                                              "global batch of micro_bsz × devices and the state's gradient averaged")
    distill_prompt: str | None = Field(None, description="train the state to act like the model reading this system "
                                       "prompt, rendered as a `System:` turn like evaluate's prompt baseline (KL loss)")
    tensorboard: bool = False
    progress_bar: bool = True

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainParams:
        """Validate command-line options; a bad value raises ValueError naming the option."""
        try:
            return cls.model_validate(options)
        except ValidationError as e:
            problems = "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                                 for err in e.errors())
            raise ValueError(problems) from None

    @model_validator(mode="after")
    def _lr_order(self) -> TrainParams:
        if self.lr_final > self.lr_init:
            raise ValueError(f"lr_final ({self.lr_final}) must not exceed lr_init ({self.lr_init})")
        return self

    @model_validator(mode="after")
    def _keep_ffn_is_selective(self) -> TrainParams:
        if self.grad_cp_keep_ffn and not (self.grad_cp and self.grad_cp_policy == "selective"):
            raise ValueError("grad_cp_keep_ffn needs grad_cp on with grad_cp_policy selective (full recomputes whole "
                             "blocks; without grad_cp every block keeps its activations anyway)")
        return self


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file and renamed: an interrupted save leaves the old one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class EpochStates(Callback):
    """Writes `state-epoch{N}.pth` (+ sidecar) at the end of every epoch, N 1-based."""

    def __init__(self, out_dir: Path, model: RWKV7, meta: dict[str, Any]) -> None:
        self.out_dir, self.model, self.meta = out_dir, model, meta

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: StateTuner) -> None:
        pl_module.settle()  # a NaN in the epoch's last step stops here (on every rank), before a state is written
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch + 1
        save_state(self.out_dir / f"state-epoch{epoch}.pth", pl_module.state_wkv,
                   {**self.meta, "epoch": epoch, "step": trainer.global_step}, model=self.model)


class ResumeGuard(Callback):
    """Stores the run's params and data hash in checkpoints and refuses to resume a different run."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.run = run

    def state_dict(self) -> dict[str, Any]:
        return dict(self.run)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A checkpoint written before a setting existed ran with that setting's default.
        state_dict = {**TrainParams().model_dump(), **state_dict}
        diff = sorted(k for k in set(state_dict) | set(self.run)
                      if k not in RESUME_FREE_KEYS and state_dict.get(k) != self.run.get(k))
        if diff:
            shown = ", ".join(f"{k}: {state_dict.get(k)!r} → {self.run.get(k)!r}" for k in diff)
            raise TrainingError(f"cannot resume: the checkpoint belongs to a different run ({shown})")


def train_state(model_path: str | os.PathLike[str], data_path: str | os.PathLike[str],
                out_dir: str | os.PathLike[str], params: TrainParams, *, resume: bool = False,
                callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Tune the initial state of the model at `model_path` on `data_path`; returns the metrics dict.

    `resume` continues from `out_dir/checkpoints/last.ckpt` (TrainingError if there is none, or if it was
    made with other params or data). `callbacks` are extra Lightning callbacks.
    """
    out_dir, data_path = Path(out_dir), Path(data_path)
    encode = _tokenizer().encode
    samples, data_stats = load_samples(data_path, encode, params.ctx_len, params.loss_on, params.overlong)
    last_ckpt = out_dir / CHECKPOINT_DIR / LAST_CKPT
    if resume and not last_ckpt.is_file():
        raise TrainingError(f"cannot resume: {last_ckpt} does not exist (start without --resume)")
    L.seed_everything(params.seed, verbose=False)
    device = _device(params.device)
    layout = batch_layout(params, device)  # bad combinations fail before loading
    configure_cuda_allocator()
    model = _load(model_path, device, params.precision)
    top_id = max(max(s.ids) for s in samples)
    if top_id >= model.config.vocab_size:
        raise TrainingError(f"{data_path}: token id {top_id} is outside the vocabulary of {model_path} "
                            f"({model.config.vocab_size} tokens)")
    data_sha = file_sha256(data_path)
    sampler, collate = training_batches(params, [s.n_inputs for s in samples], layout)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate)
    steps_per_epoch = math.ceil(len(sampler) / params.accumulate_grad_batches)
    total_steps = params.max_steps or params.epochs * steps_per_epoch
    if params.warmup_steps >= total_steps:
        warnings.warn(f"warmup_steps={params.warmup_steps} ≥ {total_steps} planned steps: the learning rate never "
                      f"reaches lr_init={params.lr_init}", stacklevel=2)
    distill = (encode(render_text([{"role": "system", "content": params.distill_prompt}]))
               if params.distill_prompt else None)
    module = StateTuner(model, _optim(params, total_steps, layout), sampler, distill, params.embedding_on_host)
    meta = {"training": params.model_dump(), "data": {"file": data_path.name, "sha256": data_sha}}
    trainer = _trainer(params, device, out_dir, total_steps, steps_per_epoch,
                       [EpochStates(out_dir, model, meta), ResumeGuard({**params.model_dump(), "data_sha256": data_sha}),
                        ShardBatches(sampler), *callbacks])
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and params.cpu_threads:
        torch.set_num_threads(params.cpu_threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # The sampler skips the batches a resumed epoch already trained on (StateTuner.on_load_checkpoint).
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
            trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last_ckpt) if resume else None,
                        weights_only=True)
    except NonFiniteLossError as e:
        kept = out_dir / "state-last-good.pth"
        if trainer.is_global_zero:
            save_state(kept, e.last_good, {**meta, "stopped": str(e)}, model=model)
        raise TrainingError(f"{e} Last finite state written to {kept}.") from e
    finally:
        torch.set_num_threads(threads_before)
    trainer.save_checkpoint(last_ckpt, weights_only=False)  # False: keep optimizer and loop state
    metrics = _metrics(module.history, data_stats.as_dict(), total_steps, device, resume)
    if trainer.is_global_zero:  # under DDP every rank holds the same state; rank 0 writes the files
        save_state(out_dir / "state.pth", module.state_wkv, {**meta, "metrics": metrics}, model=model)
        write_json(out_dir / "metrics.json", metrics)
        write_text(out_dir / "metrics.csv", _csv(module.history))
        plot_loss(module.history, out_dir / "loss.png")
    return metrics


@functools.lru_cache(maxsize=1)
def _tokenizer() -> WorldTokenizer:
    return WorldTokenizer()


class ShardBatches(Callback):
    """Tells the batch sampler which rank this process is, once Lightning has set up the processes (DDP)."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size != self.sampler.num_replicas:
            raise TrainingError(f"the sampler was built for {self.sampler.num_replicas} processes, "
                                f"Lightning runs {trainer.world_size}")
        self.sampler.rank = trainer.global_rank


CUDA_ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator() -> None:
    """Expandable segments for PyTorch's CUDA allocator, unless PYTORCH_CUDA_ALLOC_CONF says otherwise.

    The cached blocks then grow in place instead of fragmenting, which keeps the whole-process peak close to
    what the tensors need. Takes effect only before the first CUDA allocation of the process.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


def _load(model_path: str | os.PathLike[str], device: torch.device, precision: str) -> RWKV7:
    """bf16: straight onto the device. int8/nf4: read on the CPU in bf16, quantized onto the GPU one weight at
    a time (the full-precision model never sits on the GPU)."""
    try:
        check_precision(precision, device)
    except QuantizationError as e:
        raise TrainingError(str(e)) from None
    if precision == "bf16":
        return load_model(model_path, device=device)
    model = load_model(model_path, device="cpu", dtype=torch.bfloat16)
    quantize_model(model, precision, device)
    return model


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def use_cuda_graphs(p: TrainParams, device: torch.device) -> bool:
    """Resolve `cuda_graphs` (see TrainParams); "on" where graphs cannot work is a TrainingError."""
    if p.cuda_graphs == "off":
        return False
    possible = device.type == "cuda" and not p.distill_prompt
    if p.cuda_graphs == "on" and not possible:
        raise TrainingError("cuda_graphs: on needs device cuda and no distill_prompt (the prompt-distillation loss "
                            "is not captured); use auto or off")
    return possible and (p.cuda_graphs == "on" or p.precision == "bf16")


def graph_width_multiple(ctx_len: int) -> int:
    """Widths of CUDA-graphed batches are multiples of this: 32 tokens (padding then costs ~11 % of the slots of
    50-300-token dialogues, 64 would cost 17 %), coarser for long contexts so that at most 16 shapes get
    captured."""
    return GRAPH_WIDTH_STEP * max(1, math.ceil(ctx_len / (GRAPH_WIDTH_STEP * GRAPH_MAX_SHAPES)))


@dataclass(frozen=True)
class BatchLayout:
    """How a run lays out its micro-batches, resolved from params and device (`batch_layout`)."""

    device: torch.device
    graphs: bool  # CUDA graphs (`use_cuda_graphs`)
    wkv: str  # rwkv7.wkv backend the blocks use: "reference" (CPU), "fla", "chunk" or "triton"
    pack: bool  # whole samples packed into fixed rows that restart at each sample


def batch_layout(p: TrainParams, device: torch.device) -> BatchLayout:
    """Resolve `cuda_graphs`, `wkv_kernel` and `pack` (see TrainParams) for `device`; combinations that cannot
    run are a TrainingError."""
    graphs = use_cuda_graphs(p, device)
    if device.type != "cuda":
        if p.wkv_kernel != "auto":
            raise TrainingError(f"wkv_kernel: {p.wkv_kernel} needs CUDA; on CPU the reference runs (use auto)")
        wkv = "reference"
    elif p.wkv_kernel == "auto":  # fla for varlen batches (cu_seqlens: ours would loop over the sequences)
        wkv = "chunk" if p.pack or graphs else "fla"
    else:
        wkv = p.wkv_kernel
    if p.pack and wkv == "fla":
        raise TrainingError("pack: true needs a WKV kernel that restarts sequences mid-row: wkv_kernel chunk, "
                            "triton or auto; fla runs without pack")
    return BatchLayout(device, graphs, wkv, p.pack)


def training_batches(p: TrainParams, lengths: Sequence[int], layout: BatchLayout
                     ) -> tuple[BucketBatchSampler, Callable[[Sequence[Sample]], Batch]]:
    """The batch sampler and collate function of a run: packed rows of ctx_len (`layout.pack`: one shape for
    every batch), else length-bucketed samples padded to a few fixed shapes for CUDA graphs, packed varlen
    rows on CUDA without graphs, padded on CPU."""
    if layout.pack:
        sampler = PackedBatchSampler(lengths, p.micro_bsz, p.ctx_len, p.seed, num_replicas=p.devices)
        return sampler, functools.partial(pack_rows_collate, width=p.ctx_len, rows=p.micro_bsz)
    sampler = BucketBatchSampler(lengths, p.micro_bsz, p.seed, p.bucket_window, num_replicas=p.devices)
    if layout.graphs:
        return sampler, functools.partial(pad_collate, multiple=graph_width_multiple(p.ctx_len), rows=p.micro_bsz)
    return sampler, pack_collate if layout.device.type == "cuda" else pad_collate


def _optim(p: TrainParams, total_steps: int, layout: BatchLayout) -> OptimSettings:
    return OptimSettings(lr_init=p.lr_init, lr_final=p.lr_final, total_steps=total_steps,
                         warmup_steps=p.warmup_steps, beta1=p.beta1, beta2=p.beta2, adam_eps=p.adam_eps,
                         weight_decay=p.weight_decay, loss_chunk=p.loss_chunk, grad_cp=p.grad_cp,
                         grad_cp_keep=p.grad_cp_keep, grad_cp_policy=p.grad_cp_policy,
                         grad_cp_keep_ffn=p.grad_cp_keep_ffn,
                         compile="inductor" if p.compile else None,
                         cuda_graphs=layout.graphs, wkv_backend=layout.wkv)


def _trainer(p: TrainParams, device: torch.device, out_dir: Path, total_steps: int, steps_per_epoch: int,
             callbacks: list[Callback]) -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=out_dir / CHECKPOINT_DIR, every_n_train_steps=p.ckpt_every_n_steps,
                           save_top_k=0, save_last=True)
    callbacks = [ckpt, *callbacks]
    if p.progress_bar:
        callbacks.append(RichProgressBar() if _has_rich_terminal() else TQDMProgressBar())
    return L.Trainer(accelerator=device.type, devices=p.devices, strategy="ddp" if p.devices > 1 else "auto",
                     use_distributed_sampler=False,  # BucketBatchSampler shards itself (ShardBatches)
                     # No autocast: the frozen model computes in its own dtype (bf16 on CUDA, like RWKV-PEFT's
                     # bf16; float32 on CPU) while the state, its gradient and AdamW stay float32. Autocast
                     # would run the norms and every elementwise op after them in float32 and add a cast per op.
                     precision="32-true",
                     max_steps=total_steps, max_epochs=math.ceil(total_steps / steps_per_epoch),
                     accumulate_grad_batches=p.accumulate_grad_batches,
                     gradient_clip_val=p.grad_clip or None, callbacks=callbacks, logger=_logger(p, out_dir),
                     enable_progress_bar=p.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
                     log_every_n_steps=1, default_root_dir=out_dir, plugins=[AtomicCheckpointIO()])


def _has_rich_terminal() -> bool:
    return sys.stderr.isatty()


def _logger(p: TrainParams, out_dir: Path) -> Any:
    """TensorBoard logger when asked for and installed (tensorboard is not a dependency); else none."""
    if not p.tensorboard:
        return False
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(out_dir, name="tensorboard")
    except ModuleNotFoundError as e:
        warnings.warn(f"tensorboard=true but TensorBoard is not installed ({e}); training without it", stacklevel=2)
        return False


def _metrics(history: list[dict[str, Any]], data: dict[str, Any], total_steps: int, device: torch.device,
             resumed: bool) -> dict[str, Any]:
    """Summary of a finished run; tokens/s counts real tokens and skips the first step (warm-up)."""
    timed = history[1:] or history
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    return {"final_loss": history[-1]["loss"] if history else None,
            "first_loss": history[0]["loss"] if history else None,
            "min_loss": min((r["loss"] for r in history), default=None),
            "steps": len(history), "planned_steps": total_steps,
            "epochs": history[-1]["epoch"] if history else 0,
            "real_tokens": sum(r["tokens"] for r in history),
            "padding_fraction": _padding_fraction(history),
            "tokens_per_s": tokens / seconds if seconds else None,
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in timed) if timed else None,
            "train_seconds": sum(r["seconds"] for r in history),
            "device": device.type, "resumed": resumed, "data": data}


def _padding_fraction(history: list[dict[str, Any]]) -> float | None:
    """Share of batch slots that were padding (0 for packed GPU batches)."""
    slots = sum(r["tokens"] + r["padded"] for r in history)
    return sum(r["padded"] for r in history) / slots if slots else None


def _csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def plot_loss(history: list[dict[str, Any]], dest: str | os.PathLike[str]) -> None:
    """Loss per optimizer step as a PNG (matplotlib, Agg backend; works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (masked tokens)")
    ax.set_title("state tuning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)

