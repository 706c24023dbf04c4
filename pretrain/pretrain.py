"""Pretrain the demo's small RWKV-7 (x070) on the corpus of build_corpus.py; write a BlinkDL-layout checkpoint.

All weights train (bf16 autocast, AdamW, linear warm-up then cosine). The model is `rwkv7.model.RWKV7`; its WKV
runs through `chunked_wkv.wkv7_chunked` (plain torch, float32, no kernel compilation), on CUDA and CPU alike.

Rare-token sharing: tokens seen fewer than `model.min_token_count` times in train.bin share one embedding row and
one head row. The model trains on a compact vocabulary of K kept ids + 1 shared id; the softmax stays exact over
all V = 65536 ids because the shared head row stands for n_rare identical logits, so its logit is raised by
log(n_rare) in the normaliser and the loss of a rare target gets + log(n_rare). On export the compact rows are
scattered back to [V, C] (shared row repeated), so any x070 loader computes the same distribution, and the
repeated rows compress to almost nothing in git.

    python pretrain/pretrain.py --data pretrain/data --out $OUT [--steps N] [--time-budget S] [--device cuda]

Writes to --out: `model.pth` (bf16), `model.json` (provenance), `loss.csv` (step, tokens, lr, train loss,
held-out loss), `log.txt`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from rwkv7.atomic import atomic_path, write_json  # noqa: E402
from rwkv7.checkpoint import HEAD_SIZE, WORLD_VOCAB_SIZE, ModelConfig, default_dims, inspect_checkpoint  # noqa: E402
from rwkv7.model import RWKV7  # noqa: E402
from rwkv7.tokenizer import WorldTokenizer  # noqa: E402
from tasks.common import load_section  # noqa: E402

from chunked_wkv import CHUNK, use_chunked_wkv  # noqa: E402

PARAMS = Path(__file__).with_name("params.yaml")
TIMING_STEPS = 20  # steps timed (after the first, which compiles kernels) to fit the run into time_budget_s
DECAY_SPEED_MIN, DECAY_SPEED_MAX = -7.0, -2.0  # per-channel w0 range at init (slow ... fast decay)
SMALL_INIT = 0.1  # scale of the second low-rank factors (w2, a2, v2, g2) at init
LN_X_POWER = 0.7


class ModelParams(BaseModel):
    """`pretrain/params.yaml[model]`."""

    model_config = ConfigDict(extra="forbid")

    n_layer: int = Field(6, ge=1)
    n_embd: int = Field(256, ge=HEAD_SIZE, multiple_of=HEAD_SIZE)
    min_token_count: int = Field(3, ge=1)


class TrainParams(BaseModel):
    """`pretrain/params.yaml[train]`."""

    model_config = ConfigDict(extra="forbid")

    ctx_len: int = Field(512, ge=2)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    lr_final: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.99, gt=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    steps: int = Field(3000, ge=1)
    time_budget_s: float = Field(330.0, ge=0)  # 0 = no limit: run exactly `steps`
    eval_every: int = Field(250, ge=1)
    seed: int = 0


def compact_vocab(tokens: np.ndarray, min_count: int, vocab_size: int = WORLD_VOCAB_SIZE) -> Tensor:
    """Map World ids → compact ids: kept ids (count ≥ min_count, plus id 0) get 0..K-1, all others K.

    >>> compact_vocab(np.array([5, 5, 7, 0], dtype=np.uint16), 2, vocab_size=8).tolist()
    [0, 2, 2, 2, 2, 1, 2, 2]
    """
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size)
    keep = counts >= min_count
    keep[0] = True
    kept = np.flatnonzero(keep)
    mapping = np.full(vocab_size, kept.size, dtype=np.int64)
    mapping[kept] = np.arange(kept.size)
    return torch.from_numpy(mapping)


def init_model(cfg: ModelConfig, seed: int) -> RWKV7:
    """A fresh model with a training-friendly init (fp32): small embeddings, zero output projections so each
    block starts near identity, per-channel decay speeds from slow to fast, and layer-dependent token-shift mixes.
    """
    torch.manual_seed(seed)
    model = RWKV7(cfg)
    L, C = cfg.n_layer, cfg.n_embd
    channel = torch.arange(C, dtype=torch.float32) / C
    with torch.no_grad():
        model.emb.weight.uniform_(-1e-4, 1e-4)
        model.head.weight.normal_(0.0, 0.5 / math.sqrt(C))
        for ln in [model.ln_out] + [m for b in model.blocks for m in (b.ln1, b.ln2)] + [model.blocks[0].ln0]:
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        for i, block in enumerate(model.blocks):
            att, ffn = block.att, block.ffn
            depth = 1.0 - i / L  # 1 at the first layer, towards 0 at the last
            for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9),
                                ("x_g", 0.2)):
                getattr(att, name).copy_((1.0 - channel.pow(power * depth)).view(1, 1, C))
            ffn.x_k.copy_((1.0 - channel.pow(depth ** 4)).view(1, 1, C))
            shape = 0.85 + (i / max(L - 1, 1)) ** 0.5
            speed = DECAY_SPEED_MIN + (DECAY_SPEED_MAX - DECAY_SPEED_MIN) * channel.pow(shape)
            att.w0.copy_(speed.view(1, 1, C) + 0.5)
            att.a0.zero_()
            att.k_k.fill_(0.85)
            att.k_a.fill_(1.0)
            att.r_k.fill_(-0.04)
            for name in ("w", "a", "v", "g"):
                if hasattr(att, f"{name}1"):
                    getattr(att, f"{name}1").zero_()
                    getattr(att, f"{name}2").normal_(0.0, SMALL_INIT / math.sqrt(getattr(att, f"{name}2").shape[0]))
            if hasattr(att, "v0"):
                att.v0.fill_(1.0)
            bound = 0.5 / math.sqrt(C)
            for lin in (att.receptance, att.key, att.value):
                lin.weight.uniform_(-bound, bound)
            att.output.weight.zero_()
            att.ln_x.weight.fill_(((1 + i) / L) ** LN_X_POWER)
            att.ln_x.bias.zero_()
            ffn.key.weight.uniform_(-bound, bound)
            ffn.value.weight.zero_()
    return model


def exact_loss(hidden: Tensor, head: Tensor, targets: Tensor, n_rare: int) -> Tensor:
    """Mean next-token loss over the full vocabulary from compact logits.

    `hidden [M, C]`, `head [K+1, C]` (last row shared by the n_rare rare ids), `targets [M]` compact ids.
    """
    logits = (hidden @ head.T).float()
    rare = logits.shape[-1] - 1
    logits[:, rare] += math.log(n_rare)
    return F.cross_entropy(logits, targets) + math.log(n_rare) * (targets == rare).float().mean()


def lr_at(step: int, total: int, p: TrainParams) -> float:
    """Linear warm-up to p.lr over p.warmup_steps, then cosine to p.lr_final at `total`."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    progress = min(1.0, (step - p.warmup_steps) / max(1, total - p.warmup_steps))
    return p.lr_final + 0.5 * (p.lr - p.lr_final) * (1.0 + math.cos(math.pi * progress))


