"""StateTuner: only the state trains, the loss falls, batches never leak state, prompt distillation works."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkv7.checkpoint import inspect_checkpoint, random_checkpoint
from rwkv7.data import (Batch, BucketBatchSampler, PackedBatchSampler, Sample, pack_collate, pack_rows_collate,
                        pad_collate)
from rwkv7.graphs import CaptureError, GraphedLoss, OwnGradient
from rwkv7.model import RWKV7, Block, build_model
from rwkv7.state import RWKVState
from rwkv7.tuning import (NonFiniteLossError, OptimSettings, StateTuner, _ce_and_grad, _ce_and_grad_fusable,
                          _HeadCrossEntropy, lr_at)

VOCAB = 256
FIRST_TOKEN = 1  # every text starts like a dialogue starts ("User"), so a state can prepare for it

def tiny_model(seed: int = 0) -> RWKV7:
    sd = random_checkpoint(n_layer=2, n_embd=64, vocab_size=VOCAB, seed=seed)
    return build_model(sd, inspect_checkpoint(sd))


def fit(module: StateTuner, samples: list[Sample], steps: int, micro_bsz: int = 8) -> None:
    sampler = module.sampler or BucketBatchSampler([s.n_inputs for s in samples], micro_bsz, 0, 4)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=pad_collate)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)


def token_samples(n: int, length: int, seed: int, high: int = VOCAB, skip_first: bool = True) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    rows = [[FIRST_TOKEN, *torch.randint(1, high, (length,), generator=g).tolist()] for _ in range(n)]
    mask = [False, not skip_first] + [True] * (length - 1)
    return [Sample(ids, mask, f"s{i}") for i, ids in enumerate(rows)]


def test_lr_schedule_warms_up_then_follows_the_cosine_to_lr_final() -> None:
    s = OptimSettings(lr_init=1.0, lr_final=0.01, total_steps=20, warmup_steps=4)
    lrs = [lr_at(i, s) for i in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert lrs[12] == pytest.approx(0.505) and lrs[20] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_only_the_state_trains_the_loss_falls_and_weights_stay_bit_identical() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = StateTuner(model, OptimSettings(lr_init=0.1, lr_final=0.01, total_steps=20, warmup_steps=2))
    trainable = [(n, p.numel()) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == [("state_wkv", 2 * 1 * 64 * 64)]
    fit(module, token_samples(16, 16, seed=1, high=12), steps=20, micro_bsz=4)  # small alphabet: learnable
    losses = [r["loss"] for r in module.history]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15  # nats
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and module.state_wkv.abs().sum() > 0


def test_a_nan_step_stops_the_run_at_the_next_step_with_the_state_before_it() -> None:
    """Step 3's loss is NaN: the host learns it while queuing step 4 (it never waits for a step in flight), so the
    run stops there; the history holds steps 1-2 and the kept state is the one that gave step 2 its finite loss."""
    module = StateTuner(tiny_model(), OptimSettings(lr_init=0.1, lr_final=0.1, total_steps=10))
    real_loss, states = module.batch_loss, []

    def loss(batch: Batch) -> tuple[torch.Tensor, int]:
        states.append(module.state_wkv.detach().clone())
        total, n = real_loss(batch)
        return (total * float("nan") if len(states) == 3 else total), n

    module.batch_loss = loss
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at optimizer step 3 \(epoch 1\)") as stopped:
        fit(module, token_samples(16, 16, seed=1), steps=10, micro_bsz=4)
    assert len(states) == 4 and [r["step"] for r in module.history] == [1, 2]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in module.history)
    assert torch.equal(stopped.value.last_good, states[1]) and not torch.equal(states[1], states[0])


def test_embedding_rows_looked_up_before_the_transfer_give_the_same_loss() -> None:
    """`Batch.embedded` (what `on_before_batch_transfer` fills on CUDA with the table on the host) is used as it is:
    the same loss as looking the tokens up, and other rows give another loss."""
    module = StateTuner(tiny_model(), OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1))
    batch = pad_collate(token_samples(3, 12, seed=6))
    rows = module.model.emb(batch.tokens)
    with torch.no_grad():
        plain = module.batch_loss(batch)[0]
        looked_up = module.batch_loss(dataclasses.replace(batch, embedded=rows.clone()))[0]
        other = module.batch_loss(dataclasses.replace(batch, embedded=rows.flip(0)))[0]
        dense = module.dense_loss(module.state_wkv, *module.graph_inputs(dataclasses.replace(batch, embedded=rows)))
    assert looked_up.item() == pytest.approx(plain.item(), rel=1e-6) and dense.item() == pytest.approx(plain.item())
    assert other.item() != pytest.approx(plain.item(), rel=1e-3)
    assert module.on_before_batch_transfer(batch, 0) is batch  # CPU: nothing to pin, nothing looked up early


def test_a_samples_loss_is_the_same_alone_padded_in_a_batch_and_packed() -> None:
    module = StateTuner(tiny_model(), OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1))
    with torch.no_grad():
        module.state_wkv.normal_(0.0, 0.5)
        samples = [token_samples(1, n, seed=n, skip_first=False)[0] for n in (5, 17, 9)]
        alone = [module.batch_loss(pad_collate([s]))[0] for s in samples]
        padded, n_padded = module.batch_loss(pad_collate(samples))
        packed, n_packed = module.batch_loss(pack_collate(samples))
    assert n_padded == n_packed == sum(sum(s.mask[1:]) for s in samples)
    assert padded.item() == pytest.approx(sum(alone).item(), rel=1e-5)
    assert packed.item() == pytest.approx(sum(alone).item(), rel=1e-5)


@pytest.mark.parametrize("grad_cp", [False, True])
def test_dense_and_row_packed_losses_equal_the_masked_loss_and_its_state_gradient(grad_cp: bool) -> None:
    """`dense_loss` (what a CUDA graph captures: every position through the head, mask as weights) of a batch
    padded to a fixed shape, and of the same samples packed into rows that restart at each sample (`starts`),
    equal the masked `batch_loss` of the plainly padded batch in value and in d(initial state); so does the eager
    `batch_loss` of the packed rows."""
    samples = [token_samples(1, n, seed=n)[0] for n in (5, 17, 9)]

    def padded_dense(module: StateTuner) -> tuple[torch.Tensor, int]:
        batch = pad_collate(samples, multiple=8, rows=5)
        assert batch.tokens.shape == (5, 24) and batch.n_targets == int(batch.loss_mask.sum())
        x = module.model.embed(batch.tokens)
        return module.dense_loss(module.state_wkv, x, batch.targets, batch.loss_mask.float()), batch.n_targets

    def rows_dense(module: StateTuner) -> tuple[torch.Tensor, int]:
        batch = pack_rows_collate(samples, width=20, rows=2)  # [17] and [5, 9] (+ 6 padding slots)
        assert batch.starts is not None and batch.starts.sum() == 3 and batch.n_sequences == 3
        x = module.model.embed(batch.tokens)
        return (module.dense_loss(module.state_wkv, x, batch.targets, batch.loss_mask.float(), batch.starts),
                batch.n_targets)

    def rows_scored(module: StateTuner) -> tuple[torch.Tensor, int]:
        """What the graph runs for packed rows: only the scored positions (28 of 40, padded to 40) reach the head."""
        batch = pack_rows_collate(samples, width=20, rows=2)
        assert batch.scored is not None and batch.scored.shape == (40,) and (batch.scored >= 0).sum() == 28
        return module.dense_loss(module.state_wkv, *module.graph_inputs(batch)), batch.n_targets

    variants = (lambda m: m.batch_loss(pad_collate(samples)), padded_dense, rows_dense, rows_scored,
                lambda m: m.batch_loss(pack_rows_collate(samples, width=20, rows=2)))
    results = []
    for variant in variants:
        module = StateTuner(tiny_model(), OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1, grad_cp=grad_cp,
                                                        loss_chunk=7))
        with torch.no_grad():
            module.state_wkv.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
        module.on_fit_start()
        loss, n = variant(module)
        loss.backward()
        module.on_fit_end()
        results.append((loss.item(), n, module.state_wkv.grad.clone()))
    masked, n_masked, g_masked = results[0]
    assert n_masked == sum(sum(s.mask[1:]) for s in samples) and g_masked.abs().sum() > 0
    for loss, n, grad in results[1:]:
        assert n == n_masked
        assert loss == pytest.approx(masked, rel=1e-5)
        assert torch.allclose(grad, g_masked, rtol=1e-4, atol=1e-7)


def test_cuda_graphs_refuse_a_cpu_model() -> None:
    module = StateTuner(tiny_model(), OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1, cuda_graphs=True))
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        module.on_fit_start()


class CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the 2-D matrix products dispatched while active (the projections; the reference WKV uses bmm)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ce_and_grad", [_ce_and_grad, _ce_and_grad_fusable])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_head_cross_entropy_takes_its_gradient_in_forward_and_matches_autograd(
        dtype: torch.dtype, tol: float, ce_and_grad: Callable) -> None:
    """Loss and d(hidden) equal autograd through `F.cross_entropy` (chunks that do not divide the rows, rows of
    weight 0, a scale after the sum), with the eager and the compile-friendly gradient; backward runs no matrix
    product: the head was differentiated in forward."""
    g = torch.Generator().manual_seed(0)
    M, C, V = 23, 16, 50
    head = nn.Linear(C, V, bias=False).to(dtype).requires_grad_(False)
    targets = torch.randint(0, V, (M,), generator=g)
    weights = (torch.rand(M, generator=g) > 0.3).float()
    hidden = torch.randn(M, C, generator=g).to(dtype)
    results = []
    for fused in (False, True):
        rows = hidden.clone().requires_grad_()
        if fused:
            loss = _HeadCrossEntropy.apply(rows, targets, weights, head, 10, ce_and_grad)
        else:
            loss = (F.cross_entropy(head(rows).float(), targets, reduction="none") * weights).sum()
        with CountMatmuls() as counter:
            (loss / 7).backward()
        results.append((loss.detach(), rows.grad.float(), counter.count))
    (want_loss, want_grad, autograd_products), (loss, grad, products) = results
    assert autograd_products == 1 and products == 0
    torch.testing.assert_close(loss, want_loss, rtol=tol, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())
    assert (grad[weights == 0] == 0).all() and grad.abs().sum() > 0


CHEAP_STAGES = ("att_inputs", "recur", "ffn_hidden")


def wrapped_methods(module: StateTuner) -> list:
    """The blocks' methods that fit start replaced (compiled and/or checkpointed), in block order."""
    return [f for b in module.model.blocks for m in (b, b.att) for n, f in vars(m).items()
            if n in ("forward", *CHEAP_STAGES)]


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradient_and_recomputes_what_its_policy_says(policy: str) -> None:
    """All blocks recomputed, or all but the last `grad_cp_keep`: the same state gradient as none. "full" reruns a
    block's matrix products in backward (all but the FFN value); "selective" only the FFN's key and the gates'
    second halves."""
    batch = pad_collate(token_samples(3, 12, seed=4))
    grads, backward_matmuls = [], []
    for grad_cp, keep in ((False, 0), (True, 0), (True, 1)):
        module = StateTuner(tiny_model(), OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1, grad_cp=grad_cp,
                                                        grad_cp_keep=keep, grad_cp_policy=policy))
        module.on_fit_start()
        recomputed = grad_cp and not keep  # two blocks: the last one keeps when keep = 1
        for block, wrapped in zip(module.model.blocks, (grad_cp, recomputed)):
            stages = {"forward": "forward" in vars(block), **{n: n in vars(block) | vars(block.att)
                                                              for n in CHEAP_STAGES}}
            expect = {"forward": wrapped and policy == "full",  # att_inputs: compiled when asked, never recomputed
                      **{n: wrapped and policy == "selective" and n != "att_inputs" for n in CHEAP_STAGES}}
            assert stages == expect
        loss = module.batch_loss(batch)[0]
        with CountMatmuls() as counter:
            loss.backward()
        backward_matmuls.append(counter.count)
        module.on_fit_end()
        assert not wrapped_methods(module)  # fit end restores the plain methods
        grads.append(module.state_wkv.grad)
    assert all(torch.allclose(grads[0], g, rtol=1e-5, atol=1e-7) for g in grads[1:]) and grads[0].abs().sum() > 0
    # Recomputed products per block: layer 0 has 12 (r, k, v, output, FFN key and value, three gates × 2 halves),
    # layer 1 14 (plus the v gate), less the FFN value, whose output no backward needs (checkpointing stops early);
    # selective: the FFN key and the gates' second halves (4 and 5).
    per_block = {"full": (11, 13), "selective": (4, 5)}[policy]
    assert [n - backward_matmuls[0] for n in backward_matmuls[1:]] == [sum(per_block), per_block[0]]


