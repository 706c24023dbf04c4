"""Stage `download`: fetch the configured media sources into one folder, incrementally, with yt-dlp.

Contract: `params.yaml[download]` (sources + options) → `out_dir/` holding `<extractor>-<id>.<ext>` media files
(+ `<same stem>.srt` where subtitles were taken), `manifest.json` (one entry per media file: media_id, file,
title, source, url, duration_s, subtitles) and `archive.txt` (yt-dlp download archive), + a stats JSON.

Sources: video, playlist and RSS URLs, Bilibili videos / collections (`/lists/…?type=season`) / series /
favlists (any site yt-dlp has an extractor for), and local files, directories (their media files) or
`file://` URLs, which go through the same yt-dlp code path. A local source may use `file://` entries; a remote
playlist may not (a feed must not make us copy local files).

Incremental: each source is first listed without downloading (flat playlist extraction); an item whose files
are already in the content cache (`cache_dir/items/`, which survives DVC's removal of stage outputs) is
restored from it; only new items are downloaded (yt-dlp's `download_archive` lives in the cache too). Each
item that fails (404, geo block, HTTP 412 without cookies) is counted and reported; the rest still arrive.

A cookie file path may come from the environment variable `STATETUNE_COOKIES` (never from params, never logged).
File names never come from titles: `safe_stem(extractor, id)` keeps `[A-Za-z0-9_-]`, bounds the length, and
adds a short hash when it had to change anything, so distinct ids stay distinct.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import yt_dlp
from pydantic import BaseModel, ConfigDict, Field
from yt_dlp.extractor import gen_extractor_classes
from yt_dlp.utils import YoutubeDLError, parse_bytes

from rwkv7.atomic import atomic_path, file_sha256, write_text
from tasks.common import DataError, ParamsError, StageStats, load_section, stage_errors, stage_parser, write_json

log = logging.getLogger(__name__)

COOKIES_ENV = "STATETUNE_COOKIES"
MANIFEST_NAME = "manifest.json"
ARCHIVE_NAME = "archive.txt"
MANIFEST_FORMAT = "statetune-media-manifest/1"
CACHE_META_FORMAT = "statetune-download-item/1"
MEDIA_EXTENSIONS = frozenset(
    {".mp4", ".mkv", ".webm", ".mov", ".avi", ".flv", ".m4a", ".m4v", ".mp3", ".aac", ".opus", ".ogg",
     ".oga", ".wav", ".flac", ".wma", ".mka", ".ts"}
)
SUBTITLE_EXTENSIONS = (".srt", ".vtt")
MAX_STEM_CHARS = 96
STEM_HASH_CHARS = 8
MAX_EXT_CHARS = 8
MAX_TITLE_CHARS = 300
MAX_ERROR_CHARS = 300
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SubtitleParams(BaseModel):
    """`download.subtitles`: take subtitles a video already carries, so transcribe can skip it."""

    model_config = ConfigDict(extra="forbid")

    take: bool = False
    languages: list[str] = Field(default_factory=lambda: ["en", "en-.*"], min_length=1)
    formats: str = "srt/vtt/best"  # yt-dlp subtitlesformat; vtt is converted to srt here, without ffmpeg
    automatic: bool = False  # also accept a site's machine captions


class DownloadParams(BaseModel):
    """`params.yaml[download]`. The cookie file comes from the environment (`STATETUNE_COOKIES`), not from here."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(default_factory=lambda: ["samples/media"])
    format: str = "bestaudio/best"  # audio only where the site offers it; the original container is kept
    retries: int = Field(5, ge=0)
    socket_timeout_s: float = Field(30.0, gt=0)
    rate_limit: str | None = None  # bytes per second, yt-dlp style ("500K", "2M"); None = unlimited
    sleep_between_s: float = Field(0.0, ge=0)  # pause before each download (be polite to real sites)
    max_items_per_source: int | None = Field(None, ge=1)
    subtitles: SubtitleParams = Field(default_factory=SubtitleParams)
    cache_dir: Path = Path(".cache/statetune/download")


class NothingDownloadedError(RuntimeError):
    """Every configured item failed: the stage has nothing to hand on; the message names the failures."""


@dataclass(frozen=True)
class Item:
    """One media item of a source, known before downloading: which extractor, which id, how to fetch it."""

    source: str
    url: str
    extractor: str
    media_id: str
    title: str | None
    local_path: Path | None  # the file, for a local source (its sibling subtitles can be taken)
    ie_key: str | None = None  # the extractor a flat playlist entry names for its URL; None: route by URL

    @property
    def stem(self) -> str:
        return safe_stem(self.extractor, self.media_id)


