"""The G1 chat template: rendering, normalization, masks by segment, and RWKV-PEFT text lines."""

from __future__ import annotations

import pytest

from rwkv7.template import Segment, TemplateError, normalize_content, render, render_text, segment_text

DIALOGUE = [{"role": "system", "content": "You are NEGA."},
            {"role": "user", "content": "hi\n\nthere"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "again?"},
            {"role": "assistant", "content": " Sure.\r\n\r\n\r\nBye "}]


def test_render_text_matches_the_g1_template_by_hand() -> None:
    assert render_text(DIALOGUE) == ("System: You are NEGA.\n\nUser: hi\nthere\n\nAssistant: Hello!\n\n"
                                     "User: again?\n\nAssistant: Sure.\nBye\n\n")


def test_only_reply_text_and_its_closing_separator_are_trainable() -> None:
    segs = render(DIALOGUE[1:3])
    assert segs == [Segment("User: hi\nthere\n\n", "user", False), Segment("Assistant:", "assistant", False),
                    Segment(" Hello!\n\n", "assistant", True)]


def test_generation_prompt_ends_with_assistant_colon() -> None:
    assert render_text(DIALOGUE[:2], generation_prompt=True).endswith("User: hi\nthere\n\nAssistant:")
    with pytest.raises(TemplateError, match="generation prompt"):
        render(DIALOGUE[:3], generation_prompt=True)


def test_normalize_content_never_leaves_a_turn_separator() -> None:
    assert normalize_content("a\n\n\n\nb\n \nc") == "a\nb\nc"
    assert "\n\n" not in normalize_content("x\r\n\r\ny\r\r\nz")


@pytest.mark.parametrize(("messages", "problem"), [
    ([], "no messages"),
    ([{"role": "bot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": "  \n\n "}], "empty user content"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "may only come first"),
])
def test_bad_dialogues_raise_naming_the_problem(messages: list, problem: str) -> None:
    with pytest.raises(TemplateError, match=problem):
        render(messages)


def test_segment_text_keeps_the_text_and_marks_replies() -> None:
    text = "User: q1\n\nAssistant: a1\n\nUser: q2\n\nAssistant: a2"
    segs = segment_text(text)
    assert "".join(s.text for s in segs) == text + "\n\n"
    assert [s.text for s in segs if s.trainable] == [" a1\n\n", " a2\n\n"]
    assert [s.role for s in segs] == ["user", "assistant", "assistant", "user", "assistant", "assistant"]


def test_segment_text_agrees_with_render_on_rendered_dialogues() -> None:
    assert segment_text(render_text(DIALOGUE)) == render(DIALOGUE)


def test_segment_text_without_assistant_turn_is_plain_text() -> None:
    assert segment_text("just some prose\n\nmore") == [Segment("just some prose\n\nmore", "text", False)]
    assert segment_text("") == []


def test_segment_text_with_preamble_keeps_it_as_prompt() -> None:
    segs = segment_text("Intro line\n\nUser: hi\n\nAssistant: yo\n\n")
    assert segs[0] == Segment("Intro line\n\n", "text", False)
    assert [s.text for s in segs if s.trainable] == [" yo\n\n"]


def test_segment_wise_tokens_equal_whole_text_tokens_for_typical_dialogues() -> None:
    """Training encodes segment by segment (as chat feeds prompt, then reply); for G1 text the boundaries
    (after `:` and after `\\n\\n`) are token boundaries anyway, so the ids equal those of the whole text."""
    from rwkv7.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    for messages in (DIALOGUE, [{"role": "user", "content": "I has a apple."},
                                {"role": "assistant", "content": "Say \"I have an apple.\" 🙂 Keep going!"}]):
        pieces = [i for seg in render(messages) for i in tok.encode(seg.text)]
        assert pieces == tok.encode(render_text(messages))
