"""Shared fixtures for the rwkv7 tests: tiny random BlinkDL-layout checkpoints and the `rwkv` pip oracle."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from rwkv7.checkpoint import random_checkpoint, save_checkpoint

TINY = {"n_layer": 3, "n_embd": 128, "vocab_size": 1000}
# The `rwkv` package picks its model class when first imported: select x070 before any test can import it.
os.environ["RWKV_V7_ON"] = "1"
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 3-layer C=128 checkpoints: with and without block-0 v0/v1/v2 (different seeds and dims)."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, block0_v, seed, dims in (("block0_v", True, 1, None),
                                       ("no_block0_v", False, 2, {"w": 64, "a": 32, "v": 32, "g": 96})):
        path = root / f"tiny-{name}.pth"
        save_checkpoint(random_checkpoint(**TINY, seed=seed, block0_v=block0_v, dims=dims), path)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def tiny_path(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["block0_v"]


class RwkvPipOracle:
    """The `rwkv` package's x070 model (cpu fp32) as a function of (tokens, runner-style wkv state)."""

    def __init__(self, path: Path) -> None:
        from rwkv.model import RWKV

        self.model = RWKV(model=str(path.with_suffix("")), strategy="cpu fp32")

    def logits(self, tokens: list[int], time_state: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits [T, V]; `time_state [L, H, N, N]` injected the RWKV-Runner way (no transpose)."""
        state = self.model.generate_zero_state()
        if time_state is not None:
            for i in range(time_state.shape[0]):
                state[3 * i + 1] = time_state[i].float().clone()
        out, _ = self.model.forward(tokens, copy.deepcopy(state), full_output=True)
        return out.view(len(tokens), -1)


@pytest.fixture(scope="session")
def rwkv_oracle():
    """Factory: path -> RwkvPipOracle (the package prints a banner on import; harmless)."""
    return RwkvPipOracle


def random_state_wkv(n_layer: int, n_head: int, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    """A non-zero WKV state [L, H, 64, 64] like a tuned one."""
    return torch.randn(n_layer, n_head, 64, 64, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def make_wkv():
    return random_state_wkv


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same torch seed (one intra-op thread comes from tests/conftest.py)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def world_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer C=64 checkpoint with the full World vocabulary (65536), for tokenizer-level tests."""
    path = tmp_path_factory.mktemp("world") / "tiny-world.pth"
    save_checkpoint(random_checkpoint(n_layer=2, n_embd=64, seed=5), path)
    return path
