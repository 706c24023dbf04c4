"""Build the sample dialogue videos in `samples/media/` from the scripts in `samples/media/dialogues.json`.

Each dialogue is a few turns between a user (one espeak-ng voice) and NEGA, the Native English Grammar
Assistant (another voice). Every turn is spoken to a WAV by espeak-ng, sox resamples it to 16 kHz mono and
joins the turns with a short pause, and ffmpeg muxes the audio (AAC) with a tiny solid-colour video track
(64x64 at 1 fps) into an mp4 of about 100 KB.

Needs the system tools espeak-ng, sox and ffmpeg (`apt-get install -y espeak-ng sox ffmpeg`); the pipeline
itself never does: the committed mp4 files are what it reads.

    python samples/make_media.py                      # rebuild every sample into samples/media/
    python samples/make_media.py --out-dir /tmp/m --only nega-articles
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DIALOGUES = HERE / "media" / "dialogues.json"
DIALOGUES_FORMAT = "statetune-sample-dialogues/1"
REQUIRED_TOOLS = ("espeak-ng", "sox", "ffmpeg")

SAMPLE_RATE_HZ = 16_000  # Whisper's native rate: no resampling at transcription time
SPEECH_WPM = 165  # a little slower than espeak-ng's default 175 words per minute, for clearer speech
PAUSE_S = 1.2  # silence after each turn: longer than any pause inside a turn, so turns are found by pauses
AUDIO_BITRATE = "32k"
VIDEO_SIZE = "64x64"
VIDEO_FPS = 1
VIDEO_COLORS = ("0x1f3b5c", "0x2e5d3a", "0x5c2e4a")  # one per sample, cycled


class MissingToolError(RuntimeError):
    """A system tool the script needs is not installed; the message says how to install it."""


class DialogueFileError(ValueError):
    """The dialogue scripts file is malformed; the message names the file and the problem."""


def load_dialogues(path: Path = DEFAULT_DIALOGUES) -> dict[str, Any]:
    """Read and check the dialogue scripts: `{"voices": {role: voice}, "dialogues": {name: [turn, ...]}}`.

    Each turn is `{"role": "user" | "assistant", "text": str}`; every role must have a voice.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != DIALOGUES_FORMAT:
        raise DialogueFileError(f"{path}: format must be {DIALOGUES_FORMAT!r}, got {data.get('format')!r}")
    voices = data.get("voices", {})
    for name, turns in data.get("dialogues", {}).items():
        if not turns:
            raise DialogueFileError(f"{path}: dialogue {name!r} has no turns")
        for i, turn in enumerate(turns):
            if turn.get("role") not in voices or not str(turn.get("text", "")).strip():
                raise DialogueFileError(f"{path}: dialogue {name!r} turn {i} needs a voiced role and text")
    return data


def reference_text(turns: list[dict[str, str]]) -> str:
    """The words a dialogue speaks, in order: the reference for word error rate checks."""
    return " ".join(turn["text"] for turn in turns)


def check_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise MissingToolError(
            f"missing system tools: {', '.join(missing)}; install them with "
            "`sudo apt-get install -y espeak-ng sox ffmpeg`"
        )


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")


def speak_dialogue(turns: list[dict[str, str]], voices: dict[str, str], wav_out: Path, work: Path) -> None:
    """Speak each turn with its role's voice and join them, each followed by a pause, into one 16 kHz WAV."""
    parts = []
    for i, turn in enumerate(turns):
        raw, part = work / f"turn{i:02d}.raw.wav", work / f"turn{i:02d}.wav"
        _run(["espeak-ng", "-v", voices[turn["role"]], "-s", str(SPEECH_WPM), "-w", str(raw), turn["text"]])
        _run(["sox", "-R", str(raw), "-c", "1", "-r", str(SAMPLE_RATE_HZ), str(part), "pad", "0", str(PAUSE_S)])
        parts.append(str(part))
    _run(["sox", "-R", *parts, str(wav_out)])


def wav_seconds(wav: Path) -> float:
    done = subprocess.run(["soxi", "-D", str(wav)], capture_output=True, text=True, check=True)
    return float(done.stdout)


def encode_video(wav: Path, mp4_out: Path, color: str) -> None:
    """Mux `wav` as AAC with a solid-colour 64x64, 1 fps H.264 track; metadata stripped for stable files."""
    # An explicit duration: `-shortest` lets the endless lavfi colour source overrun the audio.
    seconds = f"{wav_seconds(wav):.3f}"
    _run([
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y",
        "-f", "lavfi", "-t", seconds, "-i", f"color=c={color}:s={VIDEO_SIZE}:r={VIDEO_FPS}",
        "-i", str(wav), "-t", seconds,
        "-c:v", "libx264", "-threads", "1", "-preset", "veryslow", "-tune", "stillimage", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", AUDIO_BITRATE, "-ac", "1", "-ar", str(SAMPLE_RATE_HZ),
        "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact",
        "-movflags", "+faststart", str(mp4_out),
    ])  # fmt: skip


def make_media(dialogues_path: Path, out_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Build `<out_dir>/<name>.mp4` for each dialogue (or only the named ones); returns the files written."""
    check_tools()
    data = load_dialogues(dialogues_path)
    names = only or list(data["dialogues"])
    unknown = sorted(set(names) - set(data["dialogues"]))
    if unknown:
        raise DialogueFileError(f"{dialogues_path}: no dialogue named {', '.join(unknown)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, name in enumerate(names):
        with tempfile.TemporaryDirectory(prefix="make_media_") as tmp:
            work = Path(tmp)
            wav = work / "dialogue.wav"
            speak_dialogue(data["dialogues"][name], data["voices"], wav, work)
            mp4_tmp = work / f"{name}.mp4"
            encode_video(wav, mp4_tmp, VIDEO_COLORS[index % len(VIDEO_COLORS)])
            shutil.move(mp4_tmp, out_dir / f"{name}.mp4")
        written.append(out_dir / f"{name}.mp4")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=Path, default=DEFAULT_DIALOGUES, help="dialogue scripts JSON")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIALOGUES.parent, help="where the mp4s go")
    parser.add_argument("--only", nargs="*", help="build only these dialogue names")
    args = parser.parse_args(argv)
    try:
        for path in make_media(args.dialogues, args.out_dir, args.only):
            print(f"{path} ({path.stat().st_size // 1024} KiB)")
    except (MissingToolError, DialogueFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
