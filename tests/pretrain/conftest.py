"""Fixtures for the pretraining recipe's tests: its scripts loaded by path, and the shipped demo model."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "pretrain"
SHIPPED = ROOT / "models" / "rwkv7-demo-L4-C128.pth"
HELDOUT = PRETRAIN / "heldout.jsonl"


def load_script(name: str) -> ModuleType:
    """Import pretrain/<name>.py under the name `pretrain_<name>` (the folder is not a package)."""
    for folder in (str(ROOT), str(PRETRAIN)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module_name = f"pretrain_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, PRETRAIN / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script() -> Callable[[str], ModuleType]:
    """`script("pretrain")` → the module pretrain/pretrain.py (test files cannot import this conftest)."""
    return load_script


@pytest.fixture(scope="session")
def shipped_model():  # noqa: ANN201  (rwkv7.RWKV7; imported lazily)
    import rwkv7

    return rwkv7.load_model(SHIPPED)


@pytest.fixture(scope="session")
def heldout_docs() -> list[dict[str, str]]:
    return [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines()]
