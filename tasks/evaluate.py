"""Stage `evaluate`: does the tuned state beat the base model, and the system prompt it replaces?

Contract: base model `.pth` + validation jsonl + a training run folder (`state-epoch{N}.pth`, `state.pth`, their
sidecars) + `params.yaml[evaluate]` → in `--out`: `metrics.json` (for `dvc metrics`), `plots/val_loss.json`
(for `dvc plots`), `val_loss.png` + `train_loss.png`, `generations.jsonl`, `report.md`, `best-state.pth` +
`best-state.json` (RWKV-Runner state + sidecar) and a stats JSON.

Variants scored on the validation split (mean NLL over the tokens the training loss uses: same template, loss
mask and ctx_len as the run, read from its sidecar): "zero" (base model, zero state), "prompt" (base model with
the system prompt rendered as a `System:` turn and consumed into the state first, its tokens not scored), each
"epoch_<N>" state and the "final" state. The best trained state by validation loss is exported. Generations for
`evaluate.prompts` are sampled with the same seed for "base", "prompt" and "state" (the best one).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from rwkv7 import report
from rwkv7.atomic import write_json, write_jsonl, write_text
from rwkv7.data import DatasetError, file_sha256, load_samples
from rwkv7.checkpoint import CheckpointError
from rwkv7.data import Sample
from rwkv7.evaluate import (Generation, VariantResult, behaviour, consume, generate_responses, pick_best,
                            score_many)
from rwkv7.generate import SamplingParams
from rwkv7.model import RWKV7, load_model
from rwkv7.state import RWKVState, StateFileError, load_state, read_state_file, save_state
from rwkv7.template import render
from rwkv7.tokenizer import WorldTokenizer
from tasks.common import DataError, ParamsError, StageStats, load_section

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are NEGA, the Native English Grammar Assistant: a warm, precise English grammar teacher. Give the "
    "corrected sentence first, name the rule in one or two short sentences with one fresh example, and end with "
    "a brief word of encouragement. Keep replies under 80 words.")
DEFAULT_PROMPTS = ("Is it correct to say I have went to the shop yesterday?",
                   "Should I write fewer people or less people?",
                   "Who are you?",
                   "I am agree with you about this plan.",
                   "What is the difference between since and for?")
DEFAULT_MARKERS = ("NEGA", "grammar", "Great question")
EPOCH_STATE = re.compile(r"^state-epoch(\d+)\.pth$")
FINAL_STATE = "state.pth"
BEST_STATE = "best-state.pth"
DEFAULT_MAX_TOKENS = 120


class JudgeParams(BaseModel):
    """Optional LLM judge through the augment stage's OpenAI-compatible provider (key: OPENAI_API_KEY)."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["none", "openai"] = "none"
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    timeout_s: float = Field(60.0, gt=0.0)


class EvaluateParams(BaseModel):
    """`params.yaml[evaluate]`. `loss_on`/`ctx_len` None = what the training run used (its sidecar)."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, min_length=1)
    loss_on: Literal["assistant", "all"] | None = None
    ctx_len: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(seed=0, max_tokens=DEFAULT_MAX_TOKENS))
    markers: list[str] = Field(default_factory=lambda: list(DEFAULT_MARKERS))
    markers_ignore_case: bool = True
    judge: JudgeParams = Field(default_factory=JudgeParams)


class EvaluateError(RuntimeError):
    """The evaluation cannot run (missing model, data or states); the message names the path."""


def find_states(runs_dir: Path) -> list[tuple[str, int | None, Path]]:
    """Trained states of a run folder as (variant name, epoch, path): epochs ascending, then "final"."""
    if not runs_dir.is_dir():
        raise EvaluateError(f"{runs_dir}: training run folder not found (run the train stage first)")
    epochs = sorted((int(m.group(1)), p) for p in runs_dir.iterdir() if (m := EPOCH_STATE.match(p.name)))
    found: list[tuple[str, int | None, Path]] = [(f"epoch_{n}", n, p) for n, p in epochs]
    if (runs_dir / FINAL_STATE).is_file():
        found.append(("final", None, runs_dir / FINAL_STATE))
    if not found:
        raise EvaluateError(f"{runs_dir}: no trained state ({FINAL_STATE} or state-epoch<N>.pth)")
    return found


def _training_meta(states: list[tuple[str, int | None, Path]]) -> dict[str, Any]:
    """The newest state's sidecar metadata (training params, data hash, metrics); {} without a sidecar."""
    _, sidecar = read_state_file(states[-1][2])
    return (sidecar or {}).get("metadata", {})


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("evaluate.device is 'cuda' but CUDA is not available")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _check_inputs(model_path: Path, val_path: Path) -> None:
    for path, what in ((model_path, "base model"), (val_path, "validation data")):
        if not path.is_file():
            raise EvaluateError(f"{path}: {what} file not found")


