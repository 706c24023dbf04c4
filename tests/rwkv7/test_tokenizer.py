"""World tokenizer: ids identical to the `rwkv` package's TRIE_TOKENIZER, for both backends; decoding edges."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from rwkv7.tokenizer import VOCAB_FILE, TokenizerError, WorldTokenizer, load_vocab

SAMPLES = [
    "User: hi\n\nAssistant: Hello!",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 — “quoted” text…",
    "你好，世界！今天天气很好。我们来测试中文分词。",
    "日本語のテキストとEnglish mixed, 한국어도 조금.",
    "emoji 😀👍🏽🇯🇵 family 👨‍👩‍👧 done",
    "def f(x):\n\treturn {'a': x ** 2}  # comment\n\n\nclass A:\n    pass\n",
    "   lots    of     spaces\t\t\ttabs\r\n\r\n" + " " * 200 + "\n" * 7,
    "\x00\x01\x7f control and Ünïcödé façade naïve ｆｕｌｌｗｉｄｔｈ",
    "a" * 300 + "-" * 90,
    "",
]


@pytest.fixture(scope="module")
def trie():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(VOCAB_FILE))


@pytest.fixture(scope="module", params=["python", "rust"])
def tokenizer(request):
    if request.param == "rust":
        pytest.importorskip("pyrwkv_tokenizer")
    return WorldTokenizer(backend=request.param)


def test_ids_identical_to_trie_tokenizer(tokenizer, trie):
    for text in SAMPLES:
        assert tokenizer.encode(text) == trie.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("\n\n".join(SAMPLES)) == trie.encode("\n\n".join(SAMPLES))


def test_known_ids_and_vocab_shape(tokenizer):
    assert tokenizer.encode("User: hi\n\nAssistant: Hello!") == [24281, 59, 4571, 261, 5585, 41693, 59, 36786, 34]
    assert len(tokenizer.vocab) == 65530 and tokenizer.vocab_size == 65536 and tokenizer.vocab[0] == b""


def test_incomplete_utf8_decodes_with_replacement_or_raises_when_strict(tokenizer, trie):
    half_emoji = tokenizer.encode("😀")[:1]
    assert tokenizer.decode_bytes(half_emoji) == trie.decodeBytes(half_emoji) == b"\xf0\x9f"
    assert tokenizer.decode(half_emoji) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        tokenizer.decode(half_emoji, errors="strict")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([70000])
    with pytest.raises(TokenizerError, match="UTF-8"):
        tokenizer.encode("lone \ud800 surrogate")


def test_stream_decoder_emits_only_complete_characters(tokenizer):
    ids = tokenizer.encode("ok 😀👍🏽 你好")
    stream = tokenizer.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "ok 😀👍🏽 你好" and "\ufffd" not in "".join(pieces)


def test_altered_or_missing_vocab_is_refused(tmp_path):
    copy = tmp_path / "vocab.txt"
    shutil.copy(VOCAB_FILE, copy)
    with copy.open("ab") as f:
        f.write(b"65530 'x' 1\r\n")
    with pytest.raises(TokenizerError, match=r"vocab\.txt: sha256 .* differs from the pinned"):
        load_vocab(copy)
    with pytest.raises(TokenizerError, match="not found"):
        WorldTokenizer(tmp_path / "none.txt")


def test_tokenizer_module_does_not_import_torch():
    code = "import sys, rwkv7.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
