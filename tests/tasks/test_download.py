"""download stage: yt-dlp against a local HTTP server on 127.0.0.1, local files, Bilibili routing, safe names."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from tasks.common import ParamsError, load_section, parse_section
from tasks.download import (
    DownloadParams,
    NothingDownloadedError,
    SubtitleParams,
    clean_title,
    download,
    list_sources,
    main,
    route,
    safe_ext,
    safe_stem,
    vtt_to_srt,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "media"
SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,96}\.[a-z0-9]{1,8}$")
FEED = """<?xml version="1.0"?>
<rss version="2.0"><channel><title>NEGA grammar</title><link>{base}/</link><description>d</description>
{items}
</channel></rss>
"""
ITEM = '<item><title>{title}</title><guid>{guid}</guid><enclosure url="{url}" type="video/mp4" length="1"/></item>'


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        self.server.requests.append(self.path)  # type: ignore[attr-defined]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`(base URL, served folder)`: a threaded http.server on 127.0.0.1 with the sample mp4s in it."""
    root = tmp_path / "www"
    root.mkdir()
    for mp4 in SAMPLES.glob("*.mp4"):
        shutil.copy(mp4, root / mp4.name)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def write_feed(root: Path, base: str, entries: list[tuple[str, str, str]], name: str = "feed.xml") -> str:
    """Write an RSS feed of `(title, guid, file name or URL)` enclosures; returns its URL."""
    items = "\n".join(
        ITEM.format(title=title, guid=guid, url=target if ":" in target else f"{base}/{target}")
        for title, guid, target in entries
    )
    (root / name).write_text(FEED.format(base=base, items=items), encoding="utf-8")
    return f"{base}/{name}"


def params(tmp_path: Path, **kw: object) -> DownloadParams:
    return DownloadParams(cache_dir=tmp_path / "cache", retries=0, socket_timeout_s=5, **kw)


def manifest(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))["media"]


