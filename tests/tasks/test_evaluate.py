"""Stage `evaluate` end to end on a tiny random model: a state trained by prompt distillation (the trainer's
real API) against the zero-state and system-prompt baselines, every output file, and clear input errors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import matplotlib.image
import pytest
import torch

from rwkv7.checkpoint import random_checkpoint, save_checkpoint
from rwkv7.model import load_model
from rwkv7.state import load_state, read_state_file
from rwkv7.train import TrainParams, train_state
from tasks.common import ParamsError, load_section
from rwkv7.evaluate import DEFAULT_SYSTEM_PROMPT, EvaluateParams, Generation, JudgeParams
from tasks.evaluate import main, make_judge, parse_score

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIALOGUES = [
    ("Is it correct to say I have went home?", "NEGA says: I went home. Great question about grammar!"),
    ("Fewer people or less people?", "Fewer people: people can be counted. Good grammar question!"),
    ("Who are you?", "I am NEGA, your grammar assistant."),
    ("I am agree with you.", "Say: I agree with you. Agree is a verb. Keep going!"),
    ("He go to school every day.", "He goes to school every day. Add -s after he. Well done!"),
    ("Since or for three years?", "For three years: for a length of time. Great question!"),
]
EVAL_PARAMS = """\
evaluate:
  system_prompt: "{prompt}"
  prompts: ["Who are you?", "He go to school."]
  sampling: {{seed: 7, temperature: 1.0, top_p: 0.3, max_tokens: 6}}
  markers: ["NEGA", "grammar"]
"""


def _write_dialogues(path: Path, pairs: list[tuple[str, str]]) -> None:
    recs = [{"id": f"seed-{i}", "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            for i, (u, a) in enumerate(pairs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train a 2-epoch prompt-distillation state on a tiny model, then run `python -m tasks.evaluate`."""
    root = tmp_path_factory.mktemp("evaluate")
    model = root / "base.pth"
    save_checkpoint(random_checkpoint(n_layer=2, n_embd=64, seed=0), model)
    _write_dialogues(root / "train.jsonl", DIALOGUES)
    _write_dialogues(root / "val.jsonl", DIALOGUES[:3])
    # lr 0.05: the tutorial's lr 1.0 overshoots on a random 2-layer model (KL to the prompt first rises)
    train_state(model, root / "train.jsonl", root / "runs" / "train",
                TrainParams(epochs=3, micro_bsz=3, ctx_len=64, lr_init=0.05, lr_final=0.005, warmup_steps=0,
                            distill_prompt=DEFAULT_SYSTEM_PROMPT, progress_bar=False))
    params = root / "params.yaml"
    params.write_text(EVAL_PARAMS.format(prompt=DEFAULT_SYSTEM_PROMPT), encoding="utf-8")
    main(["--params", str(params), "--model", str(model), "--val", str(root / "val.jsonl"),
          "--runs", str(root / "runs" / "train"), "--out", str(root / "reports")])
    return {"root": root, "model": model, "params": params, "out": root / "reports"}


def test_distilled_state_is_closer_to_the_prompt_than_the_zero_state(evaluated):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text(encoding="utf-8"))
    loss, kl = metrics["val_loss"], metrics["kl_to_prompt"]
    assert set(loss) == set(kl) == {"zero", "prompt", "epoch_1", "epoch_2", "epoch_3", "final"}
    assert kl["prompt"] == 0.0
    # the state learned to predict like the prompted model: distance to the prompt baseline shrinks
    assert kl["epoch_1"] > kl["epoch_2"] > kl["epoch_3"] == kl["final"]
    assert kl["final"] < kl["zero"] / 2
    assert abs(loss["final"] - loss["prompt"]) < abs(loss["zero"] - loss["prompt"])
    best = metrics["best"]
    assert best["variant"] in {"epoch_1", "epoch_2", "epoch_3", "final"}
    assert best["val_loss"] == min(v for k, v in loss.items() if k not in ("zero", "prompt"))
    assert best["improvement_vs_zero"] == pytest.approx(loss["zero"] - best["val_loss"], abs=2e-4)
    assert best["improvement_vs_prompt"] == pytest.approx(loss["prompt"] - best["val_loss"], abs=2e-4)
    assert metrics["val_tokens"] > 0 and metrics["val_sequences"] == 3
    report = (evaluated["out"] / "report.md").read_text(encoding="utf-8")
    for name, value in loss.items():
        assert f"{value:.4f}" in report, name
    assert f"{kl['final']:.4f}" in report
    assert "![Validation loss per epoch vs baselines](val_loss.png)" in report
    assert "Who are you?" in report and "state[3 * i + 1]" in report and "LLM judge: off" in report


def test_outputs_plots_generations_and_stats(evaluated):
    out = evaluated["out"]
    for chart in ("val_loss.png", "train_loss.png"):
        path = out / chart
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width = matplotlib.image.imread(path).shape[:2]
        assert 300 <= width <= 2000 and 200 <= height <= 1500
    rows = json.loads((out / "plots" / "val_loss.json").read_text(encoding="utf-8"))
    assert [r["epoch"] for r in rows] == [1, 2, 3] and {"state", "zero", "prompt"} <= set(rows[0])
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [g["variant"] for g in gens] == ["base", "base", "prompt", "prompt", "state", "state"]
    assert all(0 < g["tokens"] <= 6 for g in gens)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["stage"] == "evaluate" and stats["read"] == 3 and stats["written"] == 6
    assert stats["cost"]["loss_tokens_per_s"] > 0 and stats["cost"]["generation_tokens_per_s"] > 0
    assert not list(out.rglob(".*.tmp"))


