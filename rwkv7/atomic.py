"""Files: atomic writes (a crash never leaves a half-written dataset, state or report) and content hashes.

Every writer in the project goes through `atomic_path`: it yields a temporary path in the destination's
directory (same filesystem, so the final `os.replace` is atomic) and renames it into place only when the
block finishes without an exception.

>>> with atomic_path("out/data.bin") as tmp:
...     tmp.write_bytes(payload)          # doctest: +SKIP
>>> save_torch(tensors, "out/state.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# mkstemp makes files readable by their owner only; finished outputs get the permissions a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
HASH_CHUNK_BYTES = 1 << 24


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to `dest`; move it onto `dest` on success, delete it on failure."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj: Any, dest: str | os.PathLike[str]) -> None:
    """`torch.save` atomically, with bytes that depend only on `obj`.

    Given a path, torch names the zip archive's top folder after the file, and our temp names are random;
    through an open file handle it names the folder `archive`, so equal tensors give equal files (DVC hashes them).
    """
    import torch  # here, so the tokenizer and other torch-free users of this module don't load torch

    with atomic_path(dest) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints can be several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(dest: str | os.PathLike[str], text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(dest: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line; returns the number of records written."""
    n = 0
    with atomic_path(dest) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n
