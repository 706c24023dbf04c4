"""RWKV-7 (x070) for state tuning: model, WKV kernels, tokenizer, state files, training and generation.

Usable on its own (`import rwkv7`); knows nothing of the pipeline in `tasks/` and `flows/`.
"""

from rwkv7.checkpoint import ModelConfig
from rwkv7.model import RWKV7, load_model
from rwkv7.state import RWKVState, load_state, save_state

__all__ = ["RWKV7", "ModelConfig", "RWKVState", "load_model", "load_state", "save_state"]