def safe_stem(extractor: str, media_id: str) -> str:
    """A file stem from an extractor key and a site id: `[A-Za-z0-9_-]`, at most MAX_STEM_CHARS characters.

    >>> safe_stem("BiliBili", "BV1xx411c7mD_p1")
    'bilibili-BV1xx411c7mD_p1'
    >>> safe_stem("Generic", "../../etc/passwd")  # changed → hash of the original appended
    'generic-_etc_passwd-cd162aa0'
    """
    raw = f"{extractor.lower()}-{media_id}"
    stem = _UNSAFE_NAME_CHARS.sub("_", raw).strip("_-")
    if stem == raw and len(stem) <= MAX_STEM_CHARS:
        return stem
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:STEM_HASH_CHARS]
    return f"{stem[: MAX_STEM_CHARS - STEM_HASH_CHARS - 1]}-{digest}"


def safe_ext(ext: str | None) -> str:
    """A lowercase alphanumeric extension of at most MAX_EXT_CHARS characters, else `bin`."""
    ext = (ext or "").lower().lstrip(".")
    return ext if ext.isascii() and ext.isalnum() and len(ext) <= MAX_EXT_CHARS else "bin"


def clean_title(title: Any) -> str | None:
    """A title for the manifest (data, never a path): control characters removed, length bounded."""
    if title is None:
        return None
    return _CONTROL_CHARS.sub("", str(title)).strip()[:MAX_TITLE_CHARS] or None


def route(url: str) -> str:
    """The key of the yt-dlp extractor that handles `url`, chosen as yt-dlp does: the first suitable one.

    >>> route("https://space.bilibili.com/1/lists/2?type=season")
    'BilibiliCollectionList'
    """
    return next(ie.ie_key() for ie in gen_extractor_classes() if ie.suitable(url))


def expand_source(source: str) -> list[tuple[str, Path | None]]:
    """`(url, local path or None)` for a source: a URL as is; a file or `file://` URL; a directory's media files.

    Raises DataError when a source is neither a URL nor an existing path.
    """
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        return [(source, None)]
    path = Path(url2pathname(parsed.path)) if parsed.scheme == "file" else Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)
        return [(p.resolve().as_uri(), p.resolve()) for p in files]
    if path.is_file():
        return [(path.resolve().as_uri(), path.resolve())]
    raise DataError(f"download source {source!r}: not an http(s) URL and no such file or directory")


class _YtdlpLog:
    """Routes yt-dlp's messages to logging; its debug chatter stays out."""

    def debug(self, msg: str) -> None:
        if msg.startswith("[download]") and "has already been recorded" in msg:
            log.info("%s", msg)

    def info(self, msg: str) -> None:
        log.debug("%s", msg)

    def warning(self, msg: str) -> None:
        log.warning("%s", msg)

    def error(self, msg: str) -> None:
        log.debug("%s", msg)  # the same text reaches us as the DownloadError we count and report


def cookie_file(env: dict[str, str] | None = None) -> str | None:
    """The cookie file named by STATETUNE_COOKIES, or None. The path itself is never logged."""
    value = (os.environ if env is None else env).get(COOKIES_ENV)
    if not value:
        return None
    if not Path(value).is_file():
        raise ParamsError(f"the file named by the environment variable {COOKIES_ENV} does not exist")
    return value


def ydl_options(p: DownloadParams, staging: Path, *, local: bool, flat: bool) -> dict[str, Any]:
    """yt-dlp options for one kind of work: listing (`flat`) or downloading; `local` allows file:// URLs."""
    subs = p.subtitles
    opts: dict[str, Any] = {
        "format": p.format,
        # Staging names never carry a site's id or title (too long, hostile); files are renamed when kept.
        "outtmpl": {"default": str(staging / "part%(playlist_index|0)s.%(ext)s")},
        "restrictfilenames": True,
        "windowsfilenames": True,
        "retries": p.retries,
        "fragment_retries": p.retries,
        "extractor_retries": p.retries,
        "socket_timeout": p.socket_timeout_s,
        "sleep_interval": p.sleep_between_s,
        "enable_file_urls": local,
        "writesubtitles": subs.take,
        "writeautomaticsub": subs.take and subs.automatic,
        "subtitleslangs": subs.languages,
        "subtitlesformat": subs.formats,
        "quiet": True,
        "noprogress": True,
        "logger": _YtdlpLog(),
    }
    if p.rate_limit:
        opts["ratelimit"] = parse_bytes(p.rate_limit)
    if p.max_items_per_source:
        opts["playlistend"] = p.max_items_per_source
    if flat:
        opts["extract_flat"] = "in_playlist"
    else:  # never while listing: yt-dlp would leave archived entries out of a playlist's listing
        opts["download_archive"] = str(p.cache_dir / ARCHIVE_NAME)
    cookies = cookie_file()
    if cookies:
        opts["cookiefile"] = cookies
    return opts


