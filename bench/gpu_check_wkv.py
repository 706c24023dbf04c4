"""Check a fast path of WKV-7 (fla, or our Triton kernels) against our float32 reference on a CUDA GPU.

Run on the GPU machine from the repo root (after `source bench/gpu-env.sh`):

    python bench/gpu_check_wkv.py [--backend fla|chunk|triton] [--bench] [--log $OUT/gpu_check_wkv.log]

Compares, for fp32 and bf16 inputs: outputs, final state, d(initial state) and every input gradient of
`rwkv7.wkv.wkv7(..., backend=BACKEND)` (fla: chunk kernel) against `backend="reference"` run in float32 on the very
same (dtype-rounded) inputs, so the errors are the kernel's alone. Cases: equal lengths with T not a multiple
of the chunk size, variable-length packing (cu_seqlens), the decode kernel (fused recurrent, no grad), and a
tiny random RWKV7 model end to end (logits and the gradient of a trainable [L, H, N, N] state).
Our kernels (chunk, triton) also get rows with restarts mid-row (`starts`).
Errors: max |fast − ref| and that divided by max |ref|. Prints a table last; exits 1 if any check fails.
With --bench also times fwd+bwd of the fast kernel first (bf16, B=8, T=512, H=32; median of 20), for ours once
per `--configs` launch setting.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv7.checkpoint import random_checkpoint, inspect_checkpoint  # noqa: E402
from rwkv7.model import build_model  # noqa: E402
from rwkv7.state import RWKVState  # noqa: E402
from rwkv7.wkv import force_backend, wkv7  # noqa: E402

N = 64
DEVICE = "cuda"
FAST = "fla"  # --cpu-dry-run sets DEVICE = "cpu", FAST = "reference" to exercise this script without a GPU
# Relative-error limits (max abs error / max abs reference). fla's dh0 measured 6e-4 (fp32), 2.4e-3 (bf16).
REL_LIMIT = {torch.float32: 5e-3, torch.bfloat16: 5e-2}
SETTINGS_ENV = {"triton": "STATETUNE_WKV_TRITON", "chunk": "STATETUNE_WKV_CHUNK"}  # launch settings of ours
INPUT_NAMES = ("r", "log_decay", "k", "v", "a", "b", "initial_state")


@dataclass
class Row:
    case: str
    dtype: str
    tensor: str
    max_abs: float
    rel: float
    limit: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.rel) and self.rel <= self.limit


def make_inputs(B: int, T: int, H: int, dtype: torch.dtype, seed: int, n_seq: int | None = None
                ) -> list[torch.Tensor]:
    """Inputs shaped like the model's: unit-norm κ, a = −κ, b = κ·iclr, log decay in (−e^−½, 0)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=DEVICE)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    log_decay = -math.exp(-0.5) * torch.sigmoid(randn(B, T, H, N) * 2 - 3)
    kappa = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(randn(B, T, H, N))
    state = randn(n_seq or B, H, N, N) * 0.3
    inputs = [x.to(dtype) for x in (r, log_decay, k, v, -kappa, kappa * iclr)]
    return [*inputs, state]


def compare(case: str, dtype: torch.dtype, names: tuple[str, ...], fast: list[torch.Tensor],
            ref: list[torch.Tensor]) -> list[Row]:
    rows = []
    for name, f, r in zip(names, fast, ref, strict=True):
        err = (f.float() - r.float()).abs().max().item()
        scale = r.float().abs().max().item()
        rows.append(Row(case, str(dtype).removeprefix("torch."), name, err, err / max(scale, 1e-30),
                        REL_LIMIT[dtype]))
    return rows


