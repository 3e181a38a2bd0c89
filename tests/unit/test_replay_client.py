"""The replay client's bookkeeping: how each way a response can end is classified (ok, a clear error,
lost), what it measures, the summaries, and that it refuses non-local targets. The server side here is
an in-process transport serving canned responses (the live gateway is exercised by tests/e2e/test_replay.py)."""

import asyncio
import json

import httpx
import pytest

from loadtest.replay_client import ReplayRequest, Result, check_local, error_counts, prompt_of, send, summarise

REQ = ReplayRequest(rid=7, model="m", at_s=0.0, input_tokens=20, output_tokens=3)


def sse(*events: dict | str) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def run(handler) -> tuple[Result, dict]:
    seen = {}

    def wrapped(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        seen["auth"] = request.headers["authorization"]
        return handler(request)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(wrapped)) as client:
            res = Result(REQ.rid, REQ.model, REQ.at_s)
            await send(client, "http://127.0.0.1:1", "k", REQ, res)
            return res

    return asyncio.run(go()), seen


def test_a_finished_stream_is_ok_with_its_outcome_and_token_count():
    body = sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, chunk("a"), chunk("b"), chunk("c"),
               {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}}, "[DONE]")
    res, seen = run(lambda r: httpx.Response(200, content=body, headers={"x-warmserve-outcome": "prewarm_hit"}))
    assert (res.end, res.status, res.outcome, res.completion_tokens, res.error) == ("ok", 200, "prewarm_hit", 3, None)
    assert res.ttft_s is not None and res.tpot_s is not None and res.e2e_s >= res.ttft_s
    assert seen["body"]["stream"] and seen["body"]["max_tokens"] == 3 and seen["body"]["model"] == "m"
    assert seen["auth"] == "Bearer k"


def test_an_openai_error_body_is_a_clear_error_and_a_bare_5xx_is_lost():
    err = {"error": {"message": "No instance of 'm' within 60 s", "type": "server_error", "code": "no_capacity"}}
    res, _ = run(lambda r: httpx.Response(503, json=err))
    assert (res.end, res.status, res.error) == ("error", 503, "no_capacity: No instance of 'm' within 60 s")
    res, _ = run(lambda r: httpx.Response(502, content=b"<html>bad gateway</html>"))
    assert res.end == "lost" and "without an OpenAI error body" in res.error


def test_an_error_event_mid_stream_is_an_error_and_a_stream_cut_short_is_lost():
    died = {"error": {"message": "worker-0 stopped", "type": "server_error", "code": "responder_lost"}}
    res, _ = run(lambda r: httpx.Response(200, content=sse(chunk("a"), died, "[DONE]")))
    assert (res.end, res.error) == ("error", "responder_lost: worker-0 stopped")
    res, _ = run(lambda r: httpx.Response(200, content=sse(chunk("a"), chunk("b"))))
    assert res.end == "lost" and res.error == "the stream ended without [DONE]" and res.ttft_s is not None


def test_a_refused_connection_is_lost():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    res, _ = run(refuse)
    assert res.end == "lost" and res.error.startswith("ConnectError")