def score_variants(model: RWKV7, samples: list[Sample], states: list[tuple[str, int | None, Path]],
                   prompt_ids: list[int], batch_size: int) -> list[VariantResult]:
    """Scores (loss, KL to the prompted model) of zero, prompt and every trained state; a state file identical
    to an earlier one (the final state is usually the last epoch's) reuses its score."""
    variants: dict[str, RWKVState | None] = {"zero": None, "prompt": consume(model, prompt_ids)}
    same_as: dict[str, str] = {}
    for name, _, path in states:
        state = load_state(path, model)
        twin = next((n for n, s in variants.items() if s is not None and torch.equal(s.wkv, state.wkv)), None)
        if twin:
            same_as[name] = twin
        else:
            variants[name] = state
    scores = score_many(model, samples, variants, batch_size, reference="prompt")
    results = [VariantResult("zero", scores["zero"], False), VariantResult("prompt", scores["prompt"], False)]
    results += [VariantResult(name, scores[same_as.get(name, name)], True, epoch) for name, epoch, _ in states]
    return results


def export_best(best: VariantResult, path: Path, dest: Path, model: RWKV7, extra: dict[str, Any]) -> Path:
    """Copy the best state through the state-file writer (Runner layout + sidecar), adding evaluation facts."""
    wkv, sidecar = read_state_file(path)
    meta = {**(sidecar or {}).get("metadata", {}), "evaluation": {"source": str(path), "variant": best.name,
                                                                  "epoch": best.epoch, **extra}}
    save_state(dest, wkv, meta, model=model)
    load_state(dest, model)  # the exported file must load for the model it was evaluated with
    return dest


def evaluate(model_path: Path, val_path: Path, runs_dir: Path, out_dir: Path, p: EvaluateParams,
             stats_path: Path | None = None) -> dict[str, Any]:
    """Run the whole evaluation (see module docstring); returns the stats dict."""
    stats = StageStats("evaluate")
    _check_inputs(model_path, val_path)
    states = find_states(runs_dir)
    train_meta = _training_meta(states)
    trained = train_meta.get("training", {})
    loss_on = p.loss_on or trained.get("loss_on", "assistant")
    ctx_len = p.ctx_len or trained.get("ctx_len", 512)
    tok = WorldTokenizer()
    try:
        samples, data_stats = load_samples(val_path, tok.encode, ctx_len, loss_on)
    except DatasetError as e:
        raise DataError(str(e)) from None
    stats.read = data_stats.read
    for reason, n in data_stats.dropped.items():
        stats.drop(reason, n)
    model = load_model(model_path, device=_device(p.device))
    prompt_ids = tok.encode(render([{"role": "system", "content": p.system_prompt}])[0].text)
    results = score_variants(model, samples, states, prompt_ids, p.batch_size)
    best = pick_best(results)
    paths = {name: path for name, _, path in states}
    export_best(best, paths[best.name], out_dir / BEST_STATE, model,
                {"val_loss": best.score.loss, "val_file": val_path.name, "val_sha256": file_sha256(val_path)})

    gen_states = {"base": None, "prompt": consume(model, prompt_ids), "state": load_state(paths[best.name], model)}
    gens = {name: generate_responses(model, tok, p.prompts, st, p.sampling)
            for name, st in gen_states.items()}
    behaviours = {name: behaviour([g.text for g in gs], [g.n_tokens for g in gs], p.markers,
                                  p.markers_ignore_case) for name, gs in gens.items()}
    judge_note = judge_status(p.judge)

    metrics = report.metrics(results, best, behaviours)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "plots" / "val_loss.json", report.val_loss_rows(results))
    write_jsonl(out_dir / "generations.jsonl", ({"variant": n, "prompt": g.prompt, "text": g.text,
                                                 "tokens": g.n_tokens} for n, gs in gens.items() for g in gs))
    charts = _charts(results, runs_dir, out_dir)
    cost = _cost(results, gens)
    write_text(out_dir / "report.md", report.render_markdown(report.ReportInputs(
        results=results, best=best, system_prompt=p.system_prompt, best_state_file=BEST_STATE,
        model={"file": model_path.name, "sha256": model.source_sha256(), "n_layer": model.config.n_layer,
               "n_embd": model.config.n_embd},
        data={"file": str(val_path), "sha256": file_sha256(val_path), "records": data_stats.read,
              "used": data_stats.used, "truncated": data_stats.truncated, "scored tokens": best.score.n_tokens,
              "mask": loss_on, "ctx_len": ctx_len},
        training=_training_facts(train_meta), behaviours=behaviours, generations=gens, markers=p.markers,
        sampling=p.sampling.model_dump(), charts=charts, judge_note=judge_note, cost=cost)))
    stats.written = len(results)
    stats.extra.update({"best": best.name, "best_val_loss": metrics["best"]["val_loss"],
                        "variants": [r.name for r in results], "generations": sum(map(len, gens.values())),
                        "cost": cost})
    return stats.save(stats_path or out_dir / "stats.json")


