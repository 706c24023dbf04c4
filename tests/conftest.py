"""Fixtures every test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tests' tiny models gain nothing from threads, and on a busy 2-core box the
    OpenMP barriers of many small ops made the model tests 3x slower (54 s vs 16 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
