"""State-tuning speed and memory of our real trainer on random-init RWKV-7 models with the released shapes.

Run on the GPU machine from the repo root (after `source bench/gpu-env.sh`; `bench/gpu_run.sh` does it all):

    python bench/train_speed.py --models 1.5b --workloads a,b,c --precisions bf16,int8,nf4 \
        --json bench/results/h200.json --log-dir $OUT/train_speed

Each row (model × workload × precision × variant) runs in a fresh process, so peak memory and time to first
step are those a user sees. A row builds the model on the GPU from `random_checkpoint` (no files), moves the
weights to host memory and loads them the way `train_state` does (bf16 straight onto the GPU; int8/nf4
quantized onto it one weight at a time), then trains through the same pieces as `train_state`: `StateTuner`,
the sampler and collate of `rwkv7.train.training_batches` (CUDA graphs: padded to fixed shapes or packed rows; else
varlen) and the trainer built by `rwkv7.train._trainer` (grad clip 1, AdamW, cosine lr).

Workloads (synthetic token streams; the model is random, so only speed, memory and the precisions' relative
losses mean anything):
  a  ctx_len 512,  micro_bsz 8, every sample longer than ctx_len (RWKV-PEFT's tutorial), loss on all tokens
  b  ctx_len 1024, micro_bsz 1, every sample longer than ctx_len (RWKV-PEFT's memory table), loss on all tokens
  c  short dialogues of 50-300 tokens, loss on the reply half, micro_bsz 24 (about as many tokens per step as a);
     packed (`--pack on`): micro_bsz 8 rows of 512 tokens, each filled with the whole dialogues that fill it best

Measured per row: real (non-padding) tokens/s as the median over the steps after `--warmup` (wall clock
between optimizer steps, as the trainer reads each step's loss back, one step late), peak memory as
`torch.cuda.max_memory_allocated` (the JSON also has `max_memory_reserved`: the allocator's segments, CUDA graph
pools included) and as the whole process's use read by NVML every 10 ms (CUDA context included), both from the
moment the weights start loading; time to first step from the process start (imports, model load,
Triton/compile caches, first forward/backward/optimizer step); and the loss of the last step (`final_loss`) and the
mean of the last five (`loss_last5`). Prints one table last and appends rows to `--json`.
Variants: `--grad-cp on,off` (`--grad-cp-keep N`: the last N blocks keep their activations; `--grad-cp-policy
selective`: only the cheap stages are recomputed, table `cp` 1s), `--compile on,off`
(TrainParams.compile: torch.compile of whole blocks and the head's loss),
`--graphs on,off` (TrainParams.cuda_graphs: padded fixed-shape batches through a replayed CUDA graph per shape,
or packed varlen rows launched kernel by kernel), `--fla-chunk 64,16`; `--emb-host off` keeps the embedding
table on the GPU; `--wkv chunk,fla,triton` picks the WKV kernel (TrainParams.wkv_kernel; default auto);
`--pack on,off` (TrainParams.pack: samples packed into fixed rows that restart at each sample; default off).
`--devices 2` runs the row through Lightning DDP (tokens/s then counts all ranks).
On CPU (`--device cpu`, tiny `--models tiny`) the same code runs through the reference WKV: a smoke test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import pickle
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

T_START = time.time()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9
# name: (n_layer, n_embd, low-rank dims) per ../shared/docs/rwkv7-facts.md §1; "tiny" is for CPU smoke tests.
MODELS: dict[str, tuple[int, int, dict[str, int]]] = {
    "tiny": (2, 128, {"w": 32, "a": 32, "v": 32, "g": 32}),
    "0.1b": (12, 768, {"w": 64, "a": 64, "v": 32, "g": 128}),
    "0.4b": (24, 1024, {"w": 64, "a": 64, "v": 32, "g": 128}),
    "1.5b": (24, 2048, {"w": 96, "a": 96, "v": 64, "g": 256}),
    "2.9b": (32, 2560, {"w": 96, "a": 96, "v": 64, "g": 320}),
}
VOCAB = 65536
TINY_VOCAB = 1024
SYNTH_ALPHABET = 2000  # synthetic texts draw Zipf-distributed tokens from this many ids
REPLY_FRACTION = 0.5   # workload c: the loss covers the second half of each dialogue (the "reply")
NVML_PERIOD_S = 0.01
MEMORY_HISTORY_EVENTS = 400_000  # allocator events kept by --memory-snapshot (a 1.5B graphed row makes ~100 k)
PYPROFILE_STEPS = 3
LOSS_TAIL = 5
# Launch settings of our chunked kernels, recorded per row: rwkv7.wkv_chunk.SETTINGS_ENV, named here because
# importing that module pulls in triton, and this script imports nothing of rwkv7 until a row runs.
WKV_LAUNCH_ENV = "STATETUNE_WKV_CHUNK"


@dataclass(frozen=True)
class Workload:
    name: str
    ctx_len: int
    micro_bsz: int
    micro_bsz_packed: int  # rows of ctx_len per micro-batch when samples are packed (TrainParams.pack)
    min_len: int | None  # None: every sample is longer than ctx_len (truncated to it)
    max_len: int | None
    loss_on_all: bool


WORKLOADS = {
    "a": Workload("a", 512, 8, 8, None, None, True),
    "b": Workload("b", 1024, 1, 1, None, None, True),
    "c": Workload("c", 512, 24, 8, 50, 300, False),
    # CPU smoke tests of this script (the reference WKV is a Python loop over time)
    "ta": Workload("ta", 24, 4, 4, None, None, True),
    "tc": Workload("tc", 32, 6, 2, 6, 24, False),
}


@dataclass(frozen=True)
class Spec:
    """One row to measure."""

    model: str
    workload: str
    precision: str
    grad_cp: bool
    compile: bool
    fla_chunk: str
    devices: int
    steps: int
    warmup: int
    loss_chunk: int
    device: str
    lr: float
    seed: int = 0
    nvml_period: float = NVML_PERIOD_S  # 0: no NVML sampling (then no whole-process peak)
    pyprofile: bool = False  # cProfile of PYPROFILE_STEPS steps after warm-up (where the CPU time goes)
    graphs: bool = False  # TrainParams.cuda_graphs on (padded fixed-shape batches, replayed graphs) or off (packed)
    emb_host: bool = True  # TrainParams.embedding_on_host
    wkv: str = ""  # TrainParams.wkv_kernel (chunk, fla, triton); "" = auto
    pack: bool = False  # TrainParams.pack
    cp_keep: int = 0  # TrainParams.grad_cp_keep
    cp_policy: str = "full"  # TrainParams.grad_cp_policy
    cp_keep_ffn: int = 0  # TrainParams.grad_cp_keep_ffn
    memory_snapshot: bool = False  # record the CUDA allocator's history; its peak by allocation site (memory_peak.py)


def synthetic_samples(w: Workload, n: int, seed: int, vocab: int) -> list[Any]:
    """`n` samples of workload `w`: Zipf-distributed ids from a fixed random alphabet (learnable by a state)."""
    from rwkv7.data import Sample

    rng = random.Random(seed)
    alphabet = random.Random(1).sample(range(1, vocab), min(SYNTH_ALPHABET, vocab - 1))
    weights = [1.0 / (i + 1) for i in range(len(alphabet))]
    samples = []
    for i in range(n):
        length = w.ctx_len + 1 + rng.randrange(1, w.ctx_len) if w.min_len is None else \
            rng.randint(w.min_len, w.max_len or w.min_len)
        ids = rng.choices(alphabet, weights, k=length)
        if w.min_len is None:
            ids = ids[:w.ctx_len + 1]  # what load_samples does to an overlong sample (overlong="truncate")
        if w.loss_on_all:
            mask = [True] * len(ids)
        else:
            reply = int(len(ids) * REPLY_FRACTION)
            mask = [False] * (len(ids) - reply) + [True] * reply
        samples.append(Sample(ids, mask, f"synthetic-{w.name}-{i}"))
    return samples


class ProcessMemory:
    """Peak GPU memory of this process, read through NVML every 10 ms on a background thread.

    `peak` is this process's own use (NVML's per-process list: CUDA context, allocator cache, libraries); when
    NVML lists no processes here, it falls back to the whole device's used memory, and `source` says which.
    """

    def __init__(self, local_index: int, period: float = NVML_PERIOD_S) -> None:
        self.period = period
        self.peak_process = 0
        self.peak_device = 0
        self.peak_process_later = 0  # since `mark` (the steps after the first, which captures the CUDA graphs)
        self._stop = threading.Event()
        self._marked = False
        visible = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
        physical = int(visible[local_index]) if local_index < len(visible) and visible[local_index].isdigit() \
            else local_index  # NVML numbers GPUs physically, ignoring CUDA_VISIBLE_DEVICES
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(physical)
            self.error = ""
        except Exception as e:  # noqa: BLE001 - report the reason instead of failing the row
            self._nvml = None
            self.error = f"{type(e).__name__}: {e}"
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        nv = self._nvml
        if nv is None:
            return
        try:
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    self.peak_process = max(self.peak_process, int(proc.usedGpuMemory))
                    if self._marked:
                        self.peak_process_later = max(self.peak_process_later, int(proc.usedGpuMemory))
        except nv.NVMLError:
            pass
        self.peak_device = max(self.peak_device, int(nv.nvmlDeviceGetMemoryInfo(self._handle).used))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.period)

    def start(self) -> None:
        self._thread.start()

    def mark(self) -> None:
        """Start `peak_process_later` here."""
        self._marked = True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak(self) -> int:
        return self.peak_process or self.peak_device

    @property
    def source(self) -> str:
        if self._nvml is None:
            return f"unavailable ({self.error})"
        return "nvml process" if self.peak_process else "nvml device used (whole GPU)"


def build_weights(spec: Spec) -> tuple[dict[str, Any], Any]:
    """Random checkpoint drawn on the compute device (bf16), handed back in host memory, and its config."""
    import torch

    from rwkv7.checkpoint import inspect_checkpoint, random_checkpoint

    n_layer, n_embd, dims = MODELS[spec.model]
    vocab = TINY_VOCAB if spec.model == "tiny" else VOCAB
    dtype = torch.bfloat16 if spec.device == "cuda" else torch.float32
    sd = random_checkpoint(n_layer, n_embd, vocab, seed=spec.seed, dims=dims, dtype=dtype,
                           device="cuda" if spec.device == "cuda" else "cpu")
    sd = {k: v.cpu() for k, v in sd.items()}
    if spec.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return sd, inspect_checkpoint(sd)


def load_like_train_state(sd: dict[str, Any], cfg: Any, spec: Spec, codec: Any = None) -> Any:
    """The model as `train_state._load` makes it: bf16 onto the device, or quantized weight by weight."""
    import torch

    from rwkv7.model import build_model
    from rwkv7.quant import quantize_model

    device = torch.device(spec.device)
    if spec.precision == "bf16":
        return build_model(sd, cfg, device=device)
    model = build_model(sd, cfg, device="cpu", dtype=torch.bfloat16 if spec.device == "cuda" else torch.float32)
    quantize_model(model, spec.precision, device, codec=codec)
    return model


def run_row(spec: Spec, t0: float, profile_dir: Path | None = None) -> dict[str, Any]:
    """Measure one row in this process; returns the JSON row."""
    os.environ["STATETUNE_FLA_CHUNK"] = spec.fla_chunk
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from rwkv7.quant import reference_codec
    from rwkv7.train import (ShardBatches, TrainParams, _optim, _trainer, batch_layout, configure_cuda_allocator,
                             training_batches)
    from rwkv7.tuning import StateTuner

    cuda = spec.device == "cuda"
    configure_cuda_allocator()  # as train_state does, before the first CUDA allocation
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    L.seed_everything(spec.seed, verbose=False)
    w = WORKLOADS[spec.workload]
    sd, cfg = build_weights(spec)
    memory = ProcessMemory(local_rank, spec.nvml_period) if cuda and spec.nvml_period > 0 else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if spec.memory_snapshot:
            # Python stacks broke checkpointing's recompute under torch 2.11 (SystemError from Function.apply in
            # backward, call AJ): rows with grad_cp record sizes only
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_EVENTS, stacks="python",
                                                     context=None if spec.grad_cp else "all")
    if memory:
        memory.start()
    t_load = time.time()
    codec = reference_codec(spec.precision) if not cuda and spec.precision != "bf16" else None
    model = load_like_train_state(sd, cfg, spec, codec)
    del sd
    load_s = time.time() - t_load
    device = torch.device(spec.device)
    params = TrainParams(ctx_len=w.ctx_len, micro_bsz=w.micro_bsz, max_steps=spec.steps, lr_init=spec.lr,
                         lr_final=spec.lr / 100, grad_cp=spec.grad_cp, grad_cp_keep=spec.cp_keep,
                         grad_cp_keep_ffn=spec.cp_keep_ffn,
                         grad_cp_policy=spec.cp_policy, loss_chunk=spec.loss_chunk,
                         loss_on="all" if w.loss_on_all else "assistant", ckpt_every_n_steps=10 ** 9,
                         progress_bar=False, device=spec.device, precision=spec.precision, devices=spec.devices,
                         compile=spec.compile, cuda_graphs="on" if spec.graphs else "off",
                         embedding_on_host=spec.emb_host, wkv_kernel=spec.wkv or "auto", pack=spec.pack,
                         bucket_window=16)
    layout = batch_layout(params, device)
    if layout.pack:
        params = params.model_copy(update={"micro_bsz": w.micro_bsz_packed})
    # Enough samples for every step on every rank (packed rows hold several short samples each).
    per_batch = params.micro_bsz * (w.ctx_len // (w.min_len or w.ctx_len)) if layout.pack else params.micro_bsz
    samples = synthetic_samples(w, per_batch * spec.steps * spec.devices, seed=spec.seed + 1, vocab=cfg.vocab_size)
    sampler, collate = training_batches(params, [s.n_inputs for s in samples], layout)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate)
    module = StateTuner(model, _optim(params, spec.steps, layout), sampler, embedding_on_host=params.embedding_on_host)
    clock: dict[str, float] = {}
    first_peaks: dict[str, int] = {}

    class FirstStep(Callback):
        """Time to the first step; the peaks up to it (CUDA-graph warm-up and capture), then fresh peaks after."""

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if "first_step_s" not in clock:
                if cuda:
                    torch.cuda.synchronize()
                    first_peaks.update(alloc=torch.cuda.max_memory_allocated(),
                                       reserved=torch.cuda.max_memory_reserved())
                    torch.cuda.reset_peak_memory_stats()
                if memory:
                    memory.mark()
                clock["first_step_s"] = time.time() - t0

    callbacks = [ShardBatches(sampler), FirstStep()]
    if profile_dir is not None and cuda and local_rank == 0:
        callbacks.append(ProfileOneStep(spec.warmup, profile_dir / f"profile-{row_name(spec)}.txt"))
    if spec.pyprofile and profile_dir is not None and local_rank == 0:
        callbacks.append(PyProfileSteps(spec.warmup + 1, profile_dir / f"pyprofile-{row_name(spec)}.txt"))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(params, torch.device(spec.device), Path(tmp), spec.steps, len(sampler), callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, train_dataloaders=loader)
    if memory:
        memory.stop()
    snapshot_report = None
    if cuda and spec.memory_snapshot:
        snapshot_report = dump_memory_snapshot(profile_dir or Path(tempfile.gettempdir()), row_name(spec))
    history = module.history
    timed = history[spec.warmup:] or history
    per_rank = statistics.median(r["tokens_per_s"] for r in timed)
    losses = [r["loss"] for r in history]
    return {
        "model": spec.model, "workload": spec.workload, "precision": spec.precision,
        "grad_cp": spec.grad_cp, "grad_cp_keep": spec.cp_keep, "grad_cp_policy": spec.cp_policy,
        "grad_cp_keep_ffn": spec.cp_keep_ffn,
        "compile": spec.compile, "graphs": spec.graphs, "emb_host": spec.emb_host,
        "wkv": layout.wkv, "pack": layout.pack, "micro_bsz": params.micro_bsz,
        "nvml_period": spec.nvml_period,
        "fla_chunk": spec.fla_chunk, "devices": spec.devices, "wkv_launch": os.environ.get(WKV_LAUNCH_ENV, ""),
        "tokens_per_s": per_rank * spec.devices,
        "tokens_per_s_mean": sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed) * spec.devices,
        "step_ms": statistics.median(r["seconds"] for r in timed) * 1e3,
        "tokens_per_step": statistics.median(r["tokens"] for r in timed) * spec.devices,
        "peak_alloc_gb": max(torch.cuda.max_memory_allocated(), first_peaks.get("alloc", 0)) / GB if cuda else None,
        "peak_reserved_gb": (max(torch.cuda.max_memory_reserved(), first_peaks.get("reserved", 0)) / GB
                             if cuda else None),
        # after the first step: the replayed steps alone (a graphed run allocates nothing more once captured)
        "peak_alloc_later_gb": torch.cuda.max_memory_allocated() / GB if cuda and first_peaks else None,
        "peak_reserved_later_gb": torch.cuda.max_memory_reserved() / GB if cuda and first_peaks else None,
        "peak_process_gb": memory.peak / GB if memory else None,
        "peak_process_later_gb": memory.peak_process_later / GB if memory and memory.peak_process_later else None,
        "memory_snapshot": snapshot_report,
        "peak_device_used_gb": memory.peak_device / GB if memory else None,
        "process_memory_source": memory.source if memory else None,
        "first_step_s": clock.get("first_step_s"), "load_s": load_s,
        "final_loss": losses[-1], "loss_last5": sum(losses[-LOSS_TAIL:]) / len(losses[-LOSS_TAIL:]),
        "first_loss": losses[0], "steps": len(history), "warmup": spec.warmup,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}" if cuda else "cpu"),
        "versions": _versions(), "rank": int(os.environ.get("RANK", local_rank)),
    }


def dump_memory_snapshot(dest: Path, name: str) -> str:
    """Write the allocator history recorded since the row began to `dest/memory-<name>.pickle`, its peak by
    allocation site to `memory-<name>.txt` (bench/memory_peak.py), and stop recording; returns the text's path."""
    import torch
    from memory_peak import report  # bench/ is this script's directory, first on sys.path

    from rwkv7.atomic import atomic_path, write_text

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    with atomic_path(dest / f"memory-{name}.pickle") as tmp, open(tmp, "wb") as f:
        pickle.dump(snapshot, f)
    text_path = dest / f"memory-{name}.txt"
    write_text(text_path, report(snapshot) + "\n")
    return str(text_path)


