"""RWKV-7 (x070) for state tuning: model, WKV kernels, tokenizer, state files, training and generation.

Usable on its own (`import rwkv7`); knows nothing of the pipeline in `tasks/` and `flows/`.
"""
