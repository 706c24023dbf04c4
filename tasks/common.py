"""What every stage shares: typed params sections, stage stats, and jsonl reading with useful errors.

A stage reads its own section of `params.yaml` into a pydantic model (`load_section`); a wrong or unknown key
fails with the full dotted key name. Each stage writes a small stats JSON (`StageStats`) next to its outputs:
counts read / written / dropped by reason and seconds taken.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML

from rwkv7 import jsonl
from rwkv7.atomic import write_json, write_jsonl  # noqa: F401  (re-exported for stages)

DEFAULT_PARAMS = Path("params.yaml")
ID_HASH_CHARS = 16
P = TypeVar("P", bound=BaseModel)


class ParamsError(ValueError):
    """A params.yaml section is missing or invalid; the message names the offending key."""


class DataError(ValueError):
    """An input file cannot be used; the message names the file (and line, where there is one)."""


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    data = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of stage sections")
    return data


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser every `python -m tasks.<stage>` starts from: the module docstring's first paragraph as its
    description and the `--params` option; also sends INFO logs to stderr as `LEVEL logger: message`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=(doc or "").split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help=f"params file (section: {stage})")
    return parser


@contextlib.contextmanager
def stage_errors(stage: str, *errors: type[Exception]) -> Iterator[None]:
    """Around a stage's work in its `main`: bad params or data (and the stage's own `errors`) end the command
    with `<stage>: <message>` on stderr and exit status 1 instead of a traceback."""
    try:
        yield
    except (DataError, ParamsError, *errors) as e:
        raise SystemExit(f"{stage}: {e}") from None


def load_section(model: type[P], section: str, path: str | Path = DEFAULT_PARAMS) -> P:
    """Validate `params.yaml[section]` into `model`; errors name `section.key` and the file."""
    raw = read_params(path).get(section)
    if raw is None:
        raw = {}
    return parse_section(model, section, raw, source=str(path))


def parse_section(model: type[P], section: str, raw: dict[str, Any], source: str = "params") -> P:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join([section, *map(str, err['loc'])])}: {err['msg']}" for err in e.errors()
        )
        raise ParamsError(f"{source}: {problems}") from None


def content_id(prefix: str, messages: list[dict[str, str]]) -> str:
    """Stable record id from content: `<prefix>-<first 16 hex of sha256(canonical JSON of role/content pairs)>`.

    >>> content_id("seed", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])[:5]
    'seed-'
    """
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return f"{prefix}-{hashlib.sha256(canon.encode('utf-8')).hexdigest()[:ID_HASH_CHARS]}"


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; a bad line raises DataError naming file:line."""
    return jsonl.read_jsonl(path, DataError)


class StageStats:
    """Counts for one stage run, written as JSON: read, written, dropped by reason, seconds, extras.

    >>> s = StageStats("dedupe"); s.read += 3; s.drop("exact_duplicate"); s.written += 2
    >>> s.as_dict()["dropped"]
    {'exact_duplicate': 1}
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.read = 0
        self.written = 0
        self.dropped: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}
        self._t0 = time.perf_counter()

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "read": self.read,
            "written": self.written,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": sum(self.dropped.values()),
            "seconds": round(time.perf_counter() - self._t0, 3),
            **self.extra,
        }

    def save(self, path: str | Path) -> dict[str, Any]:
        data = self.as_dict()
        write_json(path, data)
        return data