def row_name(spec: Spec) -> str:
    launch = re.sub(r"[^a-z0-9_]+", "-", os.environ.get(WKV_LAUNCH_ENV, ""))  # our chunked kernels' launch settings
    launch = f"-{launch}" if launch else ""
    keep = (("s" if spec.cp_policy == "selective" else "") + (f"k{spec.cp_keep}" if spec.cp_keep else "")
            + (f"f{spec.cp_keep_ffn}" if spec.cp_keep_ffn else ""))
    return (f"{spec.model}-{spec.workload}-{spec.precision}-cp{int(spec.grad_cp)}{keep}-c{int(spec.compile)}-"
            f"g{int(spec.graphs)}-e{int(spec.emb_host)}-{spec.wkv or 'wkvauto'}-p{int(spec.pack)}-k{spec.fla_chunk}-"
            f"d{spec.devices}-nv{spec.nvml_period:g}{launch}")


def _profiler_callback_class() -> type:
    from lightning.pytorch.callbacks import Callback

    class _ProfileOneStep(Callback):
        """torch.profiler over one whole training batch (forward, backward, optimizer); writes the top kernels."""

        def __init__(self, batch_idx: int, dest: Path) -> None:
            self.batch_idx, self.dest, self.prof = batch_idx, dest, None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            import torch

            if batch_idx == self.batch_idx:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            import torch

            if batch_idx != self.batch_idx or self.prof is None:
                return
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            text = []
            for key in ("device_time_total", "cuda_time_total"):
                try:
                    text.append(events.table(sort_by=key, row_limit=40, max_name_column_width=90))
                    break
                except Exception:  # noqa: BLE001 - the sort key's name changed across torch versions
                    continue
            gemm = {e.key: e.count for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                                                               "aten::matmul")}
            grads = sum(1 for p in pl_module.model.parameters() if p.grad is not None)
            text.append(f"GEMM op calls in one step: {gemm}; frozen parameters holding a .grad: {grads}")
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self.dest.write_text("\n".join(text) + "\n")
            self.prof = None

    return _ProfileOneStep


