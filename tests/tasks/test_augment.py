"""augment against local fake LLM servers on 127.0.0.1, driven through the real google-genai client and httpx."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks.augment import (AugmentError, AugmentParams, ProviderUnavailable, RateLimiter, augment, content_id,
                           main, validate_dialogue)
from tasks.common import ParamsError, load_section

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO / "samples" / "seeds.jsonl"
SECRET = "sk-test-DO-NOT-LEAK-0123456789"


def dialogue(i: int, turns: int = 2) -> dict[str, Any]:
    roles = ["user", "assistant"] * turns
    return {"topic": f"topic {i}",
            "messages": [{"role": r, "content": f"{r} line {j} of dialogue {i}"} for j, r in enumerate(roles[:turns])]}


def batch_text(start: int, n: int = 2, extra: list[dict[str, Any]] | None = None) -> str:
    return json.dumps({"topics": [f"topic {start + k}" for k in range(n)],
                       "dialogues": [dialogue(start + k) for k in range(n)] + (extra or [])})


def gemini_ok(text: str, finish: str = "STOP") -> tuple[int, dict[str, Any]]:
    return 200, {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish}],
                 "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 10}}


def openai_ok(text: str, finish: str = "stop") -> tuple[int, dict[str, Any]]:
    return 200, {"id": "x", "object": "chat.completion",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}


class FakeLLM:
    """Serves scripted (status, json) replies in order, then `default`; records every request."""

    def __init__(self, script: list[tuple[int, dict[str, Any]]], default: tuple[int, dict[str, Any]]) -> None:
        self.script, self.default = list(script), default
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, reply = fake.script.pop(0) if fake.script else fake.default
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[FakeLLM] = []

    def start(script: list[tuple[int, dict[str, Any]]], default: tuple[int, dict[str, Any]]) -> FakeLLM:
        servers.append(FakeLLM(script, default))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def params(tmp_path: Path, url: str | None, **kw: Any) -> AugmentParams:
    base = dict(provider="gemini", model="gemini-test", base_url=url, prompts_dir=REPO / "samples" / "prompts",
                rounds=1, templates=["dialogues"], target_count=100, dialogues_per_request=2,
                requests_per_minute=60000, backoff_initial_s=0.01, backoff_max_s=0.02, max_retries=2,
                max_reasks=1, timeout_s=10, cache_dir=tmp_path / "cache")
    return AugmentParams(**{**base, **kw})


def run(tmp_path: Path, p: AugmentParams, env: dict[str, str] | None = None) -> tuple[dict[str, Any], list[dict]]:
    out, stats_path = tmp_path / "augmented.jsonl", tmp_path / "stats.json"
    stats = augment(SEEDS, [], out, stats_path, p, env={"GEMINI_API_KEY": SECRET} if env is None else env)
    assert json.loads(stats_path.read_text()) == stats
    return stats, [json.loads(line) for line in out.read_text().splitlines()]


def test_gemini_success_records_provenance_and_key_header(tmp_path: Path, serve: Any) -> None:
    srv = serve([], gemini_ok(batch_text(0, extra=[{"topic": "bad", "messages": [dialogue(9)["messages"][1]]}])))
    stats, recs = run(tmp_path, params(tmp_path, srv.url, templates=["dialogues", "grammar_explainer"]))
    assert len(srv.requests) == 2
    assert srv.requests[0]["path"] == "/v1beta/models/gemini-test:generateContent"
    assert srv.requests[0]["headers"]["x-goog-api-key"] == SECRET
    assert srv.requests[0]["body"]["generationConfig"]["responseMimeType"] == "application/json"
    assert "NEGA" in srv.requests[0]["body"]["contents"][0]["parts"][0]["text"]
    # Both templates got the same reply: the second copy of each dialogue is an in-run duplicate.
    assert stats["written"] == len(recs) == 2
    assert stats["dropped"] == {"duplicate_in_run": 2, "too_few_turns": 2}
    assert stats["requests"]["http_requests"] == 2 and stats["requests"]["reply_ok"] == 2
    rec = recs[0]
    assert rec["id"] == content_id("gen", rec["messages"]) and rec["id"].startswith("gen-")
    src = rec["source"]
    assert (src["provider"], src["model"], src["template"], src["round"]) == ("gemini", "gemini-test", "dialogues", 0)
    assert len(src["few_shot_ids"]) == 3 and all(i.startswith("seed-") for i in src["few_shot_ids"])
    assert (tmp_path / "cache" / src["cache_key"][:2] / f"{src['cache_key']}.json").is_file()


def test_gemini_429_then_success_is_retried(tmp_path: Path, serve: Any) -> None:
    err = (429, {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}})
    srv = serve([err, (503, {"error": {"code": 503, "message": "busy", "status": "UNAVAILABLE"}})],
                gemini_ok(batch_text(0)))
    stats, recs = run(tmp_path, params(tmp_path, srv.url))
    assert len(srv.requests) == 3 and len(recs) == 2
    assert stats["requests"]["retry_HTTP_429"] == 1 and stats["requests"]["retry_HTTP_503"] == 1


def test_gemini_retries_are_bounded(tmp_path: Path, serve: Any) -> None:
    srv = serve([], (429, {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}))
    with pytest.raises(AugmentError, match="gave up after 3 tries"):
        run(tmp_path, params(tmp_path, srv.url, max_retries=2))
    assert len(srv.requests) == 3


def test_gemini_safety_truncation_and_schema_violation_are_reasked(tmp_path: Path, serve: Any) -> None:
    safety_prompt = (200, {"promptFeedback": {"blockReason": "SAFETY"}})
    safety_candidate = (200, {"candidates": [{"finishReason": "SAFETY"}]})
    truncated = gemini_ok(batch_text(0)[:40], finish="MAX_TOKENS")
    schema_bad = gemini_ok(json.dumps({"dialogues": [{"messages": [{"role": "narrator", "content": "x"}]}]}))
    invalid = gemini_ok("not json at all")
    srv = serve([safety_prompt, gemini_ok(batch_text(0)), truncated, schema_bad, safety_candidate, invalid],
                gemini_ok(batch_text(100)))
    p = params(tmp_path, srv.url, rounds=1, templates=["dialogues", "topics_then_dialogues", "grammar_explainer"],
               max_reasks=1)
    stats, recs = run(tmp_path, p)
    req = stats["requests"]
    assert len(srv.requests) == 6 and req["http_requests"] == 6
    assert (req["reply_blocked"], req["reply_truncated"], req["reply_schema_violation"]) == (2, 1, 1)
    assert req["reply_invalid_json"] == 1 and req["reply_ok"] == 1 and req["requests_given_up"] == 2
    assert [r["source"]["template"] for r in recs] == ["dialogues", "dialogues"]


def test_cache_second_run_makes_no_requests_and_resumes(tmp_path: Path, serve: Any) -> None:
    srv = serve([], gemini_ok(batch_text(0)))
    p = params(tmp_path, srv.url, templates=["dialogues", "grammar_explainer"], rounds=2)
    first, recs1 = run(tmp_path, p)
    n = len(srv.requests)
    second, recs2 = run(tmp_path, p)
    assert n == first["requests"]["http_requests"] > 0
    assert len(srv.requests) == n and "http_requests" not in second["requests"]
    assert second["requests"]["cache_hits"] == n and recs1 == recs2
    # A bigger run reuses every cached reply and asks only for the new rounds.
    third, _ = run(tmp_path, p.model_copy(update={"rounds": 3}))
    assert third["requests"]["cache_hits"] == n and third["requests"]["http_requests"] == len(srv.requests) - n > 0


def test_interrupted_run_resumes_from_cache(tmp_path: Path, serve: Any) -> None:
    bad = (400, {"error": {"code": 400, "message": "bad request", "status": "INVALID_ARGUMENT"}})
    srv = serve([gemini_ok(batch_text(0)), gemini_ok(batch_text(10)), bad], gemini_ok(batch_text(20)))
    p = params(tmp_path, srv.url, templates=["dialogues", "grammar_explainer", "topics_then_dialogues"])
    with pytest.raises(AugmentError, match="HTTP 400"):
        run(tmp_path, p)
    assert not (tmp_path / "augmented.jsonl").exists()
    stats, recs = run(tmp_path, p)
    assert stats["requests"] == {"cache_hits": 2, "http_requests": 1, "reply_ok": 3}
    assert len(srv.requests) == 4 and len(recs) == 6


def test_openai_compatible_success(tmp_path: Path, serve: Any) -> None:
    srv = serve([], openai_ok("```json\n" + batch_text(0, n=3) + "\n```"))
    p = params(tmp_path, srv.url + "/v1", provider="openai", model="rwkv-local", target_count=2)
    stats, recs = run(tmp_path, p, env={"OPENAI_API_KEY": SECRET})
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert req["body"]["model"] == "rwkv-local" and req["body"]["response_format"]["type"] == "json_schema"
    assert len(recs) == stats["written"] == 2 and recs[0]["source"]["provider"] == "openai"


def test_openai_length_finish_is_truncated(tmp_path: Path, serve: Any) -> None:
    srv = serve([openai_ok("{", finish="length")], openai_ok(batch_text(0)))
    stats, recs = run(tmp_path, params(tmp_path, srv.url + "/v1", provider="openai"), env={})
    assert stats["requests"]["reply_truncated"] == 1 and len(recs) == 2
    assert "Authorization" not in srv.requests[0]["headers"]


def test_no_key_skips_with_clear_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stats, recs = run(tmp_path, params(tmp_path, "http://127.0.0.1:9"), env={})
    assert recs == [] and stats["status"] == "skipped" and "GEMINI_API_KEY is not set" in stats["reason"]
    assert [r.message for r in caplog.records if "augment skipped" in r.message]
    with pytest.raises(ProviderUnavailable, match="GEMINI_API_KEY"):
        run(tmp_path, params(tmp_path, None, on_unavailable="fail"), env={})


def test_unreachable_endpoint_and_provider_none(tmp_path: Path) -> None:
    p = params(tmp_path, "http://127.0.0.1:9/v1", provider="openai", max_retries=1)
    stats, recs = run(tmp_path, p, env={})
    assert recs == [] and "unreachable" in stats["reason"]
    stats, recs = run(tmp_path, params(tmp_path, None, provider="none", on_unavailable="fail"))
    assert recs == [] and stats["status"] == "skipped"


def test_key_never_written_or_logged(tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    srv = serve([(429, {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}),
                 gemini_ok("bad json")], gemini_ok(batch_text(0)))
    run(tmp_path, params(tmp_path, srv.url, max_reasks=2))
    srv.default = (403, {"error": {"code": 403, "message": "API key not valid", "status": "PERMISSION_DENIED"}})
    with pytest.raises(AugmentError, match="HTTP 403") as e:
        run(tmp_path, params(tmp_path, srv.url, cache_dir=tmp_path / "c2"))
    assert SECRET not in str(e.value)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) >= 4 and not [f for f in files if SECRET in f.read_text()]
    assert SECRET not in caplog.text


def test_validate_dialogue_reasons() -> None:
    p = AugmentParams(max_turns=4, max_message_chars=10)
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    assert validate_dialogue([u, a], p) is None
    assert validate_dialogue([u], p) == "too_few_turns"
    assert validate_dialogue([u, a] * 3, p) == "too_many_turns"
    assert validate_dialogue([a, u], p) == "not_starting_with_user"
    assert validate_dialogue([u, a, u], p) == "not_ending_with_assistant"
    assert validate_dialogue([u, u, a], p) == "roles_not_alternating"
    assert validate_dialogue([u, {"role": "assistant", "content": " "}], p) == "empty_message"
    assert validate_dialogue([u, {"role": "assistant", "content": "x" * 11}], p) == "message_too_long"


def test_rate_limiter_spaces_requests() -> None:
    now, slept = [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    lim = RateLimiter(30, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        lim.wait()
    assert slept == [2.0, 2.0]


def test_seeds_file_is_valid() -> None:
    p = AugmentParams()
    recs = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    assert 15 <= len(recs) <= 20 and len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["id"] == content_id("seed", r["messages"])
        assert validate_dialogue(r["messages"], p) is None and 2 <= len(r["messages"]) <= 6


def test_params_errors_name_the_key(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("augment:\n  provider: claude\n  api_key: nope\n")
    with pytest.raises(ParamsError, match=r"augment\.provider") as e:
        load_section(AugmentParams, "augment", f)
    assert "augment.api_key" in str(e.value)
    p = params(tmp_path, None, templates=["missing_template"])
    with pytest.raises(ParamsError, match=r"augment\.templates.*missing_template"):
        run(tmp_path, p)


def test_cli_offline_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    f = tmp_path / "params.yaml"
    f.write_text("augment:\n  provider: gemini\n")
    out, stats = tmp_path / "aug.jsonl", tmp_path / "aug.json"
    main(["--params", str(f), "--seeds", str(SEEDS), "--in", str(SEEDS), "--out", str(out), "--stats", str(stats)])
    s = json.loads(stats.read_text())
    assert out.read_text() == "" and s["status"] == "skipped" and s["read"] == 34


def test_real_params_file_section_loads() -> None:
    if not (REPO / "params.yaml").is_file():
        pytest.skip("params.yaml not written yet")
    p = load_section(AugmentParams, "augment", REPO / "params.yaml")
    assert (REPO / p.prompts_dir / p.character_file).is_file()
    assert all((REPO / p.prompts_dir / f"{t}.txt").is_file() for t in p.templates)
