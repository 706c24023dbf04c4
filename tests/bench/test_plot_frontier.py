"""bench/plot_frontier.py: rows of train_speed.py become labelled points and a PNG; bad input is a clear error."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def pf(load_script):  # noqa: ANN001, ANN201 - the script module
    return load_script("plot_frontier")


def _row(workload: str = "a", **kw: object) -> dict[str, object]:
    return {"model": "1.5b", "workload": workload, "precision": "bf16", "grad_cp": True, "grad_cp_policy": "selective",
            "grad_cp_keep": 0, "grad_cp_keep_ffn": 0, "peak_process_gb": 6.6, "tokens_per_s": 51_000.0, **kw}


def test_rows_become_points_named_by_their_recompute_setting(pf) -> None:  # noqa: ANN001
    rows = [_row(), _row("c", grad_cp_keep_ffn=12), _row(grad_cp=False), _row(grad_cp_policy="full", grad_cp_keep=4),
            _row(grad_cp_keep=2, grad_cp_keep_ffn=3), _row("b"), _row(precision="int8"), _row(model="0.1b"),
            _row(error="rc=1"), _row(peak_process_gb=None)]
    assert [(w, s) for w, s, _, _ in pf.points(rows, "1.5b")] == [
        ("a", "selective"), ("c", "selective, FFN kept ×12"), ("a", "none"), ("a", "full, blocks kept ×4"),
        ("a", "selective, FFN kept ×3, blocks kept ×2")]
    assert pf.points(rows, "1.5b")[0] == ("a", "selective", 6.6, 51_000.0)
    assert [p[0] for p in pf.points(rows, "1.5b", ["b"])] == ["b"]


def test_the_script_draws_a_png_and_refuses_files_without_rows(pf, tmp_path, capsys) -> None:  # noqa: ANN001
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([_row(), _row("c", peak_process_gb=7.3, tokens_per_s=50_000.0, grad_cp_keep_ffn=12)]))
    out = tmp_path / "frontier.png"
    assert pf.main([str(rows), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(SystemExit):
        pf.main([str(rows), "--model", "2.9b", "-o", str(tmp_path / "none.png")])
    assert "no measured bf16 rows of model '2.9b'" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()
