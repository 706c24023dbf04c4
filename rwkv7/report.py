"""Evaluation outputs people and DVC read: metrics dict, plot rows, PNG charts, the Markdown report.

Boundary: results of `rwkv7.evaluate` (numbers and strings) in; dicts, strings and files out (`write_outputs`
writes the whole report folder except the exported state). Charts are
rendered with matplotlib's Agg canvas (no display, no global pyplot state) and written atomically, so offline
users get pictures without DVC's CDN-loaded HTML plots.

Variant names: "zero" (base model, zero state), "prompt" (base model with the system prompt consumed into the
state first), "epoch_<N>" (a saved epoch state), "final" (the final state).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rwkv7.atomic import atomic_path, write_json, write_jsonl, write_text

if TYPE_CHECKING:  # rwkv7.evaluate imports this module; the dataclasses are only read here
    from rwkv7.evaluate import Behaviour, Generation, VariantResult

log = logging.getLogger(__name__)

ZERO, PROMPT = "zero", "prompt"
LABELS = {ZERO: "base model, zero state", PROMPT: "base model + system prompt"}
FIG_SIZE_IN = (7.0, 4.0)
FIG_DPI = 100
X_COLUMNS = ("step", "global_step", "epoch")
_DIGITS = 4


class ReportError(ValueError):
    """An input of the report (metrics CSV, results) cannot be used; the message names it."""


def label(name: str) -> str:
    """Human name of a variant: "epoch_3" -> "state after epoch 3"."""
    if name in LABELS:
        return LABELS[name]
    if name.startswith("epoch_"):
        return f"state after epoch {name.removeprefix('epoch_')}"
    return f"{name} state"


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, _DIGITS)


def metrics(results: Sequence[VariantResult], best: VariantResult, behaviours: Mapping[str, Behaviour],
            judge_scores: Mapping[str, float] | None = None) -> dict:
    """The `metrics.json` dict for `dvc metrics show/diff`: nested one level (DVC flattens it to dotted keys).

    `improvement_vs_*` are loss differences (positive = the best state is better); `prompt_gap_closed` is the
    share of the prompt's loss gain over the zero state that the best state recovers (1.0 = as good as the
    prompt, > 1 better); absent when the prompt does not help.
    """
    by_name = {r.name: r for r in results}
    out: dict = {
        "val_loss": {r.name: _r(r.score.loss) for r in results},
        "val_ppl": {r.name: _r(r.score.perplexity) for r in results},
        "kl_to_prompt": {r.name: _r(r.score.kl) for r in results if not math.isnan(r.score.kl)},
        "val_tokens": best.score.n_tokens,
        "val_sequences": best.score.n_sequences,
        "best": {"variant": best.name, "epoch": best.epoch, "val_loss": _r(best.score.loss),
                 "val_ppl": _r(best.score.perplexity), "kl_to_prompt": _r(best.score.kl)},
    }
    zero, prompt = by_name.get(ZERO), by_name.get(PROMPT)
    if zero:
        out["best"]["improvement_vs_zero"] = _r(zero.score.loss - best.score.loss)
    if prompt:
        out["best"]["improvement_vs_prompt"] = _r(prompt.score.loss - best.score.loss)
    if zero and prompt and zero.score.loss > prompt.score.loss:
        gain = zero.score.loss - prompt.score.loss
        out["best"]["prompt_gap_closed"] = _r((zero.score.loss - best.score.loss) / gain)
    out["behaviour"] = {name: {"tokens_mean": _r(b.tokens_mean), "words_mean": _r(b.words_mean),
                               "distinct_1": _r(b.distinct_1), "distinct_2": _r(b.distinct_2),
                               "marker_rate": _r(b.marker_rate)}
                        for name, b in behaviours.items()}
    for name, value in (judge_scores or {}).items():
        out["behaviour"].setdefault(name, {})["judge_score"] = _r(value)
    return out


def val_loss_rows(results: Sequence[VariantResult]) -> list[dict]:
    """Rows for `dvc plots` (x: epoch): each epoch state's loss next to the two baselines as flat series."""
    base = {r.name: _r(r.score.loss) for r in results if not r.is_state}
    return [{"epoch": r.epoch, "state": _r(r.score.loss), **base}
            for r in sorted((r for r in results if r.epoch is not None), key=lambda r: r.epoch)]