def test_summaries_count_every_end_and_outcome_and_a_request_not_served_as_999_s_in_every_ttft_percentile():
    rs = [Result(i, "a", 0.0, end="ok", status=200, outcome="warm", ttft_s=0.01 * (i + 1), e2e_s=1.0) for i in range(10)]
    rs += [Result(10, "a", 0.0, end="ok", status=200, outcome="cold", ttft_s=5.0, e2e_s=6.0),
           Result(11, "b", 0.0, end="error", status=503, ttft_s=None, error="no_capacity: full"),
           Result(12, "b", 0.0, end="lost", error="the stream ended without [DONE]", ttft_s=9.0),
           Result(13, "b", 0.0, end="ok", status=200, outcome=None, ttft_s=0.5, e2e_s=1.0)]
    s = summarise(rs)
    assert set(s) == {"a", "b", "all"}
    assert (s["a"]["requests"], s["a"]["ok"], s["a"]["outcomes"]) == (11, 11, {"warm": 10, "prewarm_hit": 0, "cold": 1})
    assert s["a"]["ttft_p50_s"] == pytest.approx(0.06) and s["a"]["ttft_p99_s"] > 4.0
    assert (s["b"]["ok"], s["b"]["errors"], s["b"]["lost"], s["b"]["missing_outcome"]) == (1, 1, 1, 1)
    # b: one served in 0.5 s, one refused, one lost (its 9 s first token is not a served request's TTFT)
    assert s["b"]["ttft_p50_s"] == 999.0 and s["b"]["ttft_p99_s"] == 999.0
    assert s["all"]["ttft_p50_s"] == pytest.approx(0.075)  # 2 unserved of 14 only move the tail
    assert s["all"]["requests"] == 14 and s["all"]["lost"] == 1
    assert error_counts(rs) == {"error: no_capacity: full": 1, "lost: the stream ended without [DONE]": 1}


def test_only_local_targets_are_accepted():
    for url in ("http://127.0.0.1:8080", "http://localhost:8080", "http://10.1.2.3:80", "http://[::1]:8080"):
        check_local(url)
    for url in ("http://8.8.8.8:80", "http://1.1.1.1"):
        with pytest.raises(ValueError, match="neither loopback nor private"):
            check_local(url)
    with pytest.raises(ValueError, match="not a URL"):
        check_local("127.0.0.1:8080/v1")


def test_prompts_are_reproducible_per_request_and_differ_between_requests():
    assert prompt_of(50, 1) == prompt_of(50, 1) != prompt_of(50, 2)
    assert len(prompt_of(50, 1).split()) == 50


def test_every_request_counts_once_in_the_ttft_percentiles():
    """A request answered without any text (the model ended at once) counts with the time its answer took;
    before, it was left out, and every request left out makes the percentiles look better."""
    served = [Result(i, "a", 0.0, end="ok", status=200, outcome="warm", ttft_s=0.1, e2e_s=0.2) for i in range(9)]
    empty = Result(9, "a", 0.0, end="ok", status=200, outcome="cold", ttft_s=None, e2e_s=30.0)
    s = summarise([*served, empty])["all"]
    assert s["ttft_p99_s"] > 20.0  # the slow empty answer is the tail (left out, the P99 was 0.1 s)
    assert s["unserved_counted_as_ttft_s"] == 999.0


def test_the_report_compares_prewarming_with_both_baselines_counting_the_unserved():
    from loadtest.replay import comparison, comparison_lines

    def run(ttfts, unserved=0, cold=0):
        rs = [Result(i, "a", 0.0, end="ok", status=200, outcome="cold" if i < cold else "warm", ttft_s=t, e2e_s=t)
              for i, t in enumerate(ttfts)]
        rs += [Result(100 + i, "a", 0.0, end="error", error="no_capacity: full") for i in range(unserved)]
        return {"summary": summarise(rs)}

    runs = {"on": run([0.1] * 99, unserved=1), "off": run([5.0] * 100, cold=100), "keepalive": run([1.0] * 100, cold=10)}
    cmp = comparison(runs)
    assert cmp["ttft_p99_on_s"] == pytest.approx(0.1 + 0.01 * 998.9, rel=0.01)  # the refusal is in the tail
    assert cmp["unserved_on"] == 1 and cmp["cold_keepalive"] == 10 and cmp["ablations"] == {}
    assert cmp["p99_ttft_ratio_off_over_on"] < 1 and cmp["p99_ttft_ratio_keepalive_over_on"] < 1
    lines = comparison_lines(cmp)
    assert lines[0].startswith("P99 TTFT, prewarming off / on") and lines[1].startswith("P99 TTFT, keep-alive")
    assert comparison({"on": runs["on"]}) is None