def test_keeping_the_ffn_of_some_blocks_skips_its_recompute_only_and_sits_between_selective_and_keeping_blocks(
        ) -> None:
    """`grad_cp_keep_ffn`: the last block recomputes its attention's cheap stages but not its FFN (one FFN key
    product fewer in backward), for the same gradient, more saved memory than plain selective and less than
    keeping the whole block."""
    batch = pad_collate(token_samples(3, 12, seed=4))
    results = []
    for keep, keep_ffn in ((0, 0), (0, 1), (1, 0)):
        module = StateTuner(tiny_model(), OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1, grad_cp=True,
                                                        grad_cp_policy="selective", grad_cp_keep=keep,
                                                        grad_cp_keep_ffn=keep_ffn))
        module.on_fit_start()
        last = module.model.blocks[-1]
        wrapped = {n for m in (last, last.att) for n in vars(m) if n in CHEAP_STAGES}
        assert wrapped == {(0, 0): {"recur", "ffn_hidden"}, (0, 1): {"recur"}, (1, 0): set()}[keep, keep_ffn]
        with CountMatmuls() as counter:
            saved = saved_bytes(module, batch)
        module.on_fit_end()
        results.append((saved, counter.count, module.state_wkv.grad.clone()))
    (selective, n_selective, grad), (ffn_kept, n_ffn_kept, ffn_grad), (block_kept, _, block_grad) = results
    assert selective < ffn_kept < block_kept
    assert n_ffn_kept == n_selective - 1  # forward and backward alike, but the FFN key is not computed again
    assert torch.allclose(ffn_grad, grad, rtol=1e-5, atol=1e-7) and torch.allclose(block_grad, grad, rtol=1e-5,
                                                                                     atol=1e-7)


