"""Stage `evaluate`: does the tuned state beat the base model, and the system prompt it replaces?

Contract: base model `.pth` + validation jsonl + a training run folder (`state-epoch{N}.pth`, `state.pth` and
their sidecars) + `params.yaml[evaluate]` → in `--out`: `metrics.json` (for `dvc metrics`),
`plots/val_loss.json` (for `dvc plots`), `val_loss.png`, `train_loss.png`, `generations.jsonl`, `report.md`,
`best-state.pth` + `best-state.json` (RWKV-Runner state + sidecar), and a stats JSON (`--stats`).

The work is `rwkv7.evaluate.run_evaluation` (shared with `statetune eval`); this file adds the params section,
the stats and the optional LLM judge, which goes through the augment stage's OpenAI-compatible provider
(`evaluate.judge.provider: openai`, `base_url`, key in OPENAI_API_KEY). Gemini works through Google's
OpenAI-compatible endpoint; augment's native Gemini provider is fixed to its dialogue schema.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

from rwkv7.checkpoint import CheckpointError
from rwkv7.data import DatasetError
from rwkv7.evaluate import EvaluateParams, EvaluationError, Generation, Judge, JudgeParams, run_evaluation
from rwkv7.state import StateFileError
from tasks.augment import AugmentError, AugmentParams, ProviderUnavailable, TransientError, make_provider
from tasks.common import StageStats, load_section, stage_errors, stage_parser

log = logging.getLogger(__name__)

JUDGE_MAX_OUTPUT_TOKENS = 256
SCORE_MIN, SCORE_MAX = 1, 10
JUDGE_PROMPT = string.Template("""\
You rate replies of a chat assistant that should speak as this persona:
$persona

Learner's message: $prompt
Assistant's reply: $reply

Rate from $low (nothing like the persona, or not a useful reply) to $high (exactly the persona, and helpful).
Answer with JSON only: {"score": <integer $low-$high>, "reason": "<one short sentence>"}""")
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_score(text: str) -> int | None:
    """The judge's integer score from its JSON answer, or None if absent or out of range.

    >>> parse_score('```json\\n{"score": 7, "reason": "ok"}\\n```'), parse_score('{"score": 11}')
    (7, None)
    """
    match = _JSON_OBJECT.search(text)
    try:
        value = json.loads(match.group(0))["score"] if match else None
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and SCORE_MIN <= value <= SCORE_MAX else None


def make_judge(p: JudgeParams, persona: str, env: Mapping[str, str]) -> Judge | None:
    """A judge scoring every generation 1–10 for persona fit; None when `p.provider` is "none"."""
    if p.provider == "none":
        return None
    settings = AugmentParams(provider=p.provider, model=p.model, base_url=p.base_url, timeout_s=p.timeout_s,
                             temperature=0.0, max_output_tokens=JUDGE_MAX_OUTPUT_TOKENS,
                             openai_response_format="json_object")
    try:
        provider = make_provider(settings, env)
    except ProviderUnavailable as e:
        log.warning("evaluate: LLM judge unavailable: %s", e)
        note = f"LLM judge: unavailable ({e}); no judge scores."
        return lambda generations: ({}, note)

    def judge(generations: Mapping[str, Sequence[Generation]]) -> tuple[dict[str, float], str]:
        scores: dict[str, float] = {}
        unusable = 0
        for variant, gens in generations.items():
            values = []
            for g in gens:
                prompt = JUDGE_PROMPT.substitute(persona=persona, prompt=g.prompt, reply=g.text, low=SCORE_MIN,
                                                 high=SCORE_MAX)
                try:
                    value = parse_score(provider(prompt).text)
                except (AugmentError, TransientError) as e:
                    log.warning("evaluate: judge request failed: %s", e)
                    value = None
                if value is None:
                    unusable += 1
                else:
                    values.append(value)
            if values:
                scores[variant] = statistics.fmean(values)
        total = sum(map(len, generations.values()))
        return scores, (f"LLM judge: {p.model} ({p.base_url}) rated persona fit {SCORE_MIN}–{SCORE_MAX}, mean per "
                        f"variant; {unusable} of {total} replies got no usable rating.")

    return judge


def evaluate(model_path: Path, val_path: Path, runs_dir: Path, out_dir: Path, p: EvaluateParams,
             stats_path: Path | None = None, env: Mapping[str, str] | None = None) -> dict:
    """Run the evaluation and write its stats JSON (default `<out_dir>/stats.json`); returns the stats."""
    stats = StageStats("evaluate")
    judge = make_judge(p.judge, p.system_prompt, os.environ if env is None else env)
    summary = run_evaluation(model_path, val_path, runs_dir, out_dir, p, judge)
    data = summary.pop("data")
    stats.read = data["read"]
    for reason, n in data["dropped"].items():
        stats.drop(reason, n)
    stats.written = len(summary["variants"])
    stats.extra.update(summary)
    return stats.save(stats_path or out_dir / "stats.json")


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("evaluate", __doc__)
    ap.add_argument("--model", type=Path, required=True, help="base model .pth (BlinkDL RWKV-7)")
    ap.add_argument("--val", type=Path, required=True, help="validation jsonl")
    ap.add_argument("--runs", type=Path, required=True, help="training run folder (state-epoch<N>.pth, state.pth)")
    ap.add_argument("--out", type=Path, required=True, help="report folder to write")
    ap.add_argument("--stats", type=Path, default=None, help="stats JSON (default: <out>/stats.json)")
    args = ap.parse_args(argv)
    with stage_errors("evaluate", EvaluationError, DatasetError, StateFileError, CheckpointError):
        params = load_section(EvaluateParams, "evaluate", args.params)
        stats = evaluate(args.model, args.val, args.runs, args.out, params, args.stats)
    log.info("evaluate: best %s (val loss %.4f), report in %s", stats["best"], stats["best_val_loss"], args.out)


if __name__ == "__main__":
    main()
