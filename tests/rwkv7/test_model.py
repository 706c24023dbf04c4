"""RWKV7 model: parity with the `rwkv` pip package, RNN == sequence, varlen == separate, state plumbing."""

from __future__ import annotations

import weakref

import pytest
import torch

import rwkv7
from rwkv7.model import load_model
from rwkv7.state import RWKVState, save_state

PARITY_REL_TOL = 1e-4
T = 12


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("variant", ["block0_v", "no_block0_v"])
def test_logits_match_rwkv_pip_from_zero_and_runner_state(tiny_checkpoints, rwkv_oracle, make_wkv, variant,
                                                          tmp_path):
    path = tiny_checkpoints[variant]
    model = rwkv7.load_model(path)
    oracle = rwkv_oracle(path)
    tokens = torch.randint(0, model.config.vocab_size, (2, T))
    logits, _ = model(tokens)
    assert logits.shape == (2, T, model.config.vocab_size)
    for row in tokens:
        ours = model(row[None])[0][0]
        assert rel_err(ours, oracle.logits(row.tolist())) < PARITY_REL_TOL
    wkv = make_wkv(model.config.n_layer, model.config.n_head, seed=3)
    save_state(tmp_path / "s.pth", wkv, {"note": "parity"}, model=model)
    init = rwkv7.load_state(tmp_path / "s.pth", model)
    ours = model(tokens[:1], state=init)[0][0]
    runner_file = torch.load(tmp_path / "s.pth", map_location="cpu", weights_only=True)  # as Runner reads it
    time_state = torch.stack([runner_file[f"blocks.{i}.att.time_state"] for i in range(model.config.n_layer)])
    ref = oracle.logits(tokens[0].tolist(), time_state=time_state)
    assert rel_err(ours, ref) < PARITY_REL_TOL
    assert rel_err(ours, oracle.logits(tokens[0].tolist())) > 1e-3, "the injected state must matter"