def saved_bytes(module: StateTuner, batch: Batch) -> int:
    """Bytes of the activations that one loss keeps for its backward (which it then runs); the frozen weights,
    which every policy keeps, left out."""
    weights = {p.untyped_storage().data_ptr() for p in module.model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = module.batch_loss(batch)[0]
    loss.backward()
    return sum(saved.values())


def test_selective_checkpointing_runs_att_inputs_once_for_no_more_memory_than_recomputing_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LN1, token shift and the six mixes are not recomputed: their backward needs only the block input, which the
    other stages' checkpoints keep, and LN1's per-row statistics."""
    runs = []
    plain = Block.att_inputs
    monkeypatch.setattr(Block, "att_inputs", lambda self, *args: runs.append(1) or plain(self, *args))
    batch = pad_collate(token_samples(3, 12, seed=4))
    results = []
    for recompute_inputs in (False, True):
        module = StateTuner(tiny_model(), OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1, grad_cp=True,
                                                        grad_cp_policy="selective"))
        module.on_fit_start()
        if recompute_inputs:  # what selective did before: att_inputs under a checkpoint of its own
            for block in module.model.blocks:
                block.att_inputs = functools.partial(torch.utils.checkpoint.checkpoint, block.att_inputs,
                                                     use_reentrant=False)
        runs.clear()
        results.append((saved_bytes(module, batch), len(runs), module.state_wkv.grad.clone()))
        module.on_fit_end()
    (ours, once, grad), (recomputed, twice, recomputed_grad) = results
    layers, (B, T) = len(module.model.blocks), batch.tokens.shape
    assert once == layers < twice  # checkpointed, it ran again in backward (not in layer 0: no input needs a gradient)
    assert recomputed <= ours <= recomputed + layers * 2 * B * T * 4  # + LN1's mean and rstd, float32 per position
    assert torch.equal(grad, recomputed_grad) and grad.abs().sum() > 0


@pytest.mark.parametrize("grad_cp,policy", [(False, "full"), (True, "full"), (True, "selective")])
def test_compiled_blocks_give_the_same_loss_and_state_gradient_and_fit_end_restores_eager(grad_cp: bool,
                                                                                          policy: str) -> None:
    """`compile` traces each block, or with selective checkpointing each cheap stage (aot_eager here: the same
    graphs as inductor, no C++ compiler)."""
    samples = token_samples(3, 12, seed=5)
    results = []
    for backend in (None, "aot_eager"):
        module = StateTuner(tiny_model(), OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1, grad_cp=grad_cp,
                                                        grad_cp_policy=policy, compile=backend))
        with torch.no_grad():
            module.state_wkv.copy_(torch.randn(module.state_wkv.shape, generator=torch.Generator().manual_seed(0)))
        module.on_fit_start()
        losses = []
        for collate in (pad_collate, pack_collate):  # fixed shapes, then varlen (cu_seqlens) through the same graphs
            loss, _ = module.batch_loss(collate(samples))
            loss.backward()
            losses.append(loss.detach())
        compiled = [f.args[0] if isinstance(f, functools.partial) else f  # grad_cp wraps
                    for f in wrapped_methods(module)]
        compiled += list(module._compiled.values())  # and the head's losses (cross-entropy, KL)
        module.on_fit_end()
        results.append((torch.stack(losses), module.state_wkv.grad.clone(), compiled))
        assert not wrapped_methods(module)  # fit end restores the plain methods
        assert module._compiled == {}
    (eager_loss, eager_grad, _), (comp_loss, comp_grad, compiled) = results
    blocks = 2 * (3 if policy == "selective" and grad_cp else 1)
    assert len(compiled) == blocks + 2 and all(hasattr(f, "_torchdynamo_orig_callable") for f in compiled)
    assert torch.allclose(comp_loss, eager_loss, rtol=1e-5) and eager_grad.abs().sum() > 0
    assert torch.allclose(comp_grad, eager_grad, rtol=1e-4, atol=1e-7)


def held_out_kl(model: RWKV7, prefix: list[int], wkv: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean per-token KL(prompted ‖ state) on `texts [B, T]`, from the second position on."""
    with torch.no_grad():
        _, prompted = model(torch.tensor([prefix]))
        teacher, _ = model(texts, prompted)  # batch 1: every row starts from it
        student, _ = model(texts, RWKVState.from_wkv(wkv))
    t, s = (F.log_softmax(x[:, 1:], dim=-1) for x in (teacher, student))
    return F.kl_div(s, t, log_target=True, reduction="sum").item() / t[..., 0].numel()


def test_prompt_distillation_cuts_the_kl_to_the_prompted_model_by_80_percent() -> None:
    """The test that state tuning works: a tuned state stands in for a prompt it never saw as text.

    Targets are the model's own next-token distributions after prompt P; training reads the texts without P.
    The first target (predicted from the text's first token alone) is not scored: it depends on the token
    shift, which a state file cannot carry (RWKV-Runner zeroes it).
    """
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, VOCAB, (24,), generator=g).tolist()
    held_out = torch.randint(1, VOCAB, (8, 16), generator=g)
    held_out[:, 0] = FIRST_TOKEN
    zero = held_out_kl(model, prefix, torch.zeros(2, 1, 64, 64), held_out)
    sampler = BucketBatchSampler([16] * 32, 8, seed=0, window_batches=4)
    module = StateTuner(model, OptimSettings(lr_init=0.1, lr_final=0.01, total_steps=40, warmup_steps=2), sampler,
                        distill_prefix=prefix)
    fit(module, token_samples(32, 16, seed=2), steps=40)
    tuned = held_out_kl(model, prefix, module.state_wkv.detach(), held_out)
    assert zero > 1e-3
    assert tuned <= 0.2 * zero, f"KL {zero:.5f} → {tuned:.5f} ({1 - tuned / zero:.0%} reduction)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fla varlen kernel)")
