"""Reading JSON Lines with errors that name the file and line.

>>> list(read_jsonl(path))            # doctest: +SKIP
[(1, {"id": "a"}), (3, {"id": "b"})]  # blank lines are skipped; line numbers are the file's own
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike[str], error: type[Exception] = ValueError
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; a bad line raises `error` naming file:line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