def test_rnn_steps_equal_full_forward(tiny_path, make_wkv):
    model = load_model(tiny_path)
    tokens = torch.randint(0, model.config.vocab_size, (2, T))
    init = RWKVState.from_wkv(make_wkv(model.config.n_layer, model.config.n_head, seed=1))
    full, final = model(tokens, init)
    state, steps = init, []
    for t in range(T):
        logits, state = model.step(tokens[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    for field in ("att_shift", "wkv", "ffn_shift"):
        torch.testing.assert_close(getattr(state, field), getattr(final, field), rtol=1e-4, atol=1e-5)


def test_split_sequence_continues_from_returned_state(tiny_path):
    model = load_model(tiny_path)
    tokens = torch.randint(0, model.config.vocab_size, (1, T))
    full, _ = model(tokens)
    head, state = model(tokens[:, :5])
    tail, _ = model(tokens[:, 5:], state)
    torch.testing.assert_close(torch.cat((head, tail), dim=1), full, rtol=1e-4, atol=1e-5)


def test_varlen_packing_equals_separate_sequences(tiny_path, make_wkv):
    model = load_model(tiny_path)
    lengths = [5, 1, 9]
    seqs = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lengths]
    init = RWKVState.from_wkv(make_wkv(model.config.n_layer, model.config.n_head, seed=2))
    init.att_shift = torch.randn_like(init.att_shift)
    init.ffn_shift = torch.randn_like(init.ffn_shift)
    cu = torch.tensor([0, 5, 6, 15])
    packed, final = model(torch.cat(seqs, dim=1), init, cu_seqlens=cu)
    assert final.batch_size == len(lengths)
    for i, seq in enumerate(seqs):
        alone, alone_final = model(seq, init)
        torch.testing.assert_close(packed[:, cu[i]:cu[i + 1]], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(final.wkv[:, i], alone_final.wkv[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(final.att_shift[:, i], alone_final.att_shift[:, 0])


def test_batch_one_state_broadcasts_and_hidden_plus_head_gives_logits(tiny_path, make_wkv):
    model = load_model(tiny_path)
    tokens = torch.randint(0, model.config.vocab_size, (3, 4))
    init = RWKVState.from_wkv(make_wkv(model.config.n_layer, model.config.n_head))
    logits, final = model(tokens, init)
    assert final.wkv.shape == (3, 3, 2, 64, 64) and final.att_shift.shape == (3, 3, 128)
    hidden, _ = model(tokens, init, return_hidden=True)
    assert hidden.shape == (3, 4, 128)
    torch.testing.assert_close(model.head(hidden), logits)
    torch.testing.assert_close(model(tokens[1:2], init)[0], logits[1:2], rtol=1e-5, atol=1e-6)


def test_a_forward_keeps_no_activation_alive_for_the_state_and_frees_the_mixed_inputs_before_the_wkv(
        tiny_path, make_wkv, monkeypatch):
    """Memory of a training forward: the shift states own their [S, C] (a view of the norms' [B, T, C] outputs
    kept those alive in every layer until the forward ended), the six mixed inputs are gone before the WKV runs,
    and `hidden_states` gives `run_blocks`' hidden states without collecting the final state."""
    model = load_model(tiny_path)
    cfg = model.config
    param = torch.nn.Parameter(make_wkv(cfg.n_layer, cfg.n_head))
    x = model.embed(torch.randint(0, cfg.vocab_size, (3, 7)))
    mixes, dead_at_recur = [], []
    project, recur = type(model.blocks[0].att).project, type(model.blocks[0].att).recur

    def spy_project(att, *inputs):
        mixes[:] = [weakref.ref(t) for t in inputs]
        return project(att, *inputs)

    def spy_recur(att, *args, **kwargs):
        dead_at_recur.append(all(ref() is None for ref in mixes))
        return recur(att, *args, **kwargs)

    monkeypatch.setattr(type(model.blocks[0].att), "project", spy_project)
    monkeypatch.setattr(type(model.blocks[0].att), "recur", spy_recur)
    shifts = []
    hidden = model.hidden_states(x, RWKVState.from_wkv(param), on_layer_state=lambda a, w, f: shifts.append((a, f)))
    assert dead_at_recur == [True] * cfg.n_layer  # gradients flow through them (layers > 0), yet none is saved
    assert len(shifts) == cfg.n_layer
    for shift in (s for pair in shifts for s in pair):
        assert shift.shape == (3, cfg.n_embd) and shift.untyped_storage().nbytes() == shift.numel() * 4
    reference, final = model.run_blocks(x, RWKVState.from_wkv(param))
    torch.testing.assert_close(hidden, reference, rtol=0, atol=0)
    torch.testing.assert_close(final.att_shift, torch.stack([a for a, _ in shifts]), rtol=0, atol=0)


def test_gradient_reaches_a_trainable_wkv_parameter_only(tiny_path):
    model = load_model(tiny_path)
    assert not any(p.requires_grad for p in model.parameters())
    cfg = model.config
    param = torch.nn.Parameter(torch.zeros(cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size))
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    logits, _ = model(tokens[:, :-1], RWKVState.from_wkv(param))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_bf16_checkpoint_loads_as_float32_and_config_reads_dims(tmp_path):
    from rwkv7.checkpoint import random_checkpoint, save_checkpoint

    sd = random_checkpoint(2, 128, vocab_size=300, dims={"w": 64, "a": 96, "v": 32, "g": 160},
                           dtype=torch.bfloat16)
    save_checkpoint(sd, tmp_path / "bf16.pth")
    model = load_model(tmp_path / "bf16.pth")
    assert model.dtype == torch.float32 and model.config.dims == {"w": 64, "a": 96, "v": 32, "g": 160}
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_bfloat16_model_on_cpu_tracks_float32(tiny_path):
    tokens = torch.randint(0, 1000, (2, 8))
    ref, ref_state = load_model(tiny_path)(tokens)
    logits, state = load_model(tiny_path, dtype=torch.bfloat16)(tokens)
    assert logits.dtype == torch.bfloat16 and state.wkv.dtype == torch.float32
    assert rel_err(logits.float(), ref) < 0.05


def test_forward_rejects_bad_token_shapes(tiny_path):
    model = load_model(tiny_path)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.ones(2, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 3]))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_compiled_head_norm_is_the_groupnorm(tiny_path, dtype, tol):
    """Under torch.compile `ln_x` runs as a layer norm over each head plus the per-head affine (aot_eager here: the
    graph Inductor would get): outputs and input gradients equal the GroupNorm it replaces."""
    att = load_model(tiny_path, dtype=dtype).blocks[1].att
    with torch.no_grad():
        att.ln_x.weight.normal_(1.0, 0.5)
        att.ln_x.bias.normal_(0.0, 0.5)
    out = torch.randn(2, 5, att.n_head, att.head_size, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    results = []
    for fn in (att.head_norm, torch.compile(att.head_norm, backend="aot_eager", fullgraph=True)):
        x = out.clone().requires_grad_()
        y = fn(x)
        y.float().mul(torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.float(), x.grad.float()))
    (eager, d_eager), (compiled, d_compiled) = results
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    torch.testing.assert_close(d_compiled, d_eager, rtol=tol, atol=tol * d_eager.abs().max().item())