def test_packed_gpu_batch_matches_the_padded_cpu_reference() -> None:
    """GPU training packs a batch into one row with cu_seqlens (fla, bf16, embedding table in host memory);
    loss and state gradient must agree with the float32 padded reference on CPU."""
    pytest.importorskip("fla")
    samples = [token_samples(1, n, seed=n, skip_first=False)[0] for n in (70, 130, 33)]
    results = []
    for device, collate in (("cpu", pad_collate), ("cuda", pack_collate)):
        sd = random_checkpoint(n_layer=2, n_embd=64, vocab_size=VOCAB, seed=0)
        module = StateTuner(build_model(sd, inspect_checkpoint(sd), device=device),
                            OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1), embedding_on_host=True)
        module.on_fit_start()
        assert module.model.emb.weight.device.type == "cpu" and module.model.device.type == device
        with torch.no_grad():
            module.state_wkv.copy_(torch.randn(module.state_wkv.shape, generator=torch.Generator().manual_seed(0)))
        batch = collate(samples)
        batch = type(batch)(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in vars(batch).values()))
        loss, n = module.batch_loss(batch)
        loss.backward()
        module.on_fit_end()
        assert module.model.emb.weight.device.type == device  # the table is back beside the blocks
        results.append((loss.item() / n, module.state_wkv.grad.detach().cpu().flatten()))
    (cpu_loss, cpu_grad), (gpu_loss, gpu_grad) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=2e-2)
    assert F.cosine_similarity(cpu_grad, gpu_grad, dim=0) > 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs, fla)")
