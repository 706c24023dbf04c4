"""`statetune` command line: one function per command on one typer app (console script `rwkv7.cli:app`).

    statetune chat --model rwkv7-g1a-0.1b.pth [--state runs/train/state.pth]
    statetune generate --model M [--state S] --prompt "Who are you?" [--raw]

Bad files (missing, truncated, not RWKV-7, a state for another model) end with exit code 2 and a message
naming the file. `train` and `eval` are thin commands over `rwkv7.train.train_state` and
`rwkv7.evaluate.run_evaluation`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import typer

from rwkv7.checkpoint import CheckpointError
from rwkv7.generate import ChatSession, SamplingParams, complete
from rwkv7.model import RWKV7, load_model
from rwkv7.state import RWKVState, StateFileError, load_state
from rwkv7.template import render_text
from rwkv7.tokenizer import WorldTokenizer

# Paragraphs are single strings: rich re-wraps help text to the terminal, so hard line breaks would show.
APP_HELP = "\n\n".join([
    "statetune: tune and use RWKV-7 states.",
    "A state is the initial WKV state of every layer of a frozen RWKV-7 model: trained on a character's "
    "dialogues, it acts like a system prompt you never have to send. Typical use:",
    "statetune train --model rwkv7-g1a-0.1b.pth --data train.jsonl --out runs/x",
    "statetune eval --model rwkv7-g1a-0.1b.pth --val val.jsonl --runs runs/x --out reports",
    "statetune chat --model rwkv7-g1a-0.1b.pth --state reports/best-state.pth",
    "State files are RWKV-Runner's format (one blocks.{i}.att.time_state per layer) with a JSON sidecar naming "
    "the base model. The whole pipeline (download, transcribe, clean, augment, dedupe, train, evaluate) runs with "
    "`make demo`, `dvc repro` or from the Prefect UI (`make ui`); see README.md.",
])
app = typer.Typer(help=APP_HELP, no_args_is_help=True, add_completion=False)

EXIT_BAD_INPUT = 2
CHAT_QUIT = ("/quit", "/exit")
CHAT_RESET = "/reset"

MODEL_OPTION = typer.Option(..., "--model", "-m", help="BlinkDL RWKV-7 checkpoint (.pth)")
STATE_OPTION = typer.Option(None, "--state", "-s", help="tuned state file (.pth, RWKV-Runner format)")
DEVICE_OPTION = typer.Option("auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
TEMPERATURE_OPTION = typer.Option(1.0, min=0.0, help="0 = greedy")
TOP_P_OPTION = typer.Option(0.3, min=0.0, max=1.0)
MAX_TOKENS_OPTION = typer.Option(256, min=1, help="stop after this many generated tokens")
SEED_OPTION = typer.Option(None, help="sampling seed (reproducible output)")
THREADS_OPTION = typer.Option(None, min=1, help="CPU intra-op threads (default: torch's); 1 is often fastest "
                                                "for small models on a busy machine")


def _fail(message: str) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(EXIT_BAD_INPUT)


def _load(model_path: Path, state_path: Path | None, device: str,
          threads: int | None = None) -> tuple[RWKV7, RWKVState | None]:
    """Model + optional state, or exit 2 with the loader's message (which names the file)."""
    if threads is not None:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = load_model(model_path, device=device)
        return model, (load_state(state_path, model) if state_path else None)
    except (CheckpointError, StateFileError) as e:
        raise _fail(str(e)) from None


