"""Write flow parameters into params.yaml, keeping its comments, order and formatting (ruamel.yaml round-trip).

params.yaml stays the single source of configuration: the Prefect UI form only edits it, then DVC sees the
changed keys and re-runs exactly the stages that list them. Example: `set_params("params.yaml",
{"train.epochs": 3})` returns `{"train.epochs": (2, 3)}` when it was 2, and `{}` (file untouched) when it was 3.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from rwkv7.atomic import write_text


class ParamsFileError(ValueError):
    """params.yaml cannot be edited as asked; the message names the file and the dotted key."""


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines (source URLs)
    yaml.indent(mapping=2, sequence=4, offset=2)
    # ruamel writes None as an empty value by default; keep the file's explicit `null`s.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def set_params(path: str | Path, updates: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set dotted keys (`"section.key"`, nested as deep as needed) in the YAML file at `path`.

    Missing sections/keys are created; values equal to the current ones are left alone. The file is rewritten
    (atomically) only when something changed. Returns `{dotted key: (old, new)}` for the keys that changed.
    Raises ParamsFileError when a key's parent exists but is not a mapping.
    """
    path = Path(path)
    yaml = _yaml()
    doc = yaml.load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if doc is None:
        doc = CommentedMap()
    changed: dict[str, tuple[Any, Any]] = {}
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for i, part in enumerate(parents):
            if part not in node:
                node[part] = CommentedMap()
            node = node[part]
            if not isinstance(node, dict):
                raise ParamsFileError(f"{path}: {'.'.join(parents[: i + 1])} is not a mapping, cannot set {dotted}")
        old = node.get(leaf)
        if _plain(old) != value:
            node[leaf] = value
            changed[dotted] = (_plain(old), value)
    if changed:
        buf = io.StringIO()
        yaml.dump(doc, buf)
        write_text(path, buf.getvalue())
    return changed


def _plain(value: Any) -> Any:
    """ruamel's commented containers → plain lists/dicts, for comparison and reporting."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