@pytest.mark.parametrize("grad_cp", [False, True])
def test_cuda_graph_replays_match_eager_steps_across_shapes_and_state_updates(grad_cp: bool) -> None:
    """The graphed loss (one capture per shape, shared pool) gives the eager `dense_loss` value and state
    gradient, replay after replay, with the state changed in place between steps (as AdamW does)."""
    pytest.importorskip("fla")
    sd = random_checkpoint(n_layer=2, n_embd=128, vocab_size=VOCAB, seed=0)
    module = StateTuner(build_model(sd, inspect_checkpoint(sd), device="cuda"),
                        OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1, grad_cp=grad_cp, loss_chunk=256,
                                      cuda_graphs=True))
    module.on_fit_start()
    batches = [pad_collate([token_samples(1, n, seed=n + i)[0] for i in range(4)], multiple=64, rows=4)
               for n in (100, 60, 120, 40)]  # widths 128, 64, 128, 64: two shapes, each replayed twice
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        batch = _on_cuda(batch)
        with torch.no_grad():
            module.state_wkv.copy_(torch.randn(module.state_wkv.shape, generator=g).cuda() * 0.3)
        _replay_matches_eager(module, batch)
    assert sorted(s[0] for s in module._graphed.shapes) == [(4, 64, 128), (4, 128, 128)]
    # Gradient accumulation: two batches of one shape (the same captured graph) sum their state gradients.
    expected = torch.zeros_like(module.state_wkv)
    module.state_wkv.grad = None
    for batch in (batches[0], batches[2]):
        batch = _on_cuda(batch)
        eager = module.dense_loss(module.state_wkv, *module.graph_inputs(batch))
        expected += torch.autograd.grad(eager, module.state_wkv)[0]
        module.graphed_loss(batch)[0].backward()
    assert torch.allclose(module.state_wkv.grad, expected, rtol=2e-3, atol=1e-5)
    module.on_fit_end()
    assert module._graphed is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs, Triton)")