def _echo(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@app.command()
def generate(model: Path = MODEL_OPTION, prompt: str = typer.Option(..., "--prompt", "-p"),
             state: Path | None = STATE_OPTION,
             raw: bool = typer.Option(False, help="continue the prompt as plain text (no chat template)"),
             temperature: float = TEMPERATURE_OPTION, top_p: float = TOP_P_OPTION,
             max_tokens: int = MAX_TOKENS_OPTION, seed: int | None = SEED_OPTION,
             device: str = DEVICE_OPTION, cpu_threads: int | None = THREADS_OPTION) -> None:
    """Answer one prompt (as a chat turn unless --raw), streaming the reply to stdout."""
    rwkv, init = _load(model, state, device, cpu_threads)
    tokenizer = WorldTokenizer()
    text = prompt if raw else render_text([{"role": "user", "content": prompt}], generation_prompt=True)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    start = time.perf_counter()
    done = complete(rwkv, tokenizer, tokenizer.encode(text), init, params, on_text=_echo)
    seconds = time.perf_counter() - start
    _echo("\n")
    typer.secho(f"[{len(done.token_ids)} tokens, {len(done.token_ids) / seconds:.1f} tokens/s, "
                f"stop: {done.stop_reason}]", err=True, dim=True)


@app.command()
def chat(model: Path = MODEL_OPTION, state: Path | None = STATE_OPTION,
         system: str | None = typer.Option(None, help="optional system message for the first turn"),
         temperature: float = TEMPERATURE_OPTION, top_p: float = TOP_P_OPTION,
         max_tokens: int = MAX_TOKENS_OPTION, seed: int | None = SEED_OPTION,
         device: str = DEVICE_OPTION, cpu_threads: int | None = THREADS_OPTION) -> None:
    """Interactive chat in the G1 template; the conversation lives in the recurrent state.

    Type /reset to start over from the loaded state, /quit (or end of input) to leave.
    """
    rwkv, init = _load(model, state, device, cpu_threads)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    tokenizer = WorldTokenizer()

    def new_session() -> ChatSession:
        return ChatSession(rwkv, tokenizer, state=init, params=params, system=system)

    session = new_session()
    typer.secho(f"chat with {model.name}" + (f" + {state.name}" if state else "") +
                f" ({CHAT_RESET}, {CHAT_QUIT[0]})", err=True, dim=True)
    while True:
        try:
            line = input("User: ")
        except EOFError:
            break
        if line.strip() in CHAT_QUIT:
            break
        if line.strip() == CHAT_RESET:
            session = new_session()
            continue
        if not line.strip():
            continue
        _echo("Assistant:")
        session.reply(line, on_text=_echo)
        _echo("\n\n")


@app.command()
def train(model: Path = MODEL_OPTION,
          data: Path = typer.Option(..., "--data", "-d", help="jsonl: dialogue records or RWKV-PEFT {\"text\"} lines"),
          out: Path = typer.Option(..., "--out", "-o", help="output folder (state.pth, metrics, checkpoints)"),
          max_steps: int | None = typer.Option(None, help="optimizer steps (overrides --epochs)"),
          epochs: int | None = typer.Option(None, help="passes over the data (default 1)"),
          lr_init: float | None = typer.Option(None, help="peak learning rate (default 1.0)"),
          lr_final: float | None = typer.Option(None, help="learning rate at the end of the cosine (default 0.01)"),
          warmup_steps: int | None = typer.Option(None, help="linear warm-up steps (default 10)"),
          ctx_len: int | None = typer.Option(None, help="max input tokens per sample (default 512)"),
          micro_bsz: int | None = typer.Option(None, help="samples per micro-batch, or rows with --pack (default 8)"),
          accumulate: int | None = typer.Option(None, "--accumulate", help="micro-batches per optimizer step (default 1)"),
          loss_on: str | None = typer.Option(None, help="assistant (replies only) or all (RWKV-PEFT) (default assistant)"),
          overlong: str | None = typer.Option(None, help="samples over ctx_len: truncate or drop (default truncate)"),
          grad_cp: bool | None = typer.Option(None, "--grad-cp/--no-grad-cp", help="recompute blocks in backward"),
          grad_cp_keep: int | None = typer.Option(None, help="with --grad-cp: the last N blocks keep their "
                                                  "activations (faster, more memory) (default 0)"),
          grad_cp_policy: str | None = typer.Option(None, help="with --grad-cp, what is recomputed: full or "
                                                    "selective (cheap stages only: faster, more memory) "
                                                    "(default full)"),
          grad_cp_keep_ffn: int | None = typer.Option(None, help="with --grad-cp-policy selective: N more blocks keep "
                                                      "their FFN activations instead of recomputing the FFN key "
                                                      "product (~0.07 GB each at 1.5B, 512 × 8) (default 0)"),
          compile: bool | None = typer.Option(None, "--compile/--no-compile",
                                              help="torch.compile the blocks (faster steps, slower first step)"),
          cuda_graphs: str | None = typer.Option(None, help="auto, on or off: replay each batch shape's captured "
                                                 "CUDA graph (default auto: on for CUDA in bf16)"),
          pack: bool | None = typer.Option(None, "--pack/--no-pack",
                                           help="micro-batches of micro_bsz rows × ctx_len tokens, packed with whole "
                                                "dialogues (best for short dialogues)"),
          wkv_kernel: str | None = typer.Option(None, help="CUDA WKV kernel: auto, chunk, triton or fla "
                                                "(default auto: chunk, or fla for varlen batches without CUDA graphs "
                                                "or --pack)"),
          distill_prompt: str | None = typer.Option(None, help="learn a state that acts like this system prompt"),
          seed: int | None = typer.Option(None, help="seed for data order (default 42)"),
          device: str | None = typer.Option(None, help="auto, cpu or cuda (default auto)"),
          cpu_threads: int | None = typer.Option(None, help="torch threads on CPU; 1 is fastest for tiny models"),
          precision: str | None = typer.Option(None, help="frozen weights: bf16, int8 or nf4 (CUDA) (default bf16)"),
          devices: int | None = typer.Option(None, help="GPUs; >1 trains with Lightning DDP (default 1)"),
          resume: bool = typer.Option(False, help="continue from OUT/checkpoints/last.ckpt"),
          tensorboard: bool = typer.Option(False, help="log to OUT/tensorboard (needs tensorboard installed)")
          ) -> None:
    """Tune the initial state of a frozen RWKV-7 on a jsonl data set; writes OUT/state.pth + state.json."""
    from rwkv7.data import DatasetError
    from rwkv7.train import TrainingError, TrainParams, train_state

    given = {"max_steps": max_steps, "epochs": epochs, "lr_init": lr_init, "lr_final": lr_final,
             "warmup_steps": warmup_steps, "ctx_len": ctx_len, "micro_bsz": micro_bsz,
             "accumulate_grad_batches": accumulate, "loss_on": loss_on, "overlong": overlong, "grad_cp": grad_cp,
             "grad_cp_keep": grad_cp_keep, "grad_cp_policy": grad_cp_policy, "grad_cp_keep_ffn": grad_cp_keep_ffn,
             "compile": compile, "cuda_graphs": cuda_graphs, "pack": pack, "wkv_kernel": wkv_kernel,
             "distill_prompt": distill_prompt, "seed": seed, "device": device, "cpu_threads": cpu_threads,
             "precision": precision, "devices": devices, "tensorboard": tensorboard or None}
    try:
        settings = TrainParams.from_options({k: v for k, v in given.items() if v is not None})
        metrics = train_state(model, data, out, settings, resume=resume)
    except (ValueError, TrainingError, DatasetError, CheckpointError, StateFileError) as e:
        raise _fail(str(e)) from None
    typer.secho(f"state: {out / 'state.pth'}  loss {metrics['first_loss']:.4f} → {metrics['final_loss']:.4f}  "
                f"{metrics['steps']} steps, {metrics['tokens_per_s']:.0f} real tokens/s", err=True)


@app.command("eval")
def evaluate(model: Path = MODEL_OPTION,
             val: Path = typer.Option(..., "--val", help="validation jsonl (dialogue records or {\"text\"} lines)"),
             runs: Path = typer.Option(..., "--runs", help="training run folder (state-epoch<N>.pth, state.pth)"),
             out: Path = typer.Option(..., "--out", "-o", help="report folder (report.md, metrics, best state)"),
             system_prompt: str | None = typer.Option(None, help="system prompt of the prompt baseline"),
             prompt: list[str] | None = typer.Option(None, "--prompt", "-p", help="evaluation prompt (repeatable)"),
             temperature: float = TEMPERATURE_OPTION, top_p: float = TOP_P_OPTION,
             max_tokens: int = typer.Option(120, min=1, help="tokens per sample generation"),
             seed: int = typer.Option(0, help="sampling seed (prompt i uses seed + i)"),
             batch_size: int | None = typer.Option(None, help="sequences per loss batch (default 8)"),
             device: str | None = typer.Option(None, help="auto, cpu or cuda (default auto)")) -> None:
    """Score every state of a training run against the base model (zero state) and the system prompt it
    replaces; export the best one and write a Markdown report with charts and sample generations."""
    from rwkv7.data import DatasetError
    from rwkv7.evaluate import EvaluateParams, EvaluationError, run_evaluation

    given = {"system_prompt": system_prompt, "prompts": prompt, "batch_size": batch_size, "device": device,
             "sampling": SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)}
    try:
        settings = EvaluateParams.model_validate({k: v for k, v in given.items() if v is not None})
        summary = run_evaluation(model, val, runs, out, settings)
    except (ValueError, EvaluationError, DatasetError, CheckpointError, StateFileError) as e:
        raise _fail(str(e)) from None
    typer.secho(f"best: {summary['best']} (val loss {summary['best_val_loss']:.4f}); report: {out / 'report.md'}, "
                f"state: {out / 'best-state.pth'}", err=True)
