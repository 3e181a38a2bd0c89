"""Open-loop replay of a request list through the HTTP gateway, measured from the client's side.

Each request is sent at its arrival time whatever happened to earlier ones (open loop: a slow cluster
gets a queue, not fewer requests), streamed with the OpenAI chat API, and timed: time to first token,
time per output token, end-to-end latency, and the ``x-warmserve-outcome`` header. Every request ends
in exactly one of three ways:

- ``ok``: the stream finished with ``[DONE]`` and no error;
- ``error``: a clear error, i.e. an HTTP error with an OpenAI-format body, or an error event in the stream;
- ``lost``: anything else (connection refused or reset, a stream that stops without ``[DONE]``, no answer
  within the request timeout, still running when the replay's drain time is up).

The replay is bounded in count and time, stops by itself, and sends only to loopback or private
addresses (it is a load generator: pointed at someone else's server it would be an attack).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np

OUTCOMES = ("warm", "prewarm_hit", "cold")
_WORDS = ("the model serves tokens fast when its weights are warm and the cache is ready for every request "
          "that arrives from users who ask about code data time memory graphs numbers and plans").split()


@dataclass(frozen=True)
class ReplayRequest:
    rid: int
    model: str
    at_s: float  # seconds after the replay starts
    input_tokens: int
    output_tokens: int


@dataclass
class Result:
    rid: int
    model: str
    at_s: float
    end: str = "lost"  # ok | error | lost
    status: int | None = None  # HTTP status, when a response came
    outcome: str | None = None  # x-warmserve-outcome
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    completion_tokens: int | None = None
    error: str | None = None  # the error's code and message, or why it counts as lost
    late_s: float = 0.0  # how late the client sent it (a client that cannot keep up shows here)


@dataclass
class Replay:
    results: list[Result]
    timeline: list[dict] = field(default_factory=list)  # {t_s, models: {slug: [active, prewarmed, loading]}}
    duration_s: float = 0.0

    def as_dict(self) -> dict:
        return {"duration_s": round(self.duration_s, 3), "timeline": self.timeline,
                "requests": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(r).items()}
                             for r in self.results]}


def check_local(url: str) -> None:
    """Refuse a gateway that is not on this machine or a private network."""
    host = urlsplit(url).hostname
    if not host:
        raise ValueError(f"not a URL: {url!r}")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
        if not (ip.is_loopback or ip.is_private):
            raise ValueError(f"{url} resolves to {ip}, which is neither loopback nor private: the load test only "
                             "targets local clusters")


def prompt_of(n_tokens: int, rid: int) -> str:
    """About ``n_tokens`` tokens of plain words (most are one token each), different per request so no
    cache makes them cheaper than a user's."""
    rng = np.random.default_rng(rid)
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=max(n_tokens, 1)))


def _error_text(body: bytes | str) -> str:
    try:
        err = json.loads(body)["error"]
        return f"{err.get('code') or err.get('type')}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return ""


async def send(client: httpx.AsyncClient, url: str, key: str, req: ReplayRequest, res: Result) -> None:
    """One streamed chat completion; fills ``res`` in place (so a cancelled one keeps what it saw)."""
    body = {"model": req.model, "messages": [{"role": "user", "content": prompt_of(req.input_tokens, req.rid)}],
            "max_tokens": req.output_tokens, "stream": True, "stream_options": {"include_usage": True}, "seed": req.rid}
    t0 = time.monotonic()
    first = last = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
            res.status, res.outcome = resp.status_code, resp.headers.get("x-warmserve-outcome")
            if resp.status_code != 200:
                text = _error_text(await resp.aread())
                res.end, res.error = ("error", text) if text else ("lost", f"HTTP {resp.status_code} without an "
                                                                          "OpenAI error body")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    if res.error is None:
                        res.end = "ok"
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.end, res.error = "error", _error_text(data)
                    continue
                if chunk.get("usage"):
                    res.completion_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                    last = time.monotonic()
                    if first is None:
                        first = last
                        res.ttft_s = first - t0
            else:
                res.error = res.error or "the stream ended without [DONE]"
                if res.end == "ok":
                    res.end = "lost"
    except httpx.HTTPError as exc:
        res.end, res.error = "lost", f"{exc.__class__.__name__}: {exc}"[:300]
    finally:
        res.e2e_s = time.monotonic() - t0
        if first is not None and last is not None and (res.completion_tokens or 0) > 1:
            res.tpot_s = (last - first) / (res.completion_tokens - 1)


async def sample_models(client: httpx.AsyncClient, url: str, key: str, t0: float, every_s: float,
                        out: list[dict]) -> None:
    """Active instances, prewarmed and loading copies per model, from the gateway's /v1/models."""
    while True:
        try:
            r = await client.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            out.append({"t_s": round(time.monotonic() - t0, 2),
                        "models": {m["id"]: [m["active_instances"], m["prewarmed_copies"], m["loading_copies"]]
                                   for m in r.json()["data"]}})
        except (httpx.HTTPError, ValueError, KeyError):
            pass  # a missed sample is a gap in the plot, not a failed replay
        await asyncio.sleep(every_s)