def _charts(results: list[VariantResult], runs_dir: Path, out_dir: Path) -> dict[str, str]:
    """Render the two charts; training curves of every run folder next to `runs_dir` with a metrics.csv."""
    report.plot_val_loss(results, out_dir / "val_loss.png")
    charts = {"Validation loss per epoch vs baselines": "val_loss.png"}
    runs = {}
    for csv_path in sorted(runs_dir.parent.glob("*/metrics.csv")):
        try:
            runs[csv_path.parent.name] = report.read_curves(csv_path)
        except (report.ReportError, OSError, UnicodeDecodeError) as e:
            log.warning("evaluate: skipping training curve %s: %s", csv_path, e)
    if runs:
        report.plot_training_curves(runs, out_dir / "train_loss.png")
        charts["Training loss of all runs"] = "train_loss.png"
    return charts


def _training_facts(meta: dict[str, Any]) -> dict[str, Any]:
    trained, data, metrics = meta.get("training", {}), meta.get("data", {}), meta.get("metrics", {})
    facts = {"data file": data.get("file"), "data sha256": data.get("sha256"),
             "samples": metrics.get("data", {}).get("used"), "epochs": metrics.get("epochs"),
             "steps": metrics.get("steps"), "final train loss": metrics.get("final_loss")}
    facts.update({k: trained.get(k) for k in ("ctx_len", "micro_bsz", "lr_init", "lr_final", "loss_on")})
    if trained.get("distill_prompt"):
        facts["distilled prompt"] = trained["distill_prompt"]
    return {k: v for k, v in facts.items() if v is not None}


def _cost(results: list[VariantResult], gens: dict[str, list[Generation]]) -> dict[str, Any]:
    tokens = sum(r.score.n_processed for r in results)
    seconds = sum(r.score.seconds for r in results)
    gen_tokens = sum(g.n_tokens for gs in gens.values() for g in gs)
    gen_seconds = sum(g.seconds for gs in gens.values() for g in gs)
    return {"loss_tokens": tokens, "loss_seconds": round(seconds, 3),
            "loss_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "generated_tokens": gen_tokens, "generation_seconds": round(gen_seconds, 3),
            "generation_tokens_per_s": round(gen_tokens / gen_seconds, 1) if gen_seconds else None}


def judge_status(p: JudgeParams) -> str:
    """The report's line about the LLM judge."""
    if p.provider == "none":
        return "LLM judge: off (`evaluate.judge.provider` is 'none'); the measures above need no network."
    return f"LLM judge: {p.provider} {p.model}."


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (section: evaluate)")
    ap.add_argument("--model", type=Path, required=True, help="base model .pth (BlinkDL RWKV-7)")
    ap.add_argument("--val", type=Path, required=True, help="validation jsonl")
    ap.add_argument("--runs", type=Path, required=True, help="training run folder (state-epoch<N>.pth, state.pth)")
    ap.add_argument("--out", type=Path, required=True, help="report folder to write")
    ap.add_argument("--stats", type=Path, default=None, help="stats JSON (default: <out>/stats.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_section(EvaluateParams, "evaluate", args.params)
        stats = evaluate(args.model, args.val, args.runs, args.out, params, args.stats)
    except (EvaluateError, DataError, ParamsError, StateFileError, CheckpointError, OSError) as e:
        raise SystemExit(f"evaluate: {e}") from None
    log.info("evaluate: best %s (val loss %s), report in %s", stats["best"], stats["best_val_loss"], args.out)


if __name__ == "__main__":
    main()