@pytest.mark.parametrize("backend,policy,compile", [("chunk", "full", None), ("triton", "full", None),
                                                     ("chunk", "selective", "inductor")])
def test_cuda_graph_replays_of_packed_rows_through_our_kernels_match_eager_steps(
        backend: str, policy: str, compile: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed rows (one shape of rows, restarts at each sample; one graph per number of scored positions)
    captured with our WKV kernels: each replay gives the eager loss and state gradient, and the eager loss equals
    the masked loss of the same samples padded one per row. Also with the cheap stages compiled by Inductor and
    recomputed in backward (selective checkpointing, as `bench/train_speed.py --grad-cp-policy selective` runs it)."""
    pytest.importorskip("triton")
    if compile:  # compiled backwards donate their buffers, which refuses the eager check's retain_graph
        monkeypatch.setattr(torch._functorch.config, "donated_buffer", False)
    # The step-by-step kernel's default backward adds with atomics: its order changes from run to run, and bf16
    # rounding downstream can turn that into more than the tolerance (seen once, call S). Deterministic here.
    monkeypatch.setenv("STATETUNE_WKV_TRITON", "atomic=0")
    sd = random_checkpoint(n_layer=2, n_embd=128, vocab_size=VOCAB, seed=0)
    module = StateTuner(build_model(sd, inspect_checkpoint(sd), device="cuda"),
                        OptimSettings(lr_init=1.0, lr_final=1.0, total_steps=1, grad_cp=True, loss_chunk=256,
                                      cuda_graphs=True, wkv_backend=backend, grad_cp_policy=policy, compile=compile))
    module.on_fit_start()
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        samples = [token_samples(1, n, seed=10 * step + i)[0] for i, n in enumerate((90, 30, 120, 60, 17))]
        batch = _on_cuda(pack_rows_collate(samples, width=128, rows=3))
        with torch.no_grad():
            module.state_wkv.copy_(torch.randn(module.state_wkv.shape, generator=g).cuda() * 0.3)
        eager = _replay_matches_eager(module, batch)
        per_sample = module.batch_loss(_on_cuda(pad_collate(samples)))[0]  # not packed, same backend
        assert eager.item() == pytest.approx(per_sample.item(), rel=2e-2)
    assert {s[0] for s in module._graphed.shapes} == {(3, 128, 128)}
    assert all(s[1][0] % 128 == 0 for s in module._graphed.shapes)  # scored positions in steps of a row
    module.on_fit_end()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs, Triton)")
def test_graphed_training_steps_never_wait_for_the_gpu() -> None:
    """Once every shape is captured, a whole Lightning step (host embedding lookup, pinned transfer, graph replays,
    finiteness checks, gradient clipping, AdamW, history) queues its work without one synchronizing call: torch's
    sync debug mode turns any into an error. Every step still gets its history row."""
    pytest.importorskip("triton")
    sd = random_checkpoint(n_layer=2, n_embd=128, vocab_size=VOCAB, seed=0)
    samples = [s for n in range(20, 60) for s in token_samples(2, n, seed=n)]  # 80 samples, ~20 rows of 128
    sampler = PackedBatchSampler([s.n_inputs for s in samples], rows=2, width=128, seed=0)
    module = StateTuner(build_model(sd, inspect_checkpoint(sd), device="cuda"),
                        OptimSettings(lr_init=0.1, lr_final=0.1, total_steps=8, grad_cp=True, loss_chunk=256,
                                      cuda_graphs=True, wkv_backend="chunk"), sampler, embedding_on_host=True)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler,
                                         collate_fn=functools.partial(pack_rows_collate, width=128, rows=2))

    class Strict(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: StateTuner, batch: Batch, i: int) -> None:
            if i == 2:  # batch 0 captured the one shape (all rows > half full: 256 scored positions), 1 ran warm
                torch.cuda.set_sync_debug_mode("error")

        def on_train_end(self, trainer: L.Trainer, pl_module: StateTuner) -> None:
            torch.cuda.set_sync_debug_mode(0)  # Lightning's teardown moves the optimizer state to the CPU

    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[Strict()])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, loader)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [r["step"] for r in module.history] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in module.history)
    assert module._graphed is None and module.model.emb.weight.device == module.model.device  # table back


def _on_cuda(batch: Batch) -> Batch:
    return type(batch)(*(x.cuda() if isinstance(x, torch.Tensor) else x for x in vars(batch).values()))


def _replay_matches_eager(module: StateTuner, batch: Batch) -> torch.Tensor:
    """The graphed loss of `batch` (captured on first sight) equals the eager `dense_loss` in value and state
    gradient; the eager loss's autograd graph stays alive during a capture (no harm; freeing it first made the
    capture of the second shape fail in cuBLAS, calls W and X). Returns the eager loss."""
    eager = module.dense_loss(module.state_wkv, *module.graph_inputs(batch))
    (eager_grad,) = torch.autograd.grad(eager, module.state_wkv, retain_graph=True)
    module.state_wkv.grad = None
    graphed, n = module.graphed_loss(batch)
    graphed.backward()
    assert n == batch.n_targets
    assert graphed.item() == pytest.approx(eager.item(), rel=1e-4)
    assert torch.allclose(module.state_wkv.grad, eager_grad, rtol=2e-3, atol=1e-5)
    return eager.detach()


def test_a_failed_capture_names_the_shape_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    graphed = GraphedLoss.__new__(GraphedLoss)  # no CUDA here: only the error path is exercised
    graphed._graphed = {}

    def out_of_memory(*args: torch.Tensor) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(graphed, "_capture", out_of_memory)
    with pytest.raises(CaptureError, match=r"shape \(2, 64\) failed \(RuntimeError: CUDA out of memory\).*"
                                           r"cuda_graphs: off"):
        graphed(torch.zeros(1), torch.zeros(2, 64, 8), torch.zeros(2, 64, dtype=torch.long), torch.zeros(2, 64))
    assert graphed.shapes == []


def test_own_gradient_keeps_accumulated_gradients_apart_from_a_reused_buffer() -> None:
    """A graphed backward returns the same buffer every replay; through OwnGradient two backward passes sum."""
    buffer = torch.zeros(3)

    class Replayed(torch.autograd.Function):  # stands in for make_graphed_callables' autograd function
        @staticmethod
        def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
            ctx.scale = scale
            return (x * scale).sum()

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
            buffer.fill_(ctx.scale)
            return buffer.detach(), None

    for wrap, expected in ((False, 4.0), (True, 3.0)):  # without the copy: twice the second pass (2 + 2)
        param = torch.nn.Parameter(torch.ones(3))
        for scale in (1.0, 2.0):
            Replayed.apply(OwnGradient.apply(param) if wrap else param, scale).backward()
        assert torch.equal(param.grad, torch.full((3,), expected))


def test_packed_rows_beyond_the_chunked_kernels_room_stop_before_the_transfer() -> None:
    """A batch of packed rows that seq_chunks has no room for is refused as it leaves the host (a ValueError that
    names the setting), before the GPU would stop on a bare device-side assert; rows that fit pass unchanged, and
    other WKV backends are not checked."""
    pytest.importorskip("triton")
    tiny = [Sample([FIRST_TOKEN, 7], [False, True], f"t{i}") for i in range(40)]  # 40 one-token sequences
    crowded = pack_rows_collate(tiny, width=40, rows=1)
    fine = pack_rows_collate(token_samples(2, 30, seed=0), width=40, rows=2)
    chunked = StateTuner(tiny_model(), OptimSettings(lr_init=0.1, lr_final=0.1, total_steps=1, wkv_backend="chunk"))
    with pytest.raises(ValueError, match="STATETUNE_WKV_CHUNK=seq_chunks=0"):
        chunked.on_before_batch_transfer(crowded, 0)
    assert chunked.on_before_batch_transfer(fine, 0) is fine
    other = StateTuner(tiny_model(), OptimSettings(lr_init=0.1, lr_final=0.1, total_steps=1, wkv_backend="triton"))
    assert other.on_before_batch_transfer(crowded, 0) is crowded