def PyProfileSteps(first: int, dest: Path) -> Any:  # noqa: N802 - builds the Lightning callback lazily
    """cProfile over PYPROFILE_STEPS whole training batches from `first`: Python-side cost by function."""
    import cProfile
    import io
    import pstats

    from lightning.pytorch.callbacks import Callback

    class _PyProfile(Callback):
        def __init__(self) -> None:
            self.prof = cProfile.Profile()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if first <= batch_idx < first + PYPROFILE_STEPS:
                self.prof.enable()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if first <= batch_idx < first + PYPROFILE_STEPS:
                self.prof.disable()
            if batch_idx == first + PYPROFILE_STEPS - 1:
                text = io.StringIO()
                for key in ("tottime", "cumulative"):
                    pstats.Stats(self.prof, stream=text).sort_stats(key).print_stats(35)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(f"cProfile of {PYPROFILE_STEPS} steps from batch {first}\n{text.getvalue()}")

    return _PyProfile()


def ProfileOneStep(batch_idx: int, dest: Path) -> Any:  # noqa: N802 - builds the Lightning callback lazily
    return _profiler_callback_class()(batch_idx, dest)


def _versions() -> dict[str, str]:
    import lightning
    import torch

    out = {"torch": torch.__version__, "lightning": lightning.__version__}
    for name in ("triton", "fla", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional on CPU
            pass
    return out


def specs_from_args(args: argparse.Namespace) -> list[Spec]:
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    grad_cps = [x == "on" for x in split(args.grad_cp)]
    compiles = [x == "on" for x in split(args.compile)]
    graphs = [x == "on" for x in split(args.graphs or ("on" if args.device == "cuda" else "off"))]
    return [Spec(m, w, p, g, c, f, args.devices, args.steps, args.warmup,
                 args.loss_chunk_b if w == "b" else args.loss_chunk, args.device, args.lr,
                 nvml_period=args.nvml_period, pyprofile=args.pyprofile, graphs=cg, emb_host=args.emb_host == "on",
                 wkv=wkv, pack=pack == "on", cp_keep=args.grad_cp_keep, cp_policy=args.grad_cp_policy,
                 cp_keep_ffn=args.grad_cp_keep_ffn, memory_snapshot=args.memory_snapshot)
            for m, w, p, g, c, cg, f, wkv, pack in itertools.product(
                split(args.models), split(args.workloads), split(args.precisions), grad_cps, compiles, graphs,
                split(args.fla_chunk), split(args.wkv) or [""], split(args.pack))]


def run_isolated(spec: Spec, log_dir: Path | None, timeout: float, profile_dir: Path | None = None
                 ) -> dict[str, Any]:
    """Run one row in a child process; returns its row, or an error row."""
    name = row_name(spec)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(spec)), "--t0", repr(time.time())]
    if profile_dir is not None:
        cmd += ["--profile-dir", str(profile_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), "timeout"
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}\nrc={rc}\n")
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    rows = [r for r in rows if r.get("rank", 0) == 0]
    if rc == 0 and rows:
        return rows[-1]
    tail = (err or out).strip().splitlines()[-3:]
    return {**asdict(spec), "error": f"rc={rc}: {' | '.join(tail)}"}


