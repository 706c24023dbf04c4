"""Shared by the tests of bench/ scripts: load a script as a module (bench/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses of the script look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def load_script() -> Callable[[str], ModuleType]:
    """`load_script("train_speed")`: bench/train_speed.py as the module `train_speed`."""
    return _load