def batches(stream: Tensor, ctx_len: int, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of the token stream: (inputs [B, T], next-token targets [B, T])."""
    starts = torch.randint(0, stream.numel() - ctx_len - 1, (batch_size,), generator=gen)
    idx = (starts[:, None] + torch.arange(ctx_len + 1)).to(stream.device)
    window = stream[idx]
    return window[:, :-1], window[:, 1:]


def heldout_batch(docs: list[list[int]], max_len: int, multiple: int) -> tuple[Tensor, Tensor]:
    """Held-out documents as one right-padded batch: (inputs [D, T], targets [D, T] with -1 on padding).

    Each document is cut to `max_len` + 1 tokens; T is rounded up to a multiple of `multiple`.
    """
    cut = [ids[:max_len + 1] for ids in docs]
    T = -(-max(len(ids) - 1 for ids in cut) // multiple) * multiple
    inputs = torch.zeros(len(cut), T, dtype=torch.long)
    targets = torch.full((len(cut), T), -1, dtype=torch.long)
    for i, ids in enumerate(cut):
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, :len(ids) - 1] = torch.tensor(ids[1:])
    return inputs, targets


def heldout_loss(model: RWKV7, batch: tuple[Tensor, Tensor], mapping: Tensor, n_rare: int) -> float:
    """Mean per-token loss over the padded held-out batch (zero state per document), exact over all V ids.
    Right padding cannot change earlier positions, so padded targets are simply left out."""
    inputs, targets = batch
    mask = targets >= 0
    model.eval()
    with torch.no_grad(), torch.autocast(inputs.device.type, dtype=torch.bfloat16,
                                         enabled=inputs.device.type == "cuda"):
        hidden, _ = model(mapping[inputs], return_hidden=True)
        loss = exact_loss(hidden[mask], model.head.weight, mapping[targets[mask]], n_rare)
    model.train()
    return loss.item()


def export_state_dict(model: RWKV7, mapping: Tensor) -> dict[str, Tensor]:
    """BlinkDL x070 state dict in bf16 with emb/head scattered back to [V, C] (shared row for rare ids)."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    cpu_map = mapping.cpu()
    for key in ("emb.weight", "head.weight"):
        sd[key] = sd[key][cpu_map]
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    inspect_checkpoint(sd, source="pretrain export")
    return sd


def save_bytes_stable(sd: dict[str, Tensor], out: Path) -> None:
    """torch.save through a file handle: the zip's top folder is `archive`, so equal tensors → equal bytes."""
    with atomic_path(out) as tmp, tmp.open("wb") as f:
        torch.save(sd, f)


def pretrain(data: Path, out: Path, mp: ModelParams, tp: TrainParams, device: torch.device,
             heldout: Path) -> dict[str, object]:
    """Train, evaluate on the held-out documents, export `model.pth` + `model.json` into `out`."""
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("w", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - start:7.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    mapping = compact_vocab(tokens, mp.min_token_count).to(device)
    n_kept = int(mapping.max().item())
    n_rare = WORLD_VOCAB_SIZE - n_kept
    stream = mapping[torch.from_numpy(tokens.astype(np.int64)).to(device)]
    tok = WorldTokenizer()
    docs = [tok.encode(json.loads(line)["text"]) + [0] for line in heldout.open(encoding="utf-8")]
    eval_batch = tuple(t.to(device) for t in heldout_batch(docs, tp.ctx_len, CHUNK))
    C = mp.n_embd
    cfg = ModelConfig(n_layer=mp.n_layer, n_embd=C, n_head=C // HEAD_SIZE, vocab_size=n_kept + 1,
                      dims=default_dims(C))
    model = init_model(cfg, tp.seed).to(device)
    backend = f"chunked (pretrain/chunked_wkv.py, chunk {CHUNK})"
    log(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"wkv backend {backend}; {tokens.size:,} train tokens; kept {n_kept:,} ids, {n_rare:,} share one row; "
        f"{sum(p.numel() for p in model.parameters()):,} trainable parameters (compact vocab)")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "emb" not in name and not name.endswith(("1", "2")) else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tp.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tp.lr, betas=(tp.beta1, tp.beta2), fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(tp.seed)
    total = tp.steps
    rows: list[dict[str, float]] = []
    initial = heldout_loss(model, eval_batch, mapping, n_rare)
    log(f"held-out loss at init {initial:.4f}")
    t_timing = 0.0
    step = 0
    train_start = time.monotonic()
    while step < total:
        x, y = batches(stream, tp.ctx_len, tp.batch_size, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, tp)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden, _ = model(x, return_hidden=True)
            loss = exact_loss(hidden.flatten(0, 1), model.head.weight, y.flatten(), n_rare)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
        opt.step()
        step += 1
        if step == 1:
            loss.item()
            t_timing = time.monotonic()
            log(f"first step done (kernels compiled), loss {loss.item():.4f}")
        if step == 1 + TIMING_STEPS and tp.time_budget_s > 0:
            loss.item()
            per_step = (time.monotonic() - t_timing) / TIMING_STEPS
            left = tp.time_budget_s - (time.monotonic() - start)
            total = max(step + 1, min(tp.steps, step + int(left / (per_step * 1.08))))  # 8% for evaluations
            log(f"{per_step * 1000:.1f} ms/step ({tp.batch_size * tp.ctx_len / per_step:,.0f} tokens/s); "
                f"planning {total} steps")
        if step % 10 == 0 or step == total:
            row = {"step": step, "tokens": step * tp.batch_size * tp.ctx_len, "lr": lr_at(step - 1, total, tp),
                   "train_loss": loss.item(), "heldout_loss": float("nan")}
            if step % tp.eval_every == 0 or step == total:
                row["heldout_loss"] = heldout_loss(model, eval_batch, mapping, n_rare)
                log(f"step {step}/{total} train {row['train_loss']:.4f} held-out {row['heldout_loss']:.4f} "
                    f"lr {row['lr']:.2e}")
            rows.append(row)
    train_seconds = time.monotonic() - train_start
    with atomic_path(out / "loss.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sd = export_state_dict(model, mapping)
    save_bytes_stable(sd, out / "model.pth")
    final = rows[-1]
    meta = {"format": "BlinkDL RWKV-7 x070 .pth, bf16", "n_layer": mp.n_layer, "n_embd": C, "head_size": HEAD_SIZE,
            "vocab_size": WORLD_VOCAB_SIZE, "dims": cfg.dims, "kept_token_ids": n_kept, "shared_rare_ids": n_rare,
            "parameters": sum(t.numel() for t in sd.values()), "steps": step, "planned_steps": total,
            "tokens_seen": step * tp.batch_size * tp.ctx_len, "train_loss_final": final["train_loss"],
            "heldout_loss_init": initial, "heldout_loss_final": final["heldout_loss"],
            "train_seconds": round(train_seconds, 1), "wkv_backend": backend,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "train_bin_sha256": _manifest(data).get("train_bin_sha256"),
            "model_params": mp.model_dump(), "train_params": tp.model_dump()}
    write_json(out / "model.json", meta)
    log(f"done: {step} steps, held-out {initial:.3f} -> {final['heldout_loss']:.3f}; wrote {out / 'model.pth'}")
    log_file.close()
    return meta


def _manifest(data: Path) -> dict[str, object]:
    path = data / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=PARAMS, help="recipe params (sections: model, train)")
    ap.add_argument("--data", type=Path, default=Path("pretrain/data"), help="build_corpus.py output folder")
    ap.add_argument("--heldout", type=Path, default=Path(__file__).with_name("heldout.jsonl"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, help="override train.steps")
    ap.add_argument("--time-budget", type=float, help="override train.time_budget_s (0 = run exactly --steps)")
    ap.add_argument("--batch-size", type=int, help="override train.batch_size")
    ap.add_argument("--ctx-len", type=int, help="override train.ctx_len")
    ap.add_argument("--n-layer", type=int, help="override model.n_layer")
    ap.add_argument("--n-embd", type=int, help="override model.n_embd")
    args = ap.parse_args(argv)
    mp = load_section(ModelParams, "model", args.params)
    tp = load_section(TrainParams, "train", args.params)
    mp = mp.model_copy(update={k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd))
                               if v is not None})
    tp = tp.model_copy(update={k: v for k, v in (("steps", args.steps), ("time_budget_s", args.time_budget),
                                                 ("batch_size", args.batch_size), ("ctx_len", args.ctx_len))
                               if v is not None})
    if tp.warmup_steps >= tp.steps:
        tp = tp.model_copy(update={"warmup_steps": max(1, tp.steps // 10)})
    torch.backends.cuda.matmul.allow_tf32 = True
    with use_chunked_wkv():
        pretrain(args.data, args.out, mp, tp, torch.device(args.device), args.heldout)


if __name__ == "__main__":
    main()
