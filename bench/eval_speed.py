"""Evaluation cost: loss tokens/s (loss only, and loss + KL to the prompted model) and generation tokens/s.

Random-init models of the given shapes score the first N training records the way `tasks.evaluate` does.
Run from the repo root after the dedupe stage (or point --data at any dialogue jsonl):

    .venv/bin/python bench/eval_speed.py --threads 1 --models 2x128,12x768 --n 24
    python3 bench/eval_speed.py --device cuda --data samples/seeds.jsonl --models 12x768,24x2048   # on the GPU

On CUDA the model is bf16 (as `tasks.evaluate` loads it there) and WKV runs through fla.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from rwkv7.checkpoint import inspect_checkpoint, random_checkpoint
from rwkv7.data import load_samples
from rwkv7.evaluate import consume, generate_responses, score_many
from rwkv7.generate import SamplingParams
from rwkv7.model import build_model
from rwkv7.tokenizer import WorldTokenizer

PROMPTS = ["Who are you?", "Is it I have went?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/dataset/train.jsonl", help="dialogue jsonl to score")
    parser.add_argument("--models", default="2x128", help="comma-separated LxC shapes, e.g. 2x128,12x768")
    parser.add_argument("--n", type=int, default=24, help="records scored per pass")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = WorldTokenizer()
    samples = load_samples(args.data, tok.encode, ctx_len=512)[0][:args.n]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, threads={torch.get_num_threads()}"
    print(f"{where} load={os.getloadavg()[0]:.1f} samples={len(samples)} "
          f"tokens/pass={sum(len(s.ids) - 1 for s in samples)}")
    print("| model | loss tok/s | loss + KL tok/s | generation tok/s |")
    print("|---|---|---|---|")
    for n_layer, n_embd in (tuple(map(int, m.split("x"))) for m in args.models.split(",")):
        sd = random_checkpoint(n_layer, n_embd, seed=0, device=args.device)
        model = build_model(sd, inspect_checkpoint(sd), device=args.device)
        del sd
        prompt = consume(model, tok.encode("System: You are NEGA.\n\n"))
        states = {"prompt": prompt, "state": prompt}  # "prompt" is the reference (no KL); "state" adds the KL pass
        score_many(model, samples[:2], states, args.batch_size, reference="prompt")  # warm-up
        runs = [score_many(model, samples, states, args.batch_size, reference="prompt") for _ in range(3)]
        loss = statistics.median(r["prompt"].tokens_per_second for r in runs)
        with_kl = statistics.median(r["state"].tokens_per_second for r in runs)
        gens = generate_responses(model, tok, PROMPTS, None,
                                  SamplingParams(temperature=1.0, top_p=0.3, max_tokens=48, seed=0))
        gen = sum(g.n_tokens for g in gens) / sum(g.seconds for g in gens)
        print(f"| L{n_layer} C{n_embd} | {loss:.0f} | {with_kl:.0f} | {gen:.1f} |")


if __name__ == "__main__":
    main()