def run_both(fn: Callable[[str, list[torch.Tensor]], list[torch.Tensor]], inputs: list[torch.Tensor],
             grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fn(backend, leaf inputs) -> outputs; returns (fast results, reference results) incl. input grads."""
    results = []
    for backend in (FAST, "reference"):
        leaves = [x.detach().clone().requires_grad_(grad) for x in inputs]
        if backend == "reference":  # same rounded values, computed in float32
            leaves = [x.detach().float().requires_grad_(grad) for x in leaves]
        outs = fn(backend, leaves)
        if grad:
            weights = [torch.randn(o.shape, generator=torch.Generator(device=DEVICE).manual_seed(i),
                                   device=DEVICE) for i, o in enumerate(outs)]
            sum(((o.float() * w).sum() for o, w in zip(outs, weights, strict=True))).backward()
            outs = [*outs, *(x.grad for x in leaves)]
        results.append([o.detach() for o in outs])
    return results[0], results[1]


GRAD_NAMES = ("out", "final_state", *(f"d{n}" for n in INPUT_NAMES))


def varlen_case(dtype: torch.dtype) -> list[Row]:
    """Packed sequences (cu_seqlens), with every gradient: the path training takes."""
    cu = torch.tensor([0, 100, 101, 350], device=DEVICE)

    def packed(backend: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(wkv7(*xs, cu_seqlens=cu, backend=backend))

    fast, ref = run_both(packed, make_inputs(1, 350, 4, dtype, seed=1, n_seq=3), grad=True)
    return compare("chunk varlen [100,1,249]", dtype, GRAD_NAMES, fast, ref)


def _plain(backend: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(wkv7(*xs, backend=backend))


def decode_case(dtype: torch.dtype) -> list[Row]:
    """The inference kernel (fused recurrent, no grad) for one token and a short prompt."""
    rows = []
    for T in (1, 16):
        with torch.no_grad():
            fast, ref = run_both(_plain, make_inputs(3, T, 4, dtype, seed=2 + T), grad=False)
        rows += compare(f"decode (fused_recurrent) T{T}", dtype, ("out", "final_state"), fast, ref)
    return rows


def batch_case(dtype: torch.dtype) -> list[Row]:
    """Equal lengths [B, T] with T not a multiple of the chunk size, with every gradient."""
    fast, ref = run_both(_plain, make_inputs(2, 300, 4, dtype, seed=0), grad=True)
    return compare("chunk B2 T300 H4", dtype, GRAD_NAMES, fast, ref)


def model_case(dtype: torch.dtype) -> list[Row]:
    """Tiny random RWKV7 on the GPU: logits and the trainable state's gradient, fla vs reference."""
    sd = random_checkpoint(n_layer=2, n_embd=256, vocab_size=1000, seed=0)
    model = build_model(sd, inspect_checkpoint(sd), device=DEVICE, dtype=dtype)
    tokens = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for backend in (FAST, "reference"):
        param = torch.nn.Parameter(torch.randn(2, 4, N, N, generator=torch.Generator().manual_seed(1)).to(DEVICE) * .3)
        with force_backend(backend):
            logits, _ = model(tokens, RWKVState.from_wkv(param))
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1)[:-1], tokens.flatten()[1:]).backward()
        results.append([logits.detach(), param.grad])
    return compare("model L2 C256 T200", dtype, ("logits", "d(state param)"), *results)


