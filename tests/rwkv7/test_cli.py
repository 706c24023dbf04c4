"""`statetune generate` / `statetune chat` end to end on a tiny World-vocabulary checkpoint."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from rwkv7.cli import EXIT_BAD_INPUT, app
from rwkv7.state import save_state

runner = CliRunner()


def test_generate_streams_a_reply_with_and_without_a_state(world_checkpoint, tmp_path):
    args = ["generate", "--model", str(world_checkpoint), "--prompt", "Hello there", "--max-tokens", "8",
            "--seed", "1", "--device", "cpu", "--cpu-threads", "1"]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert "tokens/s" in plain.stderr and plain.stdout.strip()
    save_state(tmp_path / "s.pth", torch.randn(2, 1, 64, 64), {})
    tuned = runner.invoke(app, [*args, "--state", str(tmp_path / "s.pth")])
    assert tuned.exit_code == 0, tuned.output
    assert runner.invoke(app, args).stdout == plain.stdout, "same seed, same output"


def test_bad_files_exit_2_naming_the_file(world_checkpoint, tmp_path):
    missing = runner.invoke(app, ["generate", "--model", str(tmp_path / "none.pth"), "--prompt", "x"])
    assert missing.exit_code == EXIT_BAD_INPUT and "none.pth: checkpoint file not found" in missing.stderr
    save_state(tmp_path / "big.pth", torch.zeros(5, 1, 64, 64), {})
    wrong = runner.invoke(app, ["generate", "--model", str(world_checkpoint), "--state", str(tmp_path / "big.pth"),
                                "--prompt", "x"])
    assert wrong.exit_code == EXIT_BAD_INPUT and "big.pth: state has 5 layers" in wrong.stderr


def test_chat_runs_turns_until_quit(world_checkpoint):
    result = runner.invoke(app, ["chat", "--model", str(world_checkpoint), "--max-tokens", "4", "--seed", "0",
                                 "--device", "cpu"], input="hi\n/reset\nagain\n/quit\nnever\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Assistant:") == 2
