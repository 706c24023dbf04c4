"""RWKV-7 (x070) for state tuning: model, WKV kernels, tokenizer, state files, training and generation.

Usable on its own (`import rwkv7`); knows nothing of the pipeline in `tasks/` and `flows/`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names, imported on first use so that `import rwkv7.tokenizer` stays free of torch.
_EXPORTS = {
    "ModelConfig": "rwkv7.checkpoint",
    "RWKV7": "rwkv7.model",
    "load_model": "rwkv7.model",
    "RWKVState": "rwkv7.state",
    "load_state": "rwkv7.state",
    "save_state": "rwkv7.state",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rwkv7' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