def restarts_case(dtype: torch.dtype) -> list[Row]:
    """Rows holding several sequences (`starts`, our kernels only): the fixed-shape packing CUDA graphs use."""
    starts = torch.zeros(2, 300, dtype=torch.bool, device=DEVICE)
    starts[0, [0, 7, 8, 100, 112, 250]] = True
    starts[1, [0, 16, 33, 299]] = True
    inputs = make_inputs(2, 300, 4, dtype, seed=4, n_seq=1)

    def rows(backend: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(wkv7(*xs, starts=starts, backend=backend))

    fast, ref = run_both(rows, inputs, grad=True)
    return compare("restarts B2 T300 (6+4 seqs)", dtype, GRAD_NAMES, fast, ref)


def time_fwd_bwd(inputs: list[torch.Tensor], starts: torch.Tensor | None = None, repeats: int = 20,
                 backward: bool = True) -> tuple[float, float]:
    """(median ms, first call s) of forward + backward (incl. d(initial state)) of the fast kernel, or of the
    forward alone (as training runs it: keeping what backward needs)."""
    times = []
    first = 0.0
    extra = {} if starts is None else {"starts": starts}
    for i in range(repeats + 5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out, final = wkv7(*inputs, backend=FAST, **extra)
        if backward:
            (out.float().sum() + final.sum()).backward()
        torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - start
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, first


def bench_chunk(configs: list[str]) -> list[str]:
    """Median fwd+bwd time of the fast kernel at RWKV-PEFT-like sizes (B8 T512 H32, bf16); for ours once per
    launch setting, and with restarts every ~175 tokens (workload c packed into rows)."""
    inputs = [x.requires_grad_() for x in make_inputs(8, 512, 32, torch.bfloat16, seed=9)]
    if FAST == "fla":
        ms, first = time_fwd_bwd(inputs)
        ms_fwd, _ = time_fwd_bwd(inputs, backward=False)
        return [(f"{FAST} fwd+bwd incl. dh0, bf16 B8 T512 H32: median {ms:.2f} ms per layer (fwd {ms_fwd:.2f}) "
                 f"(first call incl. compile {first:.1f} s)")]
    starts = torch.zeros(8, 512, dtype=torch.bool, device=DEVICE)
    starts[:, ::175] = True
    lines = []
    env = SETTINGS_ENV[FAST]
    for config in configs:
        os.environ[env] = config
        try:
            ms, first = time_fwd_bwd(inputs)
        except Exception as e:  # noqa: BLE001 - e.g. a setting over the shared-memory limit: report, go on
            lines.append(f"{FAST} [{config}] cannot run: {type(e).__name__}: {str(e)[:160]}")
            print(lines[-1], flush=True)
            for x in inputs:
                x.grad = None
            continue
        ms_fwd, _ = time_fwd_bwd(inputs, backward=False)
        ms_r, _ = time_fwd_bwd(inputs, starts)
        ms_r_fwd, _ = time_fwd_bwd(inputs, starts, backward=False)
        lines.append(f"{FAST} [{config or 'defaults'}] fwd+bwd incl. dh0, bf16 B8 T512 H32: median {ms:.2f} ms per "
                     f"layer (fwd {ms_fwd:.2f}), {ms_r:.2f} ms with restarts every 175 tokens (fwd {ms_r_fwd:.2f}) "
                     f"(first call incl. compile {first:.1f} s)")
        print(lines[-1], flush=True)
    os.environ.pop(env)
    return lines


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def report(lines: list[str], rows: list[Row], log: Path | None) -> list[Row]:
    """Print (and write to `log`) the notes and the error table so far; returns the rows over their limit."""
    table = [f"| {'case':30} | {'dtype':8} | {'tensor':16} | {'max abs err':>11} | {'rel err':>9} | ok |",
             f"|{'-' * 32}|{'-' * 10}|{'-' * 18}|{'-' * 13}|{'-' * 11}|----|"]
    table += [f"| {r.case:30} | {r.dtype:8} | {r.tensor:16} | {r.max_abs:11.3e} | {r.rel:9.2e} | "
              f"{'ok' if r.ok else 'NO'} |" for r in rows]
    failed = [r for r in rows if not r.ok]
    table.append(f"{len(rows) - len(failed)}/{len(rows)} checks within limits {REL_LIMIT[torch.float32]:.0e} "
                 f"(fp32) / {REL_LIMIT[torch.bfloat16]:.0e} (bf16) relative")
    text = "\n".join(lines + table)
    print(text, flush=True)
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text + "\n")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="fla", choices=("fla", "chunk", "triton"), help="the fast path to check")
    parser.add_argument("--bench", action="store_true", help="also time the fast kernel (first)")
    parser.add_argument("--log", type=Path, help="write the full table here as well")
    parser.add_argument("--configs", "--triton-configs", default="",
                        help="with --bench and our kernels: launch settings to time, ';'-separated (values of "
                             "STATETUNE_WKV_CHUNK, e.g. 'chunk=32,fwd_warps=4;chunk=16', or of STATETUNE_WKV_TRITON, "
                             "e.g. 'block_v=64,num_warps=4'); default: the kernel's own defaults")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, in order: bf16, fp32")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="reference vs reference on CPU: checks this script, not the kernel")
    args = parser.parse_args()
    global DEVICE, FAST
    FAST = args.backend
    if args.cpu_dry_run:
        DEVICE, FAST = "cpu", "reference"
        lines = [f"CPU DRY RUN (reference vs reference), torch {torch.__version__}"]
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu-dry-run)", file=sys.stderr)
        return 2
    else:
        import fla

        lines = [f"backend {FAST}: torch {torch.__version__}, fla {fla.__version__}, {torch.cuda.get_device_name()}"]
    rows: list[Row] = []
    if args.bench and not args.cpu_dry_run:
        lines += bench_chunk(args.configs.split(";"))
        report(lines, rows, args.log)
    # bf16 first and the training path (packed sequences) first: their autotune choices ship with the repo. The
    # table is rewritten after each case, so a run cut short by its time limit still leaves what it checked.
    failed: list[Row] = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        cases = (varlen_case, decode_case, model_case, batch_case) + ((restarts_case,) if FAST != "fla" else ())
        for case in cases:
            start = time.perf_counter()
            rows += case(dtype)
            lines.append(f"{name} {case.__name__}: {time.perf_counter() - start:.1f} s (incl. Triton autotune)")
            failed = report(lines, rows, args.log)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
