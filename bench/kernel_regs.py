"""Registers and spills of our chunked WKV-7 kernels on a GPU we do not have: compiled here, read by ptxas.

Runs on the CPU machine (no GPU needed): Triton compiles `rwkv7.wkv_chunk._fwd` / `_bwd` for the target
architecture (default sm_90a, the H200), and the ptxas that ships with Triton reports registers per thread, spill
stores/loads and shared memory for each variant (rows with and without restarts, warps per program, stages
of Triton's loop pipelining):

    .venv/bin/python bench/kernel_regs.py [--arch 90] [--warps 4,8] [--stages 3] [--dtype bf16] [--prec tf32|bf16]
        [--T 512] [--H 32]

A kernel at 255 registers that spills keeps part of its tiles in local memory. Fewer spills did not make the
kernels faster inside a graphed training step on the H200 (BENCHMARKS.md, sixth session): read this table as a
hint, and let a profiled step decide. Where Triton also ships nvdisasm, the table adds the machine code of the
chunk loop (the kernel's longest loop): its instructions, local-memory loads/stores (spill traffic per chunk) and
tensor-core instructions, counted once each, whichever branches a chunk takes inside it.
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv7 import wkv_chunk  # noqa: E402

FLOAT32_POINTERS = {"w_ptr", "dw_ptr", "s0_ptr", "ckpt_ptr", "final_ptr", "dfinal_ptr", "ds0_ptr"}
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
NVDISASM = PTXAS.with_name("nvdisasm")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def signature(kernel: triton.JITFunction, dtype: str) -> dict[str, str]:
    """Triton types of the kernel's arguments: pointers by name (log decay, states: fp32; starts: i8; the rest:
    `dtype`), every other argument a constexpr."""
    types = {}
    for name in kernel.arg_names:
        if not name.endswith("_ptr"):
            types[name] = "constexpr"
        elif name == "starts_ptr":
            types[name] = "*i8"
        elif name == "chunks_ptr":
            types[name] = "*i64"
        else:
            types[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
    return types


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """registers, spill_stores, spill_loads (bytes) of the one kernel in `ptx`, from `ptxas -v`."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([str(PTXAS), f"-arch=sm_{arch}a", "-v", str(source), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True, check=True)
    text = done.stdout + done.stderr
    found = {key: re.search(pattern, text) for key, pattern in (("registers", r"Used (\d+) registers"),
                                                                ("spill_stores", r"(\d+) bytes spill stores"),
                                                                ("spill_loads", r"(\d+) bytes spill loads"))}
    missing = [key for key, m in found.items() if m is None]
    if missing:
        raise RuntimeError(f"ptxas -v printed no {', '.join(missing)}:\n{text}")
    return {key: int(m.group(1)) for key, m in found.items() if m is not None}