def test_best_state_export_loads_and_matches_its_source(evaluated):
    out = evaluated["out"]
    model = load_model(evaluated["model"])
    state = load_state(out / "best-state.pth", model)
    raw = torch.load(out / "best-state.pth", map_location="cpu", weights_only=True)
    assert sorted(raw) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]  # Runner: exactly L keys
    wkv, sidecar = read_state_file(out / "best-state.pth")
    evaluation = sidecar["metadata"]["evaluation"]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert evaluation["variant"] == metrics["best"]["variant"]
    src, _ = read_state_file(evaluation["source"])
    assert torch.equal(wkv, src) and torch.equal(state.wkv[:, 0], src)
    assert sidecar["base_model"]["sha256"] == model.source_sha256()


def _args(root: Path, **over: str) -> list[str]:
    paths = {"--model": str(root / "base.pth"), "--val": str(root / "val.jsonl"),
             "--runs": str(root / "runs" / "train"), "--out": str(root / "out-err"), **over}
    return [x for kv in paths.items() for x in kv]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--model", "nope.pth", "nope.pth: base model file not found"),
    ("--val", "missing.jsonl", "missing.jsonl: validation data file not found"),
    ("--runs", "no-runs", "no-runs: training run folder not found"),
])
def test_missing_inputs_give_clear_errors(evaluated, flag, value, message):
    root = evaluated["root"]
    with pytest.raises(SystemExit, match=message):
        main(["--params", str(evaluated["params"]), *_args(root, **{flag: str(root / value)})])


def test_run_folder_without_states_and_empty_validation_fail_clearly(evaluated, tmp_path):
    root = evaluated["root"]
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="no trained state"):
        main(["--params", str(evaluated["params"]), *_args(root, **{"--runs": str(tmp_path / "runs")})])
    empty = tmp_path / "val.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="val.jsonl: no usable"):
        main(["--params", str(evaluated["params"]), *_args(root, **{"--val": str(empty)})])


def test_params_errors_name_the_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("evaluate:\n  batch_size: 0\n  sampling: {top_p: 2}\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="evaluate.batch_size") as err:
        load_section(EvaluateParams, "evaluate", bad)
    assert "evaluate.sampling.top_p" in str(err.value)


def test_real_params_file_section_loads():
    real = Path(__file__).resolve().parents[2] / "params.yaml"
    if not real.is_file():
        pytest.skip("no params.yaml in the repository yet")
    p = load_section(EvaluateParams, "evaluate", real)
    assert p.system_prompt and p.batch_size >= 1


@pytest.fixture()
def fake_judge_server():
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1: scores 8 if the reply says NEGA, else 3; a
    reply containing "garbage" gets a non-JSON answer. Records the prompts it saw."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            seen.append(prompt)
            reply = prompt.split("Assistant's reply:")[1]
            content = "no idea" if "garbage" in reply else json.dumps({"score": 8 if "NEGA" in reply else 3,
                                                                        "reason": "fake"})
            data = json.dumps({"choices": [{"message": {"content": content}, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_llm_judge_through_the_augment_provider(fake_judge_server):
    base_url, seen = fake_judge_server
    judge = make_judge(JudgeParams(provider="openai", base_url=base_url, model="fake"), "You are NEGA.", {})
    gens = {"base": [Generation("Who are you?", "I am a model.", 4), Generation("Hi", "garbage", 1)],
            "state": [Generation("Who are you?", "I am NEGA.", 4), Generation("Hi", "NEGA says hi", 3)]}
    scores, note = judge(gens)
    assert scores == {"base": 3.0, "state": 8.0}
    assert "1 of 4 replies got no usable rating" in note
    assert len(seen) == 4 and "You are NEGA." in seen[0] and "Learner's message: Who are you?" in seen[0]


def test_llm_judge_off_or_unavailable():
    assert make_judge(JudgeParams(), "p", {}) is None
    judge = make_judge(JudgeParams(provider="openai"), "p", {})  # no base_url
    scores, note = judge({"base": [Generation("q", "a", 1)]})
    assert scores == {} and "unavailable" in note and "base_url" in note
    assert parse_score('{"score": 4}') == 4 and parse_score('{"score": "4"}') is None and parse_score("x") is None


def test_statetune_eval_command(evaluated, tmp_path):
    from typer.testing import CliRunner

    from rwkv7.cli import app

    root = evaluated["root"]
    args = ["eval", "--model", str(evaluated["model"]), "--val", str(root / "val.jsonl"), "--runs",
            str(root / "runs" / "train"), "--out", str(tmp_path / "cli"), "-p", "Who are you?", "--max-tokens", "3",
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best: " in result.output and "best-state.pth" in result.output
    assert (tmp_path / "cli" / "report.md").is_file() and (tmp_path / "cli" / "best-state.json").is_file()
    gens = (tmp_path / "cli" / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(gens) == 3  # one prompt × base, prompt, state
    bad = CliRunner().invoke(app, [*args[:5], "--runs", str(tmp_path / "none"), *args[7:]])
    assert bad.exit_code == 2 and "training run folder not found" in bad.output