def table(rows: list[dict[str, Any]]) -> str:
    """One line per row; `wkv` is the WKV kernel: fla with its chunk size (fla64, fla16), our triton, or the
    reference (CPU); `pk` 1 where samples were packed into rows (TrainParams.pack)."""
    head = (f"| {'model':5} | wl | {'prec':4} | cp | cmp | gr | {'wkv':6} | pk | dev | {'tokens/s':>9} | {'step ms':>8} | "
            f"{'alloc GB':>8} | {'proc GB':>7} | {'1st step s':>10} | {'final loss':>10} | {'last5':>7} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        wkv = r.get("wkv") or "default"
        wkv = f"fla{r['fla_chunk']}" if wkv in ("default", "fla") else {"reference": "ref"}.get(wkv, wkv)
        cp = (f"{int(r['grad_cp'])}" + ("s" if r.get("grad_cp_policy") == "selective" else "")  # 1s: selective
              + (f"-{r['grad_cp_keep']}" if r.get("grad_cp_keep") else "")  # 1-4: 4 kept
              + (f"f{r['grad_cp_keep_ffn']}" if r.get("grad_cp_keep_ffn") else ""))  # 1sf12: 12 keep their FFN
        start = (f"| {r['model']:5} | {r['workload']:2} | {r['precision']:4} | {cp:2} | "
                 f"{int(r['compile'])}   | {int(r.get('graphs', 0))}  | {wkv:6} | "
                 f"{ {True: '1', 'on': '1', False: '0', 'off': '0'}.get(r.get('pack', False), '?')}  | "
                 f"{r['devices']:3} | ")
        if "error" in r:
            lines.append(f"{start}ERROR {r['error'][:150]}")
            continue

        def num(key: str, fmt: str) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "-"

        lines.append(f"{start}{num('tokens_per_s', '9.0f')} | {num('step_ms', '8.1f')} | "
                     f"{num('peak_alloc_gb', '8.2f')} | {num('peak_process_gb', '7.2f')} | "
                     f"{num('first_step_s', '10.1f')} | {num('final_loss', '10.4f')} | {num('loss_last5', '7.4f')} |")
    return "\n".join(lines)


def append_json(path: Path, row: dict[str, Any]) -> None:
    """Add `row` to the JSON list in `path` (created if missing), written atomically."""
    from rwkv7.atomic import write_json

    write_json(path, [*(json.loads(path.read_text()) if path.is_file() else []), row])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.5b", help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--workloads", default="a,b,c", help="comma list of a, b, c")
    parser.add_argument("--precisions", default="bf16", help="comma list of bf16, int8, nf4")
    parser.add_argument("--grad-cp", default="on", help="comma list of on, off (activation checkpointing)")
    parser.add_argument("--grad-cp-keep", type=int, default=0,
                        help="TrainParams.grad_cp_keep: the last N blocks keep their activations")
    parser.add_argument("--grad-cp-policy", default="full", choices=("full", "selective"),
                        help="TrainParams.grad_cp_policy: what grad_cp recomputes (whole blocks, or the cheap stages)")
    parser.add_argument("--grad-cp-keep-ffn", type=int, default=0,
                        help="TrainParams.grad_cp_keep_ffn: with selective, N more blocks keep their FFN activations")
    parser.add_argument("--compile", default="off", help="comma list of on, off (torch.compile each block's halves)")
    parser.add_argument("--graphs", help="comma list of on, off (CUDA graphs; default: on for cuda, off for cpu)")
    parser.add_argument("--wkv", default="", help="comma list of WKV kernels (fla, chunk, triton); default: auto "
                                                   "(TrainParams.wkv_kernel; the reference on CPU)")
    parser.add_argument("--pack", default="off", help="comma list of on, off (TrainParams.pack)")
    parser.add_argument("--emb-host", default="on", choices=("on", "off"),
                        help="TrainParams.embedding_on_host (off: the embedding table on the GPU)")
    parser.add_argument("--fla-chunk", default="64", help="comma list of 64 (with the decay bound), 16 (fla default)")
    parser.add_argument("--devices", type=int, default=1, help="GPUs per row (>1: Lightning DDP)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="scored positions per head matmul")
    parser.add_argument("--loss-chunk-b", type=int, default=256, help="loss chunk for workload b (memory rows)")
    parser.add_argument("--lr", type=float, default=1.0, help="peak learning rate (cosine to lr/100)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--nvml-period", type=float, default=NVML_PERIOD_S,
                        help="seconds between NVML memory reads (0: none, and no whole-process peak)")
    parser.add_argument("--pyprofile", action="store_true",
                        help=f"cProfile {PYPROFILE_STEPS} steps after warm-up into --profile-dir (Python-side cost)")
    parser.add_argument("--memory-snapshot", action="store_true",
                        help="record the CUDA allocator's history; write it and its peak by allocation site "
                             "(bench/memory_peak.py) into --profile-dir")
    parser.add_argument("--json", type=Path, help="append the rows to this JSON list file")
    parser.add_argument("--log-dir", type=Path, help="one log file per row")
    parser.add_argument("--timeout", type=float, default=400, help="seconds per row")
    parser.add_argument("--in-process", action="store_true", help="run rows in this process (debugging)")
    parser.add_argument("--profile-dir", type=Path, help="profile one step after warm-up; top kernels per row here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, default=T_START, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = run_row(Spec(**json.loads(args.child)), args.t0, args.profile_dir)
        print("ROW " + json.dumps(row), flush=True)
        return 0
    rows = []
    for spec in specs_from_args(args):
        row = run_row(spec, time.time(), args.profile_dir) if args.in_process else \
            run_isolated(spec, args.log_dir, args.timeout, args.profile_dir)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row, so a command cut by its time limit keeps what it measured
            append_json(args.json, row)
    print(f"command: python bench/train_speed.py {' '.join(sys.argv[1:])}")
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
