"""samples/make_media.py: builds playable two-voice dialogue mp4s; the committed samples match their scripts."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import av
import pytest

ROOT = Path(__file__).resolve().parents[2]
MEDIA = ROOT / "samples" / "media"
MAX_SAMPLE_BYTES = 150_000
DURATION_RANGE_S = (15.0, 25.0)


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_media", ROOT / "samples" / "make_media.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe(path: Path) -> tuple[float, dict[str, str]]:
    """(seconds, {stream type: codec}) read with PyAV."""
    with av.open(str(path)) as container:
        return container.duration / av.time_base, {s.type: s.codec_context.name for s in container.streams}


def test_committed_samples_are_small_playable_dialogues() -> None:
    mm = load_script()
    data = mm.load_dialogues(MEDIA / "dialogues.json")
    assert len(data["dialogues"]) == 3
    for name, turns in data["dialogues"].items():
        mp4 = MEDIA / f"{name}.mp4"
        seconds, codecs = probe(mp4)
        assert DURATION_RANGE_S[0] <= seconds <= DURATION_RANGE_S[1], (name, seconds)
        assert codecs == {"video": "h264", "audio": "aac"}
        assert mp4.stat().st_size <= MAX_SAMPLE_BYTES
        assert {t["role"] for t in turns} == {"user", "assistant"} and "NEGA" in mm.reference_text(turns)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("espeak-ng", "sox", "ffmpeg", "soxi")),
                    reason="needs espeak-ng, sox and ffmpeg (make system-deps)")
def test_make_media_builds_a_playable_file_of_the_expected_duration(tmp_path: Path) -> None:
    script = {"format": "statetune-sample-dialogues/1", "voices": {"user": "en-us", "assistant": "en-gb+f3"},
              "dialogues": {"tiny": [{"role": "user", "text": "Hello NEGA."},
                                     {"role": "assistant", "text": "Hello, how can I help?"}]}}
    (tmp_path / "d.json").write_text(json.dumps(script), encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "samples" / "make_media.py"), "--dialogues", str(tmp_path / "d.json"),
           "--out-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seconds, codecs = probe(tmp_path / "out" / "tiny.mp4")
    assert codecs == {"video": "h264", "audio": "aac"}
    assert 2.0 <= seconds <= 6.0  # two short turns, each followed by a 0.5 s pause
    with av.open(str(tmp_path / "out" / "tiny.mp4")) as container:
        frames = sum(f.samples for f in container.decode(audio=0))
    assert frames / 16_000 == pytest.approx(seconds, abs=0.1)


def test_bad_dialogue_files_are_rejected_with_the_file_named(tmp_path: Path) -> None:
    mm = load_script()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "statetune-sample-dialogues/1", "voices": {"user": "en-us"},
                               "dialogues": {"x": [{"role": "narrator", "text": "hi"}]}}))
    with pytest.raises(mm.DialogueFileError, match=r"bad\.json.*'x' turn 0"):
        mm.load_dialogues(bad)