def _short(error: Exception) -> str:
    return _CONTROL_CHARS.sub(" ", str(error)).strip()[:MAX_ERROR_CHARS]


def _entries(info: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if info.get("_type") in ("playlist", "multi_video"):
        for entry in info.get("entries") or []:
            if entry:
                yield from _entries(entry)
    else:
        yield info


def list_items(p: DownloadParams, sources: list[str], stats: StageStats) -> list[Item]:
    """List every media item of `sources` without downloading; failures are counted in `stats`."""
    items: dict[str, Item] = {}
    staging = p.cache_dir / "tmp"
    for source in sources:
        for url, local_path in expand_source(source):
            local = local_path is not None
            with yt_dlp.YoutubeDL(ydl_options(p, staging, local=local, flat=True)) as lister:
                try:
                    info = lister.extract_info(url, download=False)
                except YoutubeDLError as e:  # DownloadError, and network errors that bypass it
                    _fail(stats, "source_failed", url, e)
                    continue
                for entry in _entries(info):
                    item = _to_item(lister, entry, source, local_path, stats)
                    if item is not None and item.stem in items:
                        stats.drop("duplicate_id")  # the same extractor + id from two sources: one file
                    elif item is not None:
                        items[item.stem] = item
    return list(items.values())


def _to_item(lister: yt_dlp.YoutubeDL, entry: dict[str, Any], source: str, local_path: Path | None,
             stats: StageStats) -> Item | None:
    """An Item from a (possibly flat) entry; entries without an id (RSS enclosures) are resolved first."""
    url = entry.get("url") if entry.get("_type") in ("url", "url_transparent") else entry.get("webpage_url")
    url = url or entry.get("original_url") or entry.get("url")
    extractor, media_id = entry.get("ie_key") or entry.get("extractor_key"), entry.get("id")
    if not (extractor and media_id):
        try:
            resolved = lister.extract_info(url, download=False, process=False)
        except YoutubeDLError as e:  # DownloadError, and network errors that bypass it
            _fail(stats, "item_failed", url, e)
            return None
        extractor, media_id = resolved.get("extractor_key"), resolved.get("id")
        if not (extractor and media_id):
            _fail(stats, "item_failed", url, YoutubeDLError("the site gave this entry no id"))
            return None
    return Item(source, url, str(extractor), str(media_id), clean_title(entry.get("title")), local_path,
                entry.get("ie_key"))


def _fail(stats: StageStats, reason: str, url: str, error: Exception) -> None:
    stats.drop(reason)
    stats.extra.setdefault("failures", []).append({"url": url, "reason": reason, "error": _short(error)})
    log.warning("%s: %s: %s", reason, url, _short(error))


def vtt_to_srt(vtt: str) -> str:
    """WebVTT text → SRT text: cue timings with commas, settings, tags, NOTE/STYLE blocks and the header dropped.

    >>> print(vtt_to_srt("WEBVTT\\n\\n00:01.000 --> 00:02.500 align:start\\n<b>Hello</b> NEGA\\n"), end="")
    1
    00:00:01,000 --> 00:00:02,500
    Hello NEGA
    """
    cues = []
    for block in re.split(r"\n\s*\n", vtt.replace("\r\n", "\n").replace("\r", "\n")):
        lines = block.strip("\n").split("\n")
        timing = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if timing is None:
            continue
        start, end = (_srt_time(t.split()[0]) for t in lines[timing].split("-->"))
        text = "\n".join(re.sub(r"<[^>]*>", "", line) for line in lines[timing + 1:]).strip()
        if text:
            cues.append(f"{len(cues) + 1}\n{start} --> {end}\n{text}\n")
    return "\n".join(cues)


def _srt_time(t: str) -> str:
    parts = t.strip().replace(",", ".").split(":")
    hours = parts[0] if len(parts) == 3 else "00"
    minutes, seconds = parts[-2], parts[-1]
    return f"{int(hours):02d}:{int(minutes):02d}:{float(seconds):06.3f}".replace(".", ",")


class ItemCache:
    """Downloaded items kept under `root/items/` (`<stem>.<ext>`, `<stem>.srt`, `<stem>.json` metadata)."""

    def __init__(self, root: Path) -> None:
        self.items = root / "items"
        self.archive = root / ARCHIVE_NAME
        self.items.mkdir(parents=True, exist_ok=True)

    def meta(self, stem: str) -> dict[str, Any] | None:
        path = self.items / f"{stem}.json"
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            files_ok = all((self.items / f["file"]).is_file() for f in meta["files"])
        except (json.JSONDecodeError, KeyError, TypeError):  # a damaged entry: download the item again
            return None
        return meta if meta.get("format") == CACHE_META_FORMAT and files_ok else None

    def forget(self, stem: str) -> None:
        """Drop an item's cache entry and its archive lines, so the next fetch downloads it again."""
        meta = self.meta(stem)
        (self.items / f"{stem}.json").unlink(missing_ok=True)
        if meta is not None and self.archive.is_file():
            stale = {f["archive_id"] for f in meta["files"]}
            lines = self.archive.read_text(encoding="utf-8").splitlines()
            write_text(self.archive, "".join(f"{line}\n" for line in lines if line.strip() not in stale))

    def reconcile_archive(self) -> None:
        """Drop archive lines whose files are not cached, so yt-dlp does not skip what we no longer have."""
        if not self.archive.is_file():
            return
        kept: set[str] = set()
        for path in self.items.glob("*.json"):
            meta = self.meta(path.stem)
            if meta is not None:
                kept.update(f["archive_id"] for f in meta["files"])
        lines = self.archive.read_text(encoding="utf-8").splitlines()
        write_text(self.archive, "".join(f"{line}\n" for line in lines if line.strip() in kept))


def probe_seconds(path: Path) -> float | None:
    """Media duration read by PyAV (bundled with faster-whisper), or None when the container does not say."""
    import av  # only needed when the site did not report a duration

    try:
        with av.open(str(path)) as container:
            return round(container.duration / av.time_base, 3) if container.duration else None
    except av.FFmpegError:
        return None


def _take_subtitles(video: dict[str, Any], item: Item, dest: Path, p: DownloadParams) -> str | None:
    """Write the video's subtitles (site-provided, or a local file's sibling .srt/.vtt) to `dest` as SRT."""
    if not p.subtitles.take:
        return None
    candidates = [Path(s["filepath"]) for s in (video.get("requested_subtitles") or {}).values()
                  if s.get("filepath")]
    if item.local_path is not None:
        candidates += [item.local_path.with_suffix(ext) for ext in SUBTITLE_EXTENSIONS]
    for path in candidates:
        if path.is_file() and path.suffix.lower() in SUBTITLE_EXTENSIONS:
            text = path.read_text(encoding="utf-8-sig", errors="replace")
            write_text(dest, vtt_to_srt(text) if path.suffix.lower() == ".vtt" else text)
            return dest.name
    return None


def fetch_item(item: Item, p: DownloadParams, cache: ItemCache, stats: StageStats) -> dict[str, Any] | None:
    """Download one item into the cache; returns its metadata, or None after counting the failure."""
    staging = p.cache_dir / "tmp" / item.stem
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with yt_dlp.YoutubeDL(ydl_options(p, staging, local=item.local_path is not None, flat=False)) as ydl:
            info = ydl.extract_info(item.url, ie_key=item.ie_key, download=True)
        files = [_keep(video, item, p, cache) for video in _entries(info) if video.get("requested_downloads")]
    except YoutubeDLError as e:  # DownloadError, and network errors that bypass it
        _fail(stats, "item_failed", item.url, e)
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not files:
        _fail(stats, "item_failed", item.url, RuntimeError("yt-dlp returned no file (already in its archive?)"))
        return None
    meta = {"format": CACHE_META_FORMAT, "source": item.source, "url": item.url, "files": files,
            "source_sha256": file_sha256(item.local_path) if item.local_path is not None else None}
    write_json(cache.items / f"{item.stem}.json", meta)
    return meta


def _keep(video: dict[str, Any], item: Item, p: DownloadParams, cache: ItemCache) -> dict[str, Any]:
    """Move one downloaded file from staging into the cache under its safe name; returns its manifest entry."""
    path = Path(video["requested_downloads"][0]["filepath"])
    stem = safe_stem(video["extractor_key"], video["id"])
    dest = cache.items / f"{stem}.{safe_ext(path.suffix)}"
    os.replace(path, dest)
    single = video.get("id") == item.media_id
    return {
        "media_id": stem,
        "archive_id": f"{video['extractor_key'].lower()} {video['id']}",
        "file": dest.name,
        "title": clean_title((item.title if single else None) or video.get("title")),
        "url": video.get("webpage_url") or item.url,
        "duration_s": video.get("duration") or probe_seconds(dest),
        "subtitles": _take_subtitles(video, item, cache.items / f"{stem}.srt", p),
    }


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def materialize(out_dir: Path, cache: ItemCache, metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy the items' files from the cache into `out_dir`, drop files an earlier manifest listed but this one
    does not, and write `manifest.json` + `archive.txt`. Returns the manifest entries."""
    entries = [{**f, "source": meta["source"]} for meta in metas for f in meta["files"]]
    wanted = {e["file"] for e in entries} | {e["subtitles"] for e in entries if e["subtitles"]}
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        for old in json.loads(manifest_path.read_text(encoding="utf-8")).get("media", []):
            for name in (old.get("file"), old.get("subtitles")):
                if name and name not in wanted and Path(name).name == name:
                    (out_dir / name).unlink(missing_ok=True)
    for name in sorted(wanted):
        _copy(cache.items / name, out_dir / name)
    for entry in entries:
        entry.pop("archive_id")
    write_json(manifest_path, {"format": MANIFEST_FORMAT, "media": entries})
    archive = cache.archive.read_text(encoding="utf-8") if cache.archive.is_file() else ""
    write_text(out_dir / ARCHIVE_NAME, archive)
    return entries


def download(sources: list[str], out_dir: Path, p: DownloadParams,
             stats_path: Path | None = None) -> dict[str, Any]:
    """Bring every item of `sources` into `out_dir` (restoring cached ones, downloading new ones).

    Returns the stats dict (also written to `stats_path` when given). Raises NothingDownloadedError when
    sources were configured but not a single file arrived; DataError for a source that is no URL and no path.
    """
    stats = StageStats("download")
    cache = ItemCache(p.cache_dir)
    cache.reconcile_archive()
    items = list_items(p, sources, stats)
    stats.read = len(items)
    metas, downloaded, changed = [], 0, 0
    for item in items:
        meta = cache.meta(item.stem)
        if meta is not None and item.local_path is not None and (
                meta.get("source_sha256") != file_sha256(item.local_path)):
            cache.forget(item.stem)  # the local file was edited since it was cached: take the new one
            changed += 1
            meta = None
        if meta is None:
            meta = fetch_item(item, p, cache, stats)
            downloaded += meta is not None
        if meta is not None:
            metas.append(meta)
    entries = materialize(out_dir, cache, metas)
    stats.written = len(entries)
    stats.extra.update(
        sources=len(sources), items_downloaded=downloaded, items_restored=len(metas) - downloaded,
        local_files_changed=changed, subtitles=sum(1 for e in entries if e["subtitles"]),
    )
    result = stats.save(stats_path) if stats_path else stats.as_dict()
    if sources and not entries and stats.dropped:
        raise NothingDownloadedError(f"no media arrived from {len(sources)} sources: {result.get('failures')}")
    log.info("download: %d files (%d items downloaded, %d restored from cache, %d failed)",
             len(entries), downloaded, len(metas) - downloaded, result["dropped_total"])
    return result


def list_sources(sources: list[str], p: DownloadParams) -> list[str]:
    """The media ids (file stems) the sources hold now, in source order, without downloading anything."""
    stats = StageStats("download")
    return [item.stem for item in list_items(p, sources, stats)]


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("download", __doc__)
    ap.add_argument("--out", type=Path, required=True,
                    help="media folder to fill; with --list-only, the JSON file of media ids to write")
    ap.add_argument("--stats", type=Path, help="stats JSON to write")
    ap.add_argument("--list-only", action="store_true", help="list the sources' media ids, download nothing")
    args = ap.parse_args(argv)
    with stage_errors("download", NothingDownloadedError):
        params = load_section(DownloadParams, "download", args.params)
        if args.list_only:
            ids = list_sources(params.sources, params)
            write_json(args.out, {"sources": params.sources, "media_ids": ids})
            log.info("download: %d media ids listed into %s", len(ids), args.out)
        else:
            download(params.sources, args.out, params, args.stats)


if __name__ == "__main__":
    main()
