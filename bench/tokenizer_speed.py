"""Encode speed of our World tokenizer backends against the `rwkv` package's TRIE_TOKENIZER.

Usage: python bench/tokenizer_speed.py [--repeats 5] [--kib 512]
Prints one row per tokenizer: MB/s (median of the repeats), speed-up over TRIE, and whether the ids are
identical to TRIE's on the benchmark text (English prose, code, Chinese, emoji, whitespace runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rwkv7.tokenizer import VOCAB_FILE, WorldTokenizer

SAMPLE = (
    "User: Could you explain how the recurrent state works?\n\nAssistant: Sure. The model keeps a "
    "fixed-size state per layer, so memory does not grow with the context.\n\n"
    "def token_shift(x, shift):\n    return torch.cat((shift[:, None], x[:, :-1]), dim=1)\n\n"
    "循环神经网络的状态在每一层保持固定大小，所以上下文变长时内存不会增加。\n"
    "絵文字も大丈夫 😀👍🏽🇯🇵 👨‍👩‍👧  \t\t  spaces   and\r\n\r\n\n\n"
)


def bench(encode: Callable[[str], list[int]], text: str, repeats: int) -> tuple[float, list[int]]:
    encode(text[:1000])  # warm-up
    times, ids = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = encode(text)
        times.append(time.perf_counter() - start)
    return len(text.encode("utf-8")) / statistics.median(times) / 1e6, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kib", type=int, default=512, help="size of the benchmark text in KiB")
    args = parser.parse_args()
    sample_bytes = len(SAMPLE.encode("utf-8"))
    text = SAMPLE * (args.kib * 1024 // sample_bytes + 1)

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # the oracle: a test dependency, not a runtime one

    candidates: dict[str, Callable[[str], list[int]]] = {"rwkv TRIE_TOKENIZER": TRIE_TOKENIZER(
        str(VOCAB_FILE)).encode}
    candidates["ours, python backend"] = WorldTokenizer(backend="python").encode
    rust = WorldTokenizer()
    if rust.backend == "rust":
        candidates["ours, rust backend (pyrwkv-tokenizer)"] = rust.encode
    rows, reference = [], None
    for name, encode in candidates.items():
        speed, ids = bench(encode, text, args.repeats)
        reference = reference or (speed, ids)
        rows.append((name, speed, speed / reference[0], ids == reference[1]))
    print(f"text: {len(text.encode('utf-8')) / 1e6:.2f} MB, {len(reference[1])} tokens, "
          f"median of {args.repeats} runs ({Path(__file__).name})")
    print(f"| {'tokenizer':40} | {'MB/s':>7} | {'vs TRIE':>7} | ids == TRIE |")
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 9}|-------------|")
    for name, speed, ratio, same in rows:
        print(f"| {name:40} | {speed:7.2f} | {ratio:6.1f}x | {'yes' if same else 'NO':11} |")


if __name__ == "__main__":
    main()
