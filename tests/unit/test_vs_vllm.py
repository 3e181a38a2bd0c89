"""The WarmServe-vs-vLLM benchmark's bookkeeping: the arrival schedule, what one request measures from its
recorded SSE timeline, how runs are summarised (a request not served is 999 s in every figure), the
intervals and ratios across seeds, and the table. No server is started here; the client is driven against an
in-process transport serving canned SSE."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from loadtest import vs_vllm as V
from loadtest import vs_vllm_stats as S
from loadtest.vs_vllm_stats import Rec, across_seeds, arrivals, markdown, ratios, request_metrics, run_summary, table


def test_arrivals_are_poisson_at_the_rate_and_the_same_for_every_system():
    at = arrivals(20.0, 600.0, seed=3)
    assert at == arrivals(20.0, 600.0, seed=3)  # both systems get this schedule
    assert at != arrivals(20.0, 600.0, seed=4) and at != arrivals(5.0, 600.0, seed=3)[:len(at)]
    assert all(0 < a < b < 600 for a, b in zip(at, at[1:]))
    assert len(at) / 600 == pytest.approx(20.0, rel=0.05)
    gaps = np.diff(at)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.08)  # exponential gaps: CV 1


def test_prompts_differ_per_request_and_repeat_per_seed():
    a, b = S.prompts(3, 32, seed=0), S.prompts(3, 32, seed=1)
    assert len(set(a)) == 3 and a == S.prompts(3, 32, seed=0) and a != b
    assert all(len(p.split()) == 32 for p in a)


def served(sent=1.0, times=(1.05, 1.06, 1.08, 1.09), done=1.10, tokens=4) -> Rec:
    return Rec(at_s=sent, sent_s=sent, events=[(t, "x") for t in times], done_s=done, end="ok", finish="length",
               completion_tokens=tokens, prompt_tokens=40)


def test_one_request_ttft_tpot_and_itl_from_its_timeline():
    m = request_metrics(served())
    assert m["served"] and m["tokens"] == 4
    assert m["ttft_s"] == pytest.approx(0.05)
    assert m["tpot_s"] == pytest.approx((1.10 - 1.05) / 3)  # end of stream - first token, over tokens - 1
    assert m["itl_s"] == pytest.approx([0.01, 0.02, 0.01])


def test_tokens_come_from_usage_and_without_it_from_the_events():
    assert request_metrics(served(tokens=7))["tpot_s"] == pytest.approx(0.05 / 6)  # one event held 4 tokens
    r = served()
    r.completion_tokens = None
    assert request_metrics(r)["tokens"] == 4


def test_an_unserved_request_has_no_figures_and_an_empty_answer_counts_its_whole_time():
    for end in ("error", "lost"):
        r = served()
        r.end = end
        assert request_metrics(r) == {"served": False, "ttft_s": None, "tpot_s": None, "itl_s": [], "tokens": 4}
    empty = served(times=(), tokens=0)
    m = request_metrics(empty)
    assert m["ttft_s"] == pytest.approx(0.10) and m["tpot_s"] is None


def test_a_run_counts_an_unserved_request_as_999_s_in_every_figure():
    recs = [served(sent=float(i)) for i in range(99)]
    for i, r in enumerate(recs):
        r.events = [(r.sent_s + 0.05, "x"), (r.sent_s + 0.06, "x"), (r.sent_s + 0.08, "x"), (r.sent_s + 0.09, "x")]
        r.done_s = r.sent_s + 0.10
    refused = Rec(at_s=99.0, sent_s=99.0, done_s=99.01, end="error", error="HTTP 503: no capacity")
    s = run_summary([*recs, refused], output_tokens=4)
    assert (s["requests"], s["ok"], s["errors"], s["lost"], s["unserved"], s["short"]) == (100, 99, 1, 0, 1, 0)
    assert s["ttft_p50_s"] == pytest.approx(0.05)
    assert s["ttft_mean_s"] == pytest.approx((99 * 0.05 + 999) / 100)
    assert s["ttft_p99_s"] > 9  # the refusal is inside the tail, not left out of it
    assert s["tpot_mean_s"] == pytest.approx((99 * 0.05 / 3 + 999) / 100)
    assert s["tpot_p99_s"] > 9 and s["itl_p99_s"] > 0.02
    alone = run_summary(recs, output_tokens=4)
    assert alone["ttft_p99_s"] == pytest.approx(0.05) and alone["tpot_p99_s"] == pytest.approx(0.05 / 3)


def test_short_answers_and_client_lateness_are_reported():
    late = served(sent=1.3)
    late.at_s = 1.0
    s = run_summary([late, served(tokens=3)], output_tokens=4)
    assert s["short"] == 1 and s["max_late_s"] == pytest.approx(0.3)


def summary(ttft: float, tpot: float, unserved: int = 0) -> dict:
    return {"requests": 10, "ok": 10 - unserved, "errors": unserved, "lost": 0, "unserved": unserved, "short": 0,
            "ttft_mean_s": ttft, "ttft_p50_s": ttft, "ttft_p99_s": 2 * ttft, "tpot_mean_s": tpot,
            "tpot_p99_s": 2 * tpot, "itl_p99_s": 2 * tpot}


def test_seeds_give_a_mean_with_its_95_percent_interval():
    agg = across_seeds([summary(0.010, 0.002), summary(0.012, 0.002), summary(0.011, 0.002),
                        summary(0.013, 0.002), summary(0.009, 0.002, unserved=1)])
    t = agg["ttft_mean_s"]
    assert t["mean"] == pytest.approx(0.011) and t["seeds"] == pytest.approx([0.010, 0.012, 0.011, 0.013, 0.009])
    # t(0.975, 4) = 2.776; sd of 10..13,9 ms = 1.581 ms
    assert t["ci95_half"] == pytest.approx(2.776 * 0.001581 / 5 ** 0.5, rel=1e-3)
    assert agg["tpot_mean_s"]["ci95_half"] == pytest.approx(0.0)
    assert agg["requests"] == 50 and agg["unserved"] == 1
    assert across_seeds([summary(0.01, 0.002)])["ttft_mean_s"]["ci95_half"] is None


def test_the_ratio_is_warmserve_over_vllm_judged_against_1_2x():
    vllm = [summary(0.010, 0.002), summary(0.010, 0.002)]
    ws = [summary(0.011, 0.003), summary(0.013, 0.003)]
    r = ratios(ws, vllm)
    assert set(r) == set(S.TARGETS)
    assert r["ttft_mean_s"]["ratio"] == pytest.approx(1.2) and r["ttft_mean_s"]["pass"]
    assert r["ttft_mean_s"]["per_seed"]["seeds"] == pytest.approx([1.1, 1.3])
    assert r["tpot_p99_s"]["ratio"] == pytest.approx(1.5) and not r["tpot_p99_s"]["pass"]


def test_the_table_shows_each_system_and_rate_and_marks_the_target():
    runs = [{"system": s, "rate": rate, "seed": seed, "summary": summary(t, 0.002) | {"prompt_tokens_mean": 50.0}}
            for seed in (0, 1) for rate in (5.0, 20.0) for s, t in (("vllm", 0.010), ("warmserve", 0.015))]
    results, by_rate = V.aggregate(runs, [5.0, 20.0], ["vllm", "warmserve"])
    text = table(results)
    lines = text.splitlines()
    assert len(lines) == 2 + 4 and lines[1].count("|") == lines[0].count("|")
    assert "| 20 | WarmServe gateway | 20 | 0 (0 / 0) | 15.0 ± 0.00 |" in text  # mean ± half-width, ms
    report = {"when": "now", "command": ".venv/bin/python -m loadtest.vs_vllm", "regime": "one model, warm",
              "params": {"seeds": 2}, "results": results, "ratios": by_rate, "notes": ["a note"]}
    md = markdown(report)
    assert "`.venv/bin/python -m loadtest.vs_vllm`" in md and "Regime: one model, warm." in md
    assert "| 5 | TTFT mean | 1.50x | 1.50 ± 0.00 | FAIL |" in md
    assert "| 5 | TPOT mean | 1.00x | 1.00 ± 0.00 | pass |" in md
    assert "a trial, not a result" in md and "- a note" in md
    assert "vLLM OpenAI server 50.0 at 5 req/s; WarmServe gateway 50.0 at 5 req/s" in md


def sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def chunk(text=None, finish=None, usage=None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": {"content": text} if text is not None else {},
                                 "finish_reason": finish}]
    out = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny-llama", "choices": choices}
    return out | ({"usage": usage} if usage else {})


def drive(handler) -> tuple[Rec, dict]:
    import openai

    seen = {}

    def wrapped(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        return handler(request)

    async def go():
        client = openai.AsyncOpenAI(base_url="http://127.0.0.1:1/v1", api_key="k", max_retries=0,
                                    http_client=httpx.AsyncClient(transport=httpx.MockTransport(wrapped)))
        rec = Rec(at_s=0.0)
        await V.send(client, "hello", 3, rec, 0.0)
        return rec

    return asyncio.run(go()), seen


def test_the_client_sends_ignore_eos_and_records_the_stream():
    body = sse(chunk(""), chunk("a"), chunk("b"), chunk("c", finish="length"),
               chunk(usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}), "[DONE]")
    rec, seen = drive(lambda r: httpx.Response(200, content=body, headers={"x-warmserve-outcome": "warm",
                                                                           "content-type": "text/event-stream"}))
    assert seen["body"]["ignore_eos"] is True and seen["body"]["stream"] is True
    assert seen["body"]["stream_options"] == {"include_usage": True} and seen["body"]["max_tokens"] == 3
    assert (rec.end, rec.finish, rec.outcome) == ("ok", "length", "warm")
    assert (rec.prompt_tokens, rec.completion_tokens) == (9, 3)
    assert [text for _, text in rec.events] == ["a", "b", "c"]  # the role event's empty content is no token


def test_a_refusal_is_an_error_and_a_stream_without_a_finish_is_lost():
    err = {"error": {"message": "unsupported parameter: ignore_eos", "type": "invalid_request_error",
                     "param": "ignore_eos", "code": None}}
    rec, _ = drive(lambda r: httpx.Response(400, json=err))
    assert rec.end == "error" and "ignore_eos" in rec.error
    with pytest.raises(V.SurfaceError, match="refuses ignore_eos"):
        V._check_surface("warmserve", rec, 3)
    cut = sse(chunk("a"), chunk("b"))
    rec, _ = drive(lambda r: httpx.Response(200, content=cut, headers={"content-type": "text/event-stream"}))
    assert rec.end == "lost" and request_metrics(rec)["served"] is False


def test_an_answer_shorter_than_asked_means_ignore_eos_was_not_honoured():
    rec = served(tokens=2)
    with pytest.raises(V.SurfaceError, match="does not honour"):
        V._check_surface("warmserve", rec, 4)
    V._check_surface("vllm", served(tokens=4), 4)


def test_vllms_server_gets_exactly_the_workers_engine_settings(tmp_path):
    pytest.importorskip("vllm")
    from tooling.modelgen import create_tiny_llama

    path = create_tiny_llama(tmp_path / "tiny-llama")
    args, core = V.worker_engine(path, 2**30, batch_capacity=128)
    flags = V.server_flags(args)
    for expected in (["--kv-cache-memory-bytes", str(2**30)], ["--max-model-len", "2048"], ["--enforce-eager"],
                     ["--max-num-seqs", "128"],  # the worker's B is its engine's batch limit
                     ["--no-enable-chunked-prefill"], ["--max-num-batched-tokens", "2048"], ["--seed", "0"]):
        i = flags.index(expected[0])
        assert flags[i:i + len(expected)] == expected
    V.check_same_engine(flags, args)  # vLLM's own parser turns the flags into the worker's engine arguments
    with pytest.raises(RuntimeError, match="kv_cache_memory_bytes"):
        V.check_same_engine([f if f != str(2**30) else str(2**29) for f in flags], args)
    env = V.server_env(core)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(core) and "VLLM_CPU_KVCACHE_SPACE" not in env


def test_a_vllm_workers_engine_batches_as_many_requests_as_the_worker_admits(tmp_path):
    pytest.importorskip("vllm")
    from services.gpu_worker.engines import make_engine
    from shared.messages import ModelSpec
    from tooling.modelgen import create_tiny_llama

    path = create_tiny_llama(tmp_path / "tiny-llama")
    spec = ModelSpec(slug="tiny", path=str(path), parameter_bytes=1, max_context_tokens=2048)
    assert make_engine("vllm", batch_capacity=7)._engine_args(spec).max_num_seqs == 7
    assert make_engine("vllm")._engine_args(spec).max_num_seqs is None  # vLLM's own default


def test_the_cpu_meter_tells_the_system_under_test_from_the_client():
    import subprocess
    import sys
    import time

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.3)  # the interpreter has started
        meter = V.CpuMeter(spin.pid)
        time.sleep(1.0)
        cpu = meter.stop()
    finally:
        spin.kill()
        spin.wait()
    assert cpu["system_cores"] > 0.2 and cpu["client_cores"] < 0.2, cpu


def test_the_client_raises_only_its_own_session():
    """In a session of its own (so this test run keeps its weight): the boost lands on that session's
    autogroup, and a system started after it in a new session is not raised with it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    enabled = Path("/proc/sys/kernel/sched_autogroup_enabled")
    if not enabled.exists() or enabled.read_text().strip() != "1" or os.geteuid() != 0:
        pytest.skip("needs autogroup scheduling and the right to raise a priority")
    code = ("import subprocess, sys\n"
            "from loadtest.vs_vllm import boost_client\n"
            "print(boost_client())\n"
            "print(open('/proc/self/autogroup').read().strip())\n"
            "child = subprocess.run([sys.executable, '-c', \"print(open('/proc/self/autogroup').read().strip())\"],\n"
            "                       start_new_session=True, capture_output=True, text=True)\n"
            "print(child.stdout.strip())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, start_new_session=True,
                         cwd=Path(__file__).parents[2], check=True).stdout.splitlines()
    assert "nice -10" in out[0] and out[1].endswith("nice -10")
    assert out[2].endswith("nice 0") and out[2].split()[0] != out[1].split()[0]