def read_curves(path: str | os.PathLike[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Loss series of a training `metrics.csv`: {loss column: (x values, y values)}, blank cells skipped.

    x is the first of `X_COLUMNS` present, else the row number; every column whose name contains "loss" is a
    series. Raises ReportError if the file has no header or no loss column.
    """
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    losses = [c for c in columns if "loss" in c.lower()]
    if not losses:
        raise ReportError(f"{path}: no loss column in the header {columns}")
    x_col = next((c for c in X_COLUMNS if c in columns), None)
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for col in losses:
        xs, ys = [], []
        for i, row in enumerate(rows):
            y, x = _float(row.get(col)), _float(row.get(x_col)) if x_col else float(i)
            if y is not None and x is not None:
                xs.append(x)
                ys.append(y)
        if ys:
            curves[col] = (xs, ys)
    return curves


def _float(cell: str | None) -> float | None:
    try:
        return float(cell) if cell not in (None, "") else None
    except ValueError:
        return None


def save_figure(fig: Figure, dest: str | os.PathLike[str]) -> Path:
    """`fig` as a PNG at `dest`, written atomically."""
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=FIG_DPI, bbox_inches="tight")
    return Path(dest)


def plot_training_curves(runs: Mapping[str, Mapping[str, tuple[list[float], list[float]]]],
                         dest: str | os.PathLike[str]) -> Path:
    """One line per (run, loss column) on shared axes; `runs` maps a run name to `read_curves` output."""
    fig = Figure(figsize=FIG_SIZE_IN)
    ax = fig.add_subplot()
    for run, curves in runs.items():
        for col, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=f"{run}: {col}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training loss of all runs")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize="small")
    return save_figure(fig, dest)


def plot_val_loss(results: Sequence[VariantResult], dest: str | os.PathLike[str]) -> Path:
    """Validation loss per epoch state, with the zero-state and prompt baselines as horizontal lines."""
    fig = Figure(figsize=FIG_SIZE_IN)
    ax = fig.add_subplot()
    epochs = sorted((r for r in results if r.epoch is not None), key=lambda r: r.epoch)
    if epochs:
        ax.plot([r.epoch for r in epochs], [r.score.loss for r in epochs], marker="o", label="tuned state")
    styles = {ZERO: ("tab:red", "--"), PROMPT: ("tab:green", ":")}
    for r in results:
        if r.name in styles:
            color, ls = styles[r.name]
            ax.axhline(r.score.loss, color=color, linestyle=ls, label=label(r.name))
    final = next((r for r in results if r.name == "final"), None)
    if final and epochs:
        ax.plot([epochs[-1].epoch], [final.score.loss], marker="*", markersize=12, linestyle="none",
                color="tab:purple", label="final state")
    elif final:  # a run without per-epoch states: the final state is a level, like the baselines
        ax.axhline(final.score.loss, color="tab:purple", label="final state")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss: tuned state vs baselines")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, dest)


@dataclass(frozen=True)
class ReportInputs:
    """Everything the Markdown report shows; paths in `charts` are relative to the report's folder.

    `model`: {"file", "sha256", "n_layer", "n_embd", ...}; `data`: {"val_file", "val_records", ...};
    `training`: key facts of the run (from the state sidecar: data hash, counts, epochs, ...);
    `generations[variant]`: one `Generation` per evaluation prompt, same order for every variant;
    `sampling`: {"seed", "temperature", "top_p", "max_tokens"}; `cost`: {"loss_tokens_per_s", ...}.
    """

    results: Sequence[VariantResult]
    best: VariantResult
    model: Mapping[str, object]
    data: Mapping[str, object]
    system_prompt: str
    best_state_file: str
    training: Mapping[str, object] = field(default_factory=dict)
    behaviours: Mapping[str, Behaviour] = field(default_factory=dict)
    generations: Mapping[str, Sequence[Generation]] = field(default_factory=dict)
    markers: Sequence[str] = ()
    sampling: Mapping[str, object] = field(default_factory=dict)
    charts: Mapping[str, str] = field(default_factory=dict)
    judge_scores: Mapping[str, float] = field(default_factory=dict)
    judge_note: str = ""
    cost: Mapping[str, object] = field(default_factory=dict)


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell (pipes escaped, newlines as <br>)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _fmt(x: float | None, digits: int = _DIGITS) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fact(value: object) -> str:
    """A value for an inline code span: floats to 4 significant digits, multi-line strings JSON-quoted."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if "\n" in text or "`" in text else text


def _facts(items: Mapping[str, object]) -> list[str]:
    return [f"- {k}: `{_fact(v)}`" for k, v in items.items() if v not in (None, "")]


def _summary(inp: ReportInputs) -> list[str]:
    by_name = {r.name: r for r in inp.results}
    best = inp.best
    line = (f"Best state: **{label(best.name)}**, validation loss **{_fmt(best.score.loss)}** "
            f"(perplexity {_fmt(best.score.perplexity, 2)})")
    parts = [f"{label(n)} {_fmt(by_name[n].score.loss)}" for n in (ZERO, PROMPT) if n in by_name]
    if parts:
        line += "; " + ", ".join(parts)
    return [line + ".", "", "Lower is better: mean negative log-likelihood (nats) per scored token "
            f"({inp.data.get('mask', 'assistant')} tokens, the tokens the training loss uses). *KL to prompt* is "
            "the mean KL divergence (nats/token) from the prompted model's next-token distribution on the same "
            "tokens: 0 means the variant predicts exactly like the base model reading the system prompt."]


def _loss_table(inp: ReportInputs) -> list[str]:
    zero = next((r for r in inp.results if r.name == ZERO), None)
    rows = []
    for r in inp.results:
        delta = _fmt(zero.score.loss - r.score.loss) if zero and r is not zero else ""
        star = " (best)" if r.name == inp.best.name else ""
        rows.append([label(r.name) + star, _fmt(r.score.loss), _fmt(r.score.perplexity, 2), delta,
                     _fmt(r.score.kl), r.score.n_tokens])
    return _table(["variant", "val loss", "perplexity", "gain vs zero state", "KL to prompt", "scored tokens"],
                  rows)


def _behaviour_table(inp: ReportInputs) -> list[str]:
    names = list(inp.behaviours)
    bs = [inp.behaviours[n] for n in names]
    rows = [["tokens / response", *(_fmt(b.tokens_mean, 1) for b in bs)],
            ["words / response", *(_fmt(b.words_mean, 1) for b in bs)],
            ["distinct-1", *(_fmt(b.distinct_1, 3) for b in bs)],
            ["distinct-2", *(_fmt(b.distinct_2, 3) for b in bs)],
            ["persona marker rate", *(_fmt(b.marker_rate, 2) for b in bs)]]
    rows += [[f"marker `{_cell(m)}`", *(f"{b.marker_counts.get(m, 0)}/{b.n_responses}" for b in bs)]
             for m in inp.markers]
    if inp.judge_scores:
        rows.append(["LLM judge score", *(_fmt(inp.judge_scores.get(n), 2) for n in names)])
    return _table(["measure", *(_gen_label(n) for n in names)], rows)


def _gen_label(name: str) -> str:
    return {"base": LABELS[ZERO], PROMPT: LABELS[PROMPT], "state": "tuned state (best)"}.get(name, label(name))


def _generations(inp: ReportInputs) -> list[str]:
    names = list(inp.generations)
    if not names:
        return ["No evaluation prompts configured (`evaluate.prompts`)."]
    s = inp.sampling
    lines = [f"Seeded sampling: seed {s.get('seed')}, temperature {s.get('temperature')}, top-p "
             f"{s.get('top_p')}, at most {s.get('max_tokens')} tokens; the same seed for every variant.", ""]
    for i, gen in enumerate(inp.generations[names[0]]):
        lines += [f"### Prompt {i + 1}", "", "> " + gen.prompt.replace("\n", "\n> "), ""]
        lines += _table([_gen_label(n) for n in names], [[_cell(inp.generations[n][i].text) for n in names]])
        lines.append("")
    return lines


def how_to_use(best_state_file: str, model_file: str) -> list[str]:
    """Instructions for loading an exported state in RWKV-Runner, the `rwkv` pip package and statetune."""
    return [
        f"`{best_state_file}` is an RWKV-Runner state file (exactly one `blocks.<i>.att.time_state` "
        "`[H, 64, 64]` tensor per layer); its sidecar `.json` names the base model it belongs to. A state only "
        f"works with the base model it was trained on (`{model_file}`).",
        "",
        "- **RWKV-Runner**: copy the `.pth` into Runner's `state-models/` folder (Runner also lists `.pth` files "
        "under 200 MB in `models/`). On the *Configs* page choose a config whose *Model* is the same base model and "
        "a strategy of CPU, CUDA or Custom (Runner offers states there, not for WebGPU or .gguf models), pick the "
        "file under *State Model*, start the model and chat without a system prompt.",
        "- **`rwkv` pip package** (`state[3*i+1]` is layer i's WKV state; the two shift states stay zero):",
        "",
        "```python",
        "import os; os.environ[\"RWKV_V7_ON\"] = \"1\"",
        "import torch",
        "from rwkv.model import RWKV",
        f"model = RWKV(model=\"{model_file.removesuffix('.pth')}\", strategy=\"cpu fp32\")  # path without .pth",
        f"tuned = torch.load(\"{best_state_file}\", map_location=\"cpu\", weights_only=True)",
        "state = model.generate_zero_state()",
        "for i in range(model.n_layer):",
        "    state[3 * i + 1] = tuned[f\"blocks.{i}.att.time_state\"].float().to(state[3 * i + 1].device).clone()",
        "logits, state = model.forward(token_ids, state)  # token_ids of \"User: ...\\n\\nAssistant:\"",
        "```",
        "- **statetune**: `statetune chat --model <base model .pth> --state <report folder>/"
        f"{best_state_file}`.",
    ]


def render_markdown(inp: ReportInputs) -> str:
    """The whole `report.md`: summary, inputs, loss table, charts, behaviour, generations, usage, cost."""
    lines = ["# State-tuning evaluation", "", *_summary(inp), "", "## What was evaluated", ""]
    lines += _facts({f"base model {k}": v for k, v in inp.model.items()})
    lines += _facts({f"validation {k}": v for k, v in inp.data.items()})
    lines += _facts({f"training {k}": v for k, v in inp.training.items()})
    if inp.system_prompt:
        lines += ["", "System prompt of the prompt baseline (consumed into the state first, not scored):", "",
                  "> " + inp.system_prompt.replace("\n", "\n> ")]
    lines += ["", "## Validation loss", "", *_loss_table(inp), ""]
    if inp.charts:
        lines += ["## Charts", ""] + [f"![{title}]({path})\n" for title, path in inp.charts.items()]
    if inp.behaviours:
        lines += ["## Behaviour on the evaluation prompts", "", *_behaviour_table(inp), ""]
    if inp.judge_note:
        lines += [inp.judge_note, ""]
    lines += ["## Sample generations", "", *_generations(inp), ""]
    lines += ["## Using the best state", "", *how_to_use(inp.best_state_file, str(inp.model.get("file", ""))), ""]
    if inp.cost:
        lines += ["## Evaluation cost", "", *_facts(inp.cost), ""]
    return "\n".join(lines).rstrip() + "\n"


def training_facts(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Key facts of a training run from its state sidecar's metadata (data file and hash, sizes, settings)."""
    trained, data, run = meta.get("training", {}), meta.get("data", {}), meta.get("metrics", {})
    facts = {"data file": data.get("file"), "data sha256": data.get("sha256"),
             "samples": run.get("data", {}).get("used"), "epochs": run.get("epochs"), "steps": run.get("steps"),
             "final train loss": run.get("final_loss")}
    facts.update({k: trained.get(k) for k in ("ctx_len", "micro_bsz", "lr_init", "lr_final", "loss_on")})
    facts["distilled prompt"] = trained.get("distill_prompt")
    return {k: v for k, v in facts.items() if v is not None}


def cost(results: Sequence[VariantResult], generations: Mapping[str, Sequence[Generation]]) -> dict[str, Any]:
    """Tokens and seconds of loss evaluation (all variants) and of generation (prompt reading included)."""
    tokens = sum(r.score.n_processed for r in results)
    seconds = sum(r.score.seconds for r in results)
    gen_tokens = sum(g.n_tokens for gs in generations.values() for g in gs)
    gen_seconds = sum(g.seconds for gs in generations.values() for g in gs)
    return {"loss_tokens": tokens, "loss_seconds": round(seconds, 3),
            "loss_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "generated_tokens": gen_tokens, "generation_seconds": round(gen_seconds, 3),
            "generation_tokens_per_s": round(gen_tokens / gen_seconds, 1) if gen_seconds else None}


def _training_curves(runs_root: Path) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    curves = {}
    for csv_path in sorted(runs_root.glob("*/metrics.csv")):
        try:
            curves[csv_path.parent.name] = read_curves(csv_path)
        except (ReportError, OSError, UnicodeDecodeError) as e:
            log.warning("report: skipping training curve %s: %s", csv_path, e)
    return curves


def write_outputs(out_dir: Path, inp: ReportInputs, runs_root: Path) -> ReportInputs:
    """Write `metrics.json`, `plots/val_loss.json`, `generations.jsonl`, `val_loss.png`, `train_loss.png`
    (every `runs_root/*/metrics.csv` found) and `report.md` into `out_dir`; returns `inp` with its charts."""
    write_json(out_dir / "metrics.json", metrics(inp.results, inp.best, inp.behaviours, inp.judge_scores))
    write_json(out_dir / "plots" / "val_loss.json", val_loss_rows(inp.results))
    write_jsonl(out_dir / "generations.jsonl", ({"variant": name, "prompt": g.prompt, "text": g.text,
                                                 "tokens": g.n_tokens} for name, gs in inp.generations.items()
                                                for g in gs))
    plot_val_loss(inp.results, out_dir / "val_loss.png")
    charts = {"Validation loss per epoch vs baselines": "val_loss.png"}
    curves = _training_curves(runs_root)
    if curves:
        plot_training_curves(curves, out_dir / "train_loss.png")
        charts["Training loss of all runs"] = "train_loss.png"
    inp = replace(inp, charts=charts)
    write_text(out_dir / "report.md", render_markdown(inp))
    return inp
