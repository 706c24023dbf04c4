"""The one G1 chat template: what is trained is exactly what chat and evaluation feed the model.

Boundary: strings in, strings out (no tokenizer, no torch). A dialogue renders as

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {reply}\\n\\nUser: …\\n\\nAssistant: {reply}\\n\\n

(`System: …` only when the first message is a system one). Inside a message every run of blank lines
(`\\n\\n`, `\\n\\n\\n`, …) becomes one `\\n`, because `\\n\\n` separates turns; `\\r\\n` becomes `\\n` and
content is stripped. A reply is preceded by a space after `Assistant:`. Every assistant turn ends with
`\\n\\n`, and that separator is part of the reply's trainable text so the model learns to stop.
A generation prompt ends with `Assistant:` (no trailing space); the model writes `" reply"` itself.

`render` returns segments so a trainer can mask the loss: `trainable` is True for reply text only
(`" Hello!\\n\\n"`); the `Assistant:` header, user and system text are prompt.

>>> render_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
'User: hi\\n\\nAssistant: Hello!\\n\\n'
>>> render_text([{"role": "user", "content": "a\\n\\nb"}], generation_prompt=True)
'User: a\\nb\\n\\nAssistant:'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TURN_SEPARATOR = "\n\n"
ROLE_HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
# Generation stops when the model starts a new turn (or emits token 0, the end of document).
STOP_STRINGS = (TURN_SEPARATOR + "User", TURN_SEPARATOR + "Assistant", TURN_SEPARATOR + "System")
_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_TURN_START = re.compile(r"(?:^|\n\n)(System|User|Assistant):")


class TemplateError(ValueError):
    """A dialogue cannot be rendered (unknown role, empty content, misplaced system turn, …)."""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text: `role` is system/user/assistant (or "text" for unparsed text);
    `trainable` is True for assistant reply text (the default loss mask)."""

    text: str
    role: str
    trainable: bool


def normalize_content(content: str) -> str:
    """Message text as the template writes it: CRLF → LF, blank-line runs → one `\\n`, stripped.

    >>> normalize_content("  one\\r\\n\\r\\ntwo\\n\\n\\nthree ")
    'one\\ntwo\\nthree'
    """
    return _BLANK_LINES.sub("\n", content.replace("\r\n", "\n").replace("\r", "\n")).strip()


def render(messages: Sequence[Mapping[str, Any]], *, generation_prompt: bool = False) -> list[Segment]:
    """Render `messages` ([{"role", "content"}, …]) to segments whose texts concatenate to the chat text.

    A system message may only come first; every message needs non-empty content after normalization.
    With `generation_prompt`, an `Assistant:` header is appended (the last message must not be an assistant
    one). Raises TemplateError naming the message index.
    """
    if not messages:
        raise TemplateError("no messages to render")
    segments: list[Segment] = []
    for i, message in enumerate(messages):
        role, content = _checked(i, message)
        if role == "system" and i != 0:
            raise TemplateError(f"message {i}: a system message may only come first")
        header = ROLE_HEADERS[role]
        if role == "assistant":
            segments.append(Segment(header, role, False))
            segments.append(Segment(f" {content}{TURN_SEPARATOR}", role, True))
        else:
            segments.append(Segment(f"{header} {content}{TURN_SEPARATOR}", role, False))
    if generation_prompt:
        if messages[-1].get("role") == "assistant":
            raise TemplateError("a generation prompt must not end with an assistant message")
        segments.append(Segment(ROLE_HEADERS["assistant"], "assistant", False))
    return segments


def render_text(messages: Sequence[Mapping[str, Any]], *, generation_prompt: bool = False) -> str:
    """The chat text of `messages` (see `render`)."""
    return "".join(s.text for s in render(messages, generation_prompt=generation_prompt))


def _checked(i: int, message: Mapping[str, Any]) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise TemplateError(f"message {i}: expected an object with role and content, got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLE_HEADERS:
        raise TemplateError(f"message {i}: unknown role {role!r} (expected one of {sorted(ROLE_HEADERS)})")
    if not isinstance(content, str):
        raise TemplateError(f"message {i}: content must be a string, got {type(content).__name__}")
    content = normalize_content(content)
    if not content:
        raise TemplateError(f"message {i}: empty {role} content")
    return role, content


def segment_text(text: str) -> list[Segment]:
    """Split an RWKV-PEFT `{"text": …}` string into segments without re-rendering it.

    The text is kept as given, except that a text ending inside an assistant turn gets the closing `\\n\\n`
    (so such data teaches the model to stop like rendered dialogues do). A turn starts at the beginning of
    the text or after `\\n\\n` with `System:`, `User:` or `Assistant:`; reply text runs from after
    `Assistant:` up to and including the `\\n\\n` before the next turn. Text with no `Assistant:` turn is one
    non-trainable segment of role "text".

    >>> [(s.text, s.trainable) for s in segment_text("User: hi\\n\\nAssistant: Yo")]
    [('User: hi\\n\\n', False), ('Assistant:', False), (' Yo\\n\\n', True)]
    """
    starts = list(_TURN_START.finditer(text))
    if not any(m.group(1) == "Assistant" for m in starts):
        return [Segment(text, "text", False)] if text else []
    segments: list[Segment] = []
    first = starts[0].start() + (2 if text.startswith(TURN_SEPARATOR, starts[0].start()) else 0)
    if first > 0:
        segments.append(Segment(text[:first], "text", False))
    for j, match in enumerate(starts):
        begin = match.start() + (2 if match.group(0).startswith(TURN_SEPARATOR) else 0)
        end = starts[j + 1].start() + 2 if j + 1 < len(starts) else len(text)
        role = match.group(1).lower()
        if role != "assistant":
            segments.append(Segment(text[begin:end], role, False))
            continue
        header_end = match.end()
        reply = text[header_end:end]
        if j + 1 == len(starts) and not reply.endswith(TURN_SEPARATOR):
            reply += TURN_SEPARATOR
        segments.append(Segment(text[begin:header_end], role, False))
        segments.append(Segment(reply, role, True))
    return segments
