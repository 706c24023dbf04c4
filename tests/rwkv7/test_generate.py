"""Sampling, stop strings, streaming completion, and chat turns kept in the recurrent state."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rwkv7.generate import (ChatSession, Completion, SamplingParams, _StopFilter, complete, nucleus_mask,
                            sample_token)
from rwkv7.model import load_model
from rwkv7.state import RWKVState
from rwkv7.template import render_text
from rwkv7.tokenizer import WorldTokenizer


@pytest.fixture(scope="module")
def model(world_checkpoint):
    return load_model(world_checkpoint)


@pytest.fixture(scope="module")
def tokenizer():
    return WorldTokenizer()


def test_sample_token_greedy_nucleus_and_seed():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert sample_token(logits, temperature=0.0, top_p=1.0) == 1
    assert {sample_token(logits, 1.0, top_p=0.01) for _ in range(20)} == {1}
    draws = [sample_token(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) == {1, 2}  # the nucleus at 0.9 holds tokens 1 and 2 only
    again = [sample_token(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == again


@pytest.mark.parametrize("sharpness", [0.5, 3.0, 20.0])
@pytest.mark.parametrize("top_p", [0.1, 0.3, 0.9, 0.99])
def test_nucleus_mask_equals_the_sorted_definition(sharpness, top_p):
    probs = torch.softmax(torch.randn(5000, generator=torch.Generator().manual_seed(7)) * sharpness, dim=-1)
    ordered, order = torch.sort(probs, descending=True)
    keep = (ordered.double().cumsum(-1) - ordered.double()) < top_p
    expected = torch.zeros_like(probs, dtype=torch.bool)
    expected[order[keep]] = True
    assert torch.equal(torch.from_numpy(nucleus_mask(probs.double().numpy(), top_p)), expected)


def test_sampling_params_validate_with_the_key_name():
    with pytest.raises(ValidationError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValidationError, match="temperature"):
        SamplingParams(temperature=-1)


def test_stop_filter_never_streams_part_of_a_stop_string():
    pieces: list[str] = []
    stop = _StopFilter(["\n\nUser"], pieces.append)
    assert not stop.add("Hello") and not stop.add("\n") and not stop.add("\nUs")
    assert "".join(pieces) == "Hello"
    assert stop.add("er: next")
    assert stop.text == "Hello" and "".join(pieces) == "Hello"
    other = _StopFilter(["\n\nUser"], pieces.append)
    assert not other.add("a\n\nb") and other.text == "a\n\nb"


def test_complete_is_reproducible_streams_its_text_and_respects_max_tokens(model, tokenizer):
    prompt = tokenizer.encode(render_text([{"role": "user", "content": "hi"}], generation_prompt=True))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=3)
    streamed: list[str] = []
    first = complete(model, tokenizer, prompt, params=params, on_text=streamed.append)
    second = complete(model, tokenizer, prompt, params=params)
    assert first.token_ids == second.token_ids and len(first.token_ids) <= 12
    assert "".join(streamed) == first.text
    if first.stop_reason == "max_tokens":
        assert first.fed_ids == first.token_ids and first.text == tokenizer.decode(first.token_ids)
    with pytest.raises(ValueError, match="prompt token"):
        complete(model, tokenizer, [], params=params)


def test_chat_keeps_the_conversation_in_the_state(model, tokenizer):
    init = RWKVState.from_wkv(torch.randn(2, 1, 64, 64) * 0.3)
    session = ChatSession(model, tokenizer, state=init, system="Be brief.",
                          params=SamplingParams(max_tokens=6, seed=0, top_p=0.9))
    replies = [session.reply("hello"), session.reply("and again?")]
    text = tokenizer.decode(session.history_ids)
    assert text.startswith("System: Be brief.\n\nUser: hello\n\nAssistant:")
    assert f"Assistant:{replies[0].text}\n\nUser: and again?\n\nAssistant:{replies[1].text}\n\n" in text
    _, replayed = model(torch.tensor([session.history_ids]), init)
    torch.testing.assert_close(session.state.wkv, replayed.wkv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(session.state.att_shift, replayed.att_shift, rtol=1e-4, atol=1e-5)


def test_chat_rereads_only_the_reply_when_a_stop_began_in_a_fed_token(model, tokenizer):
    session = ChatSession(model, tokenizer)
    prompt_ids = tokenizer.encode("User: hi\n\nAssistant:")
    _, prompt_state = model(torch.tensor([prompt_ids]))
    fed = tokenizer.encode(" Yo\n\nUs")  # the model fed "Us" before "er" completed the stop string
    _, fed_state = model(torch.tensor([fed]), prompt_state)
    done = Completion(text=" Yo", token_ids=[*fed, 0], fed_ids=fed, stop_reason="stop_string",
                      prompt_state=prompt_state, state=fed_state)
    state = session._close_turn(done)
    _, expected = model(torch.tensor([tokenizer.encode(" Yo\n\n")]), prompt_state)
    torch.testing.assert_close(state.wkv, expected.wkv)