def test_direct_file_url(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    out = tmp_path / "media"
    stats = download([f"{base}/nega-articles.mp4"], out, params(tmp_path), tmp_path / "stats.json")
    assert (stats["read"], stats["written"], stats["items_downloaded"], stats["dropped_total"]) == (1, 1, 1, 0)
    assert (out / "generic-nega-articles.mp4").read_bytes() == (root / "nega-articles.mp4").read_bytes()
    [entry] = manifest(out)
    assert entry["media_id"] == "generic-nega-articles" and entry["source"] == f"{base}/nega-articles.mp4"
    with av.open(str(SAMPLES / "nega-articles.mp4")) as container:
        media_s = container.duration / av.time_base
    assert entry["duration_s"] == pytest.approx(media_s, abs=0.1)  # probed with PyAV: the server sends no duration
    assert (out / "archive.txt").read_text() == "generic nega-articles\n"
    assert json.loads((tmp_path / "stats.json").read_text())["written"] == 1


def test_rss_playlist_404_item_is_counted_and_the_rest_arrive(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    feed = write_feed(root, base, [("Articles", "ep1", "nega-articles.mp4"), ("Gone", "ep2", "missing.mp4"),
                                   ("Fewer or less", "ep3", "nega-fewer-less.mp4")])
    out = tmp_path / "media"
    stats = download([feed], out, params(tmp_path))
    assert (stats["read"], stats["written"]) == (2, 2)
    assert stats["dropped"] == {"item_failed": 1}
    [failure] = stats["failures"]
    assert "missing.mp4" in failure["url"] and "404" in failure["error"]
    assert [(e["media_id"], e["title"]) for e in manifest(out)] == [
        ("generic-ep1", "Articles"), ("generic-ep3", "Fewer or less")]
    assert (out / "generic-ep3.mp4").read_bytes() == (root / "nega-fewer-less.mp4").read_bytes()


def test_html_page_with_a_video_element(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    (root / "lesson.html").write_text(
        "<html><head><title>NEGA lesson</title></head><body>"
        '<video controls><source src="nega-past-tense.mp4" type="video/mp4"></video></body></html>')
    out = tmp_path / "media"
    stats = download([f"{base}/lesson.html"], out, params(tmp_path))
    assert (stats["written"], stats["dropped_total"]) == (1, 0)
    [entry] = manifest(out)
    assert (out / entry["file"]).read_bytes() == (root / "nega-past-tense.mp4").read_bytes()
    assert entry["media_id"] == "html5mediaembed-lesson-1" and entry["title"] == "NEGA lesson (1)"


def test_rerun_downloads_nothing_new_and_restores_after_outputs_are_deleted(
        server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    feed = write_feed(root, base, [("A", "ep1", "nega-articles.mp4"), ("B", "ep2", "nega-past-tense.mp4")])
    out, p = tmp_path / "media", params(tmp_path)
    assert download([feed], out, p)["items_downloaded"] == 2
    cached = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cache" / "items").iterdir()}

    again = download([feed], out, p)
    assert (again["items_downloaded"], again["items_restored"], again["written"]) == (0, 2, 2)

    shutil.rmtree(out)  # what DVC does before re-running a stage
    restored = download([feed], out, p)
    assert (restored["items_downloaded"], restored["items_restored"]) == (0, 2)
    assert (out / "generic-ep2.mp4").read_bytes() == (root / "nega-past-tense.mp4").read_bytes()
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cache" / "items").iterdir()} == cached

    feed = write_feed(root, base, [("A", "ep1", "nega-articles.mp4"), ("C", "ep3", "nega-fewer-less.mp4")])
    grown = download([feed], out, p)
    assert (grown["items_downloaded"], grown["items_restored"]) == (1, 1)
    assert sorted(f.name for f in out.glob("*.mp4")) == ["generic-ep1.mp4", "generic-ep3.mp4"]  # ep2 left the feed
    assert (out / "archive.txt").read_text().splitlines() == ["generic ep1", "generic ep2", "generic ep3"]


def test_archive_lines_without_cached_files_are_downloaded_again(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    out, p = tmp_path / "media", params(tmp_path)
    download([f"{base}/nega-articles.mp4"], out, p)
    for f in (tmp_path / "cache" / "items").iterdir():
        f.unlink()
    stats = download([f"{base}/nega-articles.mp4"], out, p)
    assert (stats["items_downloaded"], stats["written"], stats["dropped_total"]) == (1, 1, 0)
    (tmp_path / "cache" / "items" / "generic-nega-articles.json").write_text("{not json")  # a damaged entry
    stats = download([f"{base}/nega-articles.mp4"], out, p)
    assert (stats["items_downloaded"], stats["written"], stats["dropped_total"]) == (1, 1, 0)


def test_local_directory_file_url_and_sibling_subtitles(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(SAMPLES / "nega-articles.mp4", local / "ep one.mp4")
    (local / "ep one.vtt").write_text("WEBVTT\n\n00:00.500 --> 00:02.000\nHello NEGA.\n", encoding="utf-8")
    (local / "notes.txt").write_text("not media")
    out = tmp_path / "media"
    p = params(tmp_path, subtitles=SubtitleParams(take=True))
    stats = download([str(local), (SAMPLES / "nega-fewer-less.mp4").as_uri()], out, p)
    assert (stats["written"], stats["subtitles"], stats["dropped_total"]) == (2, 1, 0)
    stem = safe_stem("Generic", "ep one")  # yt-dlp's id for a file is its name without the extension
    assert stem.startswith("generic-ep_one-")
    names = sorted(f.name for f in out.iterdir())
    assert names == sorted(["archive.txt", "generic-nega-fewer-less.mp4", f"{stem}.mp4", f"{stem}.srt",
                            "manifest.json"])
    assert (out / f"{stem}.srt").read_text() == "1\n00:00:00,500 --> 00:00:02,000\nHello NEGA.\n"


def test_an_edited_local_file_replaces_its_cached_copy(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(SAMPLES / "nega-articles.mp4", local / "ep.mp4")
    out, p = tmp_path / "media", params(tmp_path)
    assert download([str(local)], out, p)["items_downloaded"] == 1
    assert download([str(local)], out, p)["items_restored"] == 1  # unchanged: from the cache

    shutil.copy(SAMPLES / "nega-past-tense.mp4", local / "ep.mp4")  # same name, new content
    stats = download([str(local)], out, p)
    assert (stats["items_downloaded"], stats["local_files_changed"], stats["dropped_total"]) == (1, 1, 0)
    assert (out / "generic-ep.mp4").read_bytes() == (SAMPLES / "nega-past-tense.mp4").read_bytes()
    assert (out / "archive.txt").read_text().splitlines() == ["generic ep"]


def test_a_remote_feed_cannot_pull_local_files(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"private")
    feed = write_feed(root, base, [("Local", "x1", secret.as_uri()), ("Fine", "x2", "nega-articles.mp4")])
    out = tmp_path / "media"
    stats = download([feed], out, params(tmp_path))
    assert stats["written"] == 1 and stats["dropped"] == {"item_failed": 1}
    assert not any(b"private" in f.read_bytes() for f in out.iterdir())


def test_hostile_ids_and_titles_stay_inside_out_dir(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    long_guid = "x" * 500
    feed = write_feed(root, base, [("../../etc/passwd\t\n x", "../../../outside", "nega-articles.mp4"),
                                   ("t/i/t/l/e", "a/b\\c", "nega-past-tense.mp4"),
                                   ("long", long_guid, "nega-fewer-less.mp4")])
    out = tmp_path / "deep" / "media"
    stats = download([feed], out, params(tmp_path))
    assert stats["written"] == 3
    assert {f.parent for f in tmp_path.rglob("*.mp4") if "www" not in f.parts} <= {out, tmp_path / "cache" / "items"}
    media = sorted(f.name for f in out.glob("*.mp4"))
    assert all(SAFE_NAME.match(name) for name in media), media
    titles = [e["title"] for e in manifest(out)]
    assert titles[0] == "../../etc/passwd x" and not any(re.search(r"[\x00-\x1f]", t) for t in titles)


@pytest.mark.parametrize(
    ("media_id", "expected"),
    [("BV1xx411c7mD", "generic-BV1xx411c7mD"), ("../x", "generic-_x-"), ("a\x00b", "generic-a_b-"),
     ("a/b", "generic-a_b-"), ("a_b", "generic-a_b"), ("..", "generic-"), ("名前", "generic-")],
)
def test_safe_stem(media_id: str, expected: str) -> None:
    stem = safe_stem("Generic", media_id)
    assert stem.startswith(expected) and re.fullmatch(r"[A-Za-z0-9_-]+", stem)
    assert stem == safe_stem("Generic", media_id)  # stable across runs


def test_safe_stem_bounds_length_and_keeps_distinct_ids_distinct() -> None:
    a, b = safe_stem("Generic", "y" * 1000 + "a"), safe_stem("Generic", "y" * 1000 + "b")
    assert len(a) == len(b) == 96 and a != b
    assert safe_stem("Generic", "a/b") != safe_stem("Generic", "a_b")
    assert (safe_ext(".MP4"), safe_ext("m4a"), safe_ext("../sh"), safe_ext("x" * 20), safe_ext(None)) == (
        "mp4", "m4a", "bin", "bin", "bin")
    assert clean_title("a\x00b\nc") == "abc" and clean_title("x" * 1000) == "x" * 300


@pytest.mark.parametrize(
    ("url", "extractor"),
    [
        ("https://www.bilibili.com/video/BV1xx411c7mD", "BiliBili"),
        ("https://www.bilibili.com/video/BV1xx411c7mD?p=2", "BiliBili"),
        ("https://space.bilibili.com/12345/lists/67890?type=season", "BilibiliCollectionList"),
        ("https://space.bilibili.com/12345/channel/collectiondetail?sid=67890", "BilibiliCollectionList"),
        ("https://space.bilibili.com/12345/lists/67890?type=series", "BilibiliSeriesList"),
        ("https://space.bilibili.com/12345/favlist?fid=3251543155", "BilibiliFavoritesList"),
        ("https://www.youtube.com/playlist?list=PLxxxxxxxxxxxxxxxx", "YoutubeTab"),
        ("http://127.0.0.1:8000/feed.xml", "Generic"),
    ],
)
def test_route_picks_the_extractor_offline(url: str, extractor: str) -> None:
    assert route(url) == extractor


def test_list_only_lists_without_downloading(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    feed = write_feed(root, base, [("A", "ep1", "nega-articles.mp4"), ("B", "ep2", "nega-past-tense.mp4")])
    p = params(tmp_path, sources=[feed, str(SAMPLES)])
    assert list_sources(p.sources, p) == [
        "generic-ep1", "generic-ep2", "generic-nega-articles", "generic-nega-fewer-less", "generic-nega-past-tense"]
    assert not list((tmp_path / "cache" / "items").glob("*.mp4"))

    yaml = tmp_path / "params.yaml"
    yaml.write_text(f"download:\n  sources: ['{feed}']\n  cache_dir: '{tmp_path / 'cache'}'\n", encoding="utf-8")
    main(["--params", str(yaml), "--list-only", "--out", str(tmp_path / "sources.json")])
    listed = json.loads((tmp_path / "sources.json").read_text())
    assert listed == {"sources": [feed], "media_ids": ["generic-ep1", "generic-ep2"]}
    assert not (tmp_path / "media").exists()


def test_cli_download_and_nothing_downloaded_error(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    yaml = tmp_path / "params.yaml"
    yaml.write_text(f"download:\n  sources: ['{base}/nega-articles.mp4']\n  cache_dir: '{tmp_path / 'c'}'\n")
    main(["--params", str(yaml), "--out", str(tmp_path / "media"), "--stats", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["written"] == 1
    with pytest.raises(NothingDownloadedError, match="missing.mp4"):
        download([f"{base}/missing.mp4"], tmp_path / "m2", params(tmp_path))


def test_params_errors_name_the_key_and_cookies_stay_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ParamsError, match=r"download\.retries"):
        parse_section(DownloadParams, "download", {"retries": -1})
    with pytest.raises(ParamsError, match=r"download\.sorces"):
        parse_section(DownloadParams, "download", {"sorces": []})
    if (SAMPLES.parents[1] / "params.yaml").is_file():  # the shipped params.yaml is valid for this stage
        assert load_section(DownloadParams, "download", SAMPLES.parents[1] / "params.yaml").sources
    secret_path = str(tmp_path / "my-private-cookies.txt")
    monkeypatch.setenv("STATETUNE_COOKIES", secret_path)
    with pytest.raises(ParamsError, match="STATETUNE_COOKIES") as err:
        download([str(SAMPLES)], tmp_path / "media", params(tmp_path))
    assert "my-private-cookies" not in str(err.value)


def test_vtt_to_srt_drops_header_notes_settings_and_tags() -> None:
    vtt = ("WEBVTT Kind: captions\n\nNOTE a comment\n\ncue-1\n00:00:01.000 --> 00:00:02.000 line:0\n"
           "<c.yellow>Hello</c> NEGA\n\n01:02:03.004 --> 01:02:04.500\nsecond\nline\n")
    assert vtt_to_srt(vtt) == (
        "1\n00:00:01,000 --> 00:00:02,000\nHello NEGA\n\n2\n01:02:03,004 --> 01:02:04,500\nsecond\nline\n")