def loop_report(sass: str) -> dict[str, int]:
    """Static counts in the longest loop of disassembled machine code (`nvdisasm` output): the lines from a label
    to the last branch back to it. `loop_instructions`, `loop_local_loads` / `loop_local_stores` (LDL / STL:
    spills and their reloads), `loop_mma` (HMMA / WGMMA), `loop_async_copies` (LDGSTS: loads of later chunks that
    Triton's pipelining issues ahead; a loop it could not pipeline has none)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\S* `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    if not loops:
        raise RuntimeError("no loop in this machine code")
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    body = [line for line in lines[start:end + 1] if re.search(r"/\*[0-9a-f]{4,}\*/", line)]  # instructions only
    def count(pattern: str) -> int:
        return sum(bool(re.search(pattern, line)) for line in body)

    return {"loop_instructions": len(body), "loop_local_loads": count(r"\bLDL\b"),
            "loop_local_stores": count(r"\bSTL\b"), "loop_mma": count(r"\b(?:HMMA|HGMMA|WGMMA)\b"),
            "loop_async_copies": count(r"\bLDGSTS\b")}


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(NVDISASM), str(path)], capture_output=True, text=True, check=True).stdout


def compile_variant(kernel: triton.JITFunction, restarts: bool | str, warps: int, dtype: str, T: int, H: int,
                    arch: int, stages: int = 3, prec: str = "bf16") -> Any:
    """One variant of `kernel` compiled for `arch` as Triton's launcher would compile it for torch tensors:
    `restarts` False (none), True (inside chunks) or "aligned" (only at chunk starts: seq_chunks)."""
    L = wkv_chunk.SETTINGS["chunk"]
    aligned = restarts == "aligned"
    constants = {"T": T, "H": H, "N": 64, "L": L, "LOG2L": L.bit_length() - 1, "RESETS": restarts is True,
                 "SAVE": True, "PREC": "ieee" if dtype == "fp32" else prec, "ALIGNED": aligned,
                 "NCMAX": wkv_chunk.seq_chunks_room(T, L) if aligned else T // L}
    types = signature(kernel, dtype)
    if wkv_chunk.states_dtype(TORCH_DTYPES[dtype], wkv_chunk.SETTINGS["bf16_states"]) == torch.bfloat16:
        types["ckpt_ptr"] = "*bf16"  # the chunk-start states as the kernel keeps them
    # Pointers 16-byte aligned, as the launcher marks every torch allocation: without it loads and stores would
    # not be vectorized and the counts would describe a kernel that never runs.
    aligned_ptrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                    if types.get(name, "").startswith("*")}
    source = ASTSource(fn=kernel, signature=types, constexprs={k: v for k, v in constants.items() if k in types},
                       attrs=aligned_ptrs)
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def measure(kernel: triton.JITFunction, restarts: bool | str, warps: int, dtype: str, T: int, H: int,
            arch: int, stages: int = 3, prec: str = "bf16") -> dict[str, int]:
    """Compile one variant (`compile_variant`) and report its registers, spills and shared memory (bytes), and
    with nvdisasm the chunk loop's counts (`loop_report`)."""
    compiled = compile_variant(kernel, restarts, warps, dtype, T, H, arch, stages, prec)
    report = {**ptxas_report(compiled.asm["ptx"], arch), "shared": compiled.metadata.shared}
    if NVDISASM.is_file():
        report |= loop_report(disassemble(compiled.asm["cubin"]))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    parser.add_argument("--warps", default="4,8", help="comma list of warps per program")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="dtype of r, k, v, a, b")
    parser.add_argument("--T", type=int, default=512, help="sequence length (a multiple of 64)")
    parser.add_argument("--H", type=int, default=32, help="heads")
    parser.add_argument("--kernels", default="fwd,bwd", help="comma list of fwd, bwd")
    parser.add_argument("--stages", default="3", help="comma list of num_stages (Triton's pipelining; 1: none)")
    parser.add_argument("--prec", default="bf16", choices=("tf32", "bf16"),
                        help="the products' precision for bf16 inputs (rwkv7.wkv_chunk._dot; tf32: bf16_dots=0)")
    args = parser.parse_args(argv)
    loop = NVDISASM.is_file()
    print("| kernel | restarts | warps | stages | registers | spill stores | spill loads | shared memory |"
          + (" chunk loop: instructions | LDL | STL | MMA | LDGSTS |" if loop else "")
          + "\n|---|---|---|---|---|---|---|---|" + ("---|---|---|---|---|" if loop else ""), flush=True)
    for name in args.kernels.split(","):
        kernel = {"fwd": wkv_chunk._fwd, "bwd": wkv_chunk._bwd}[name]
        for restarts in (False, True, "aligned"):
            for warps, stages in itertools.product(map(int, args.warps.split(",")), map(int, args.stages.split(","))):
                r = measure(kernel, restarts, warps, args.dtype, args.T, args.H, args.arch, stages, args.prec)
                cells = [name, {False: "no", True: "yes"}.get(restarts, restarts), warps, stages, r["registers"],
                         f"{r['spill_stores']} B", f"{r['spill_loads']} B", f"{r['shared'] // 1024} KB"]
                if loop:
                    cells += [r["loop_instructions"], r["loop_local_loads"], r["loop_local_stores"], r["loop_mma"],
                              r["loop_async_copies"]]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