async def replay(url: str, key: str, requests: list[ReplayRequest], *, duration_s: float, max_requests: int,
                 request_timeout_s: float = 300.0, drain_s: float = 120.0, sample_every_s: float = 1.0,
                 progress: Callable[[str], None] | None = print) -> Replay:
    """Send ``requests`` (those arriving before ``duration_s``, at most ``max_requests``) at their times;
    then wait up to ``drain_s`` for the last answers. Returns every request's result and the timeline."""
    check_local(url)
    todo = sorted((r for r in requests if r.at_s < duration_s), key=lambda r: r.at_s)[:max_requests]
    results = [Result(r.rid, r.model, r.at_s) for r in todo]
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeline: list[dict] = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.monotonic()
        sampler = asyncio.create_task(sample_models(client, url, key, t0, sample_every_s, timeline))
        tasks: list[asyncio.Task] = []
        next_report = 10.0
        for req, res in zip(todo, results):
            delay = t0 + req.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            res.late_s = max(time.monotonic() - t0 - req.at_s, 0.0)
            tasks.append(asyncio.create_task(asyncio.wait_for(send(client, url, key, req, res), request_timeout_s)))
            if progress and req.at_s >= next_report:
                progress(_progress_line(time.monotonic() - t0, results[:len(tasks)], tasks))
                next_report += 10.0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for res, task in zip(results, tasks):
            if res.end == "lost" and res.error is None:
                res.error = _why_lost(task, request_timeout_s, drain_s)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        elapsed = time.monotonic() - t0
    if progress:
        progress(_progress_line(elapsed, results, tasks))
    return Replay(results, timeline, elapsed)


def _why_lost(task: asyncio.Task, request_timeout_s: float, drain_s: float) -> str:
    if task.cancelled():
        return f"still running after the {drain_s:g} s drain"
    exc = task.exception()
    if isinstance(exc, TimeoutError):
        return f"no answer within the {request_timeout_s:g} s request timeout"
    return f"client failure: {exc!r}"[:300]


def _progress_line(t: float, results: list[Result], tasks: list[asyncio.Task]) -> str:
    ends = [r.end for r, task in zip(results, tasks) if task.done()]
    return (f"  t={t:6.1f} s  sent {len(tasks):5d}  ok {ends.count('ok'):5d}  errors {ends.count('error'):4d}  "
            f"lost {ends.count('lost'):4d}  in flight {len(tasks) - len(ends):4d}")


# ---- summaries ----------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


UNSERVED_TTFT_S = 999.0  # a request refused, failed or lost counts as this inside every TTFT percentile


def ttft_of(r: Result) -> float:
    """What a request counts as in the TTFT percentiles: every request counts once. Not served (refused,
    failed, lost): ``UNSERVED_TTFT_S``. Served with no text at all (the model ended at once): the time
    its whole, empty, answer took."""
    if r.end != "ok":
        return UNSERVED_TTFT_S
    if r.ttft_s is not None:
        return r.ttft_s
    return r.e2e_s if r.e2e_s is not None else UNSERVED_TTFT_S


def summarise(results: list[Result]) -> dict:
    """Per model and for all: counts by end and outcome, TTFT P50/P90/P99 over every request (``ttft_of``: a
    request not served counts as ``UNSERVED_TTFT_S``, a refusal is a failure, never a fast answer), TPOT
    P50, end-to-end P50/P99 (of the served)."""
    def one(rs: list[Result]) -> dict:
        ok = [r for r in rs if r.end == "ok"]
        ttft = [ttft_of(r) for r in rs]
        tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
        e2e = [r.e2e_s for r in ok]
        return {"requests": len(rs), "ok": len(ok), "errors": sum(r.end == "error" for r in rs),
                "lost": sum(r.end == "lost" for r in rs), "unserved_counted_as_ttft_s": UNSERVED_TTFT_S,
                "outcomes": {o: sum(r.outcome == o for r in ok) for o in OUTCOMES},
                "missing_outcome": sum(r.outcome not in OUTCOMES for r in ok),
                "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90), "ttft_p99_s": _pct(ttft, 99),
                "tpot_p50_s": _pct(tpot, 50), "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99),
                "max_late_s": max((r.late_s for r in rs), default=0.0)}
    models = sorted({r.model for r in results})
    out = {m: one([r for r in results if r.model == m]) for m in models}
    out["all"] = one(results)
    return out


def error_counts(results: list[Result], limit: int = 8) -> dict[str, int]:
    """The most frequent error and loss reasons, for the report."""
    counts: dict[str, int] = {}
    for r in results:
        if r.end != "ok":
            key = f"{r.end}: {(r.error or '')[:120]}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])
