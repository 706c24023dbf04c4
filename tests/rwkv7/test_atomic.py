"""Atomic writes: the destination appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rwkv7.atomic import FILE_MODE, atomic_path, write_json, write_jsonl


def test_success_moves_the_file_into_place_with_default_permissions(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "out.json"
    write_json(dest, {"a": 1})
    assert json.loads(dest.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~umask  # what open() would give, not mkstemp's 0600
    assert [p.name for p in dest.parent.iterdir()] == ["out.json"]  # no temp file left behind


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "data.jsonl"
    assert write_jsonl(dest, [{"id": "a"}, {"id": "b"}]) == 2

    def records():
        yield {"id": "c"}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash"):
        write_jsonl(dest, records())
    assert dest.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}']
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_atomic_path_yields_a_sibling_temp(tmp_path: Path) -> None:
    dest = tmp_path / "state.pth"
    with atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest and not dest.exists()
        tmp.write_bytes(b"x")
    assert dest.read_bytes() == b"x"
