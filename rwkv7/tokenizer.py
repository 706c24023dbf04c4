"""The RWKV World tokenizer: ids identical to the `rwkv` package's TRIE_TOKENIZER. No torch here.

Encoding is greedy longest match over the UTF-8 bytes of the text against the 65529-token vocabulary
`rwkv_vocab_v20230424.txt` (ids 1..65529; id 0 is end-of-document; no BOS/EOS is added).

Vocabulary file: a byte-identical copy of `rwkv/rwkv_vocab_v20230424.txt` from the `rwkv` pip package 0.8.32
(BlinkDL/ChatRWKV, Apache-2.0), shipped here and pinned by sha256 so ids can never drift silently.

Backends: "rust" is the `pyrwkv-tokenizer` package (Rust, ~50x faster encode, ids checked identical by
tests/rwkv7/test_tokenizer.py); "python" is our pure-Python fallback, used when the package is missing.
Decoding is always ours (a byte-table join), since the Rust decoder aborts on incomplete UTF-8.

>>> tok = WorldTokenizer()
>>> tok.encode("User: hi\\n\\nAssistant: Hello!")
[24281, 59, 4571, 261, 5585, 41693, 59, 36786, 34]
>>> tok.decode([24281, 59, 4571])
'User: hi'
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

VOCAB_FILE = Path(__file__).with_name("rwkv_vocab_v20230424.txt")
VOCAB_SHA256 = "8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008"
TOKENIZER_ID = "rwkv_vocab_v20230424"
VOCAB_SIZE = 65536  # embedding rows of World models; ids above 65529 are never produced
END_OF_TEXT = 0
Backend = Literal["auto", "rust", "python"]
_PREFIX = 3  # the Python encoder buckets tokens of 3+ bytes by their first 3 bytes


class TokenizerError(ValueError):
    """The vocabulary file is missing or altered, or a text/id cannot be tokenized."""


def load_vocab(path: str | os.PathLike[str] = VOCAB_FILE, sha256: str | None = VOCAB_SHA256) -> list[bytes]:
    """Token bytes indexed by id (`vocab[0] == b""`, the end-of-document id); checks the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: vocabulary file not found")
    raw = path.read_bytes()
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise TokenizerError(f"{path}: sha256 {hashlib.sha256(raw).hexdigest()} differs from the pinned "
                             f"{sha256}; the vocabulary was altered, ids would not match RWKV models")
    vocab = [b""]
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        idx_text, rest = line.split(" ", 1)
        literal, length = rest.rsplit(" ", 1)
        token = _parse_token(literal)
        if int(idx_text) != len(vocab) or len(token) != int(length):
            raise TokenizerError(f"{path}:{lineno}: malformed vocabulary line {line[:60]!r}")
        vocab.append(token)
    return vocab


def _parse_token(literal: str) -> bytes:
    """A vocabulary entry is a Python str or bytes literal; without a backslash it has no escapes."""
    if "\\" not in literal:
        return literal[2:-1].encode("ascii") if literal[0] == "b" else literal[1:-1].encode("utf-8")
    token = ast.literal_eval(literal)
    return token.encode("utf-8") if isinstance(token, str) else token


class WorldTokenizer:
    """Encode text to RWKV World ids and back. `backend`: "auto" (Rust if installed), "rust" or "python"."""

    def __init__(self, vocab_path: str | os.PathLike[str] = VOCAB_FILE, backend: Backend = "auto") -> None:
        self.vocab_path = Path(vocab_path)
        self.vocab = load_vocab(self.vocab_path)
        self._rust = _rust_tokenizer(self.vocab_path) if backend in ("auto", "rust") else None
        if backend == "rust" and self._rust is None:
            raise TokenizerError("backend 'rust' needs the pyrwkv-tokenizer package (pip install pyrwkv-tokenizer)")
        self.backend = "rust" if self._rust is not None else "python"
        self._ids: dict[bytes, int] = {}
        self._lengths_by_prefix: dict[bytes, list[int]] = {}
        if self._rust is None:
            self._build_python_index()

    def _build_python_index(self) -> None:
        self._ids = {token: i for i, token in enumerate(self.vocab) if token}
        lengths: dict[bytes, set[int]] = {}
        for token in self._ids:
            if len(token) > _PREFIX - 1:
                lengths.setdefault(token[:_PREFIX], set()).add(len(token))
        self._lengths_by_prefix = {p: sorted(ls, reverse=True) for p, ls in lengths.items()}

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (greedy longest match over its UTF-8 bytes)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"text is not encodable as UTF-8 (lone surrogate?): {e}") from None
        if self._rust is not None:
            return list(self._rust.encode(text))
        return self._encode_bytes(data)

    def _encode_bytes(self, data: bytes) -> list[int]:
        ids, i, n, vocab_ids = [], 0, len(data), self._ids
        while i < n:
            token_id = None
            for length in self._lengths_by_prefix.get(data[i:i + _PREFIX], ()):
                token_id = vocab_ids.get(data[i:i + length]) if i + length <= n else None
                if token_id is not None:
                    break
            if token_id is None:  # no longer token matches: the 2-byte token or the single byte
                length = 2 if data[i:i + 2] in vocab_ids and i + 2 <= n else 1
                token_id = vocab_ids[data[i:i + length]]
            ids.append(token_id)
            i += length
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        try:
            return b"".join(self.vocab[i] for i in ids)
        except IndexError:
            bad = [i for i in ids if not 0 <= i < len(self.vocab)]
            raise TokenizerError(f"token ids outside the vocabulary (0..{len(self.vocab) - 1}): {bad[:5]}") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of `ids`; incomplete or invalid UTF-8 becomes U+FFFD unless `errors="strict"`."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decoding for streaming generation: `feed(id)` returns only complete characters."""

    def __init__(self, tokenizer: WorldTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _rust_tokenizer(vocab_path: Path) -> object | None:
    try:
        from pyrwkv_tokenizer import WorldTokenizer as RustWorldTokenizer
    except ImportError:
        return None
    return RustWorldTokenizer(str(vocab_path))
