"""``warmserve request ID``: the gateway's bounded buffer of recent requests' spans, the gateways' answers
gathered over the (in-memory) bus, the span tree and its rendering, Jaeger's JSON, and the request id on
error responses.

The Jaeger documents below are written in the exact shape Jaeger's query API returns (``GET /api/traces/{id}``:
``data[0].spans[]`` with ``traceID``, ``spanID``, ``operationName``, ``references``, ``startTime`` and ``duration``
in µs, ``tags``, ``logs``, ``processID`` into ``processes``); they are not checked against a live Jaeger, which
cannot run here.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from services.gateway import errors
from services.gateway.app import REQUEST_ID_HEADER, Gateway, _quoting
from services.gateway.errors import ApiError
from services.gateway.recent import RecentRequests, span_dict
from shared.admin import AdminClient, AdminError
from shared.settings import GatewaySettings
from shared.subjects import GATEWAY_ADMIN
from tests.inmemory_bus import InMemoryNats
from tooling.cli import request as story

# ---------------------------------------------------------------------- the buffer


def _provider(buffer: RecentRequests, service: str = "warmserve-gateway") -> trace.Tracer:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    assert buffer.attach(provider)
    return provider.get_tracer("test")


def _request(tracer, request_id: str, children: int = 1, gateway: str = "gw", end: bool = True):
    root = tracer.start_span("gateway.request", attributes={"warmserve.request_id": request_id,
                                                            "warmserve.gateway": gateway})
    with trace.use_span(root, end_on_exit=False):
        for i in range(children):
            with tracer.start_as_current_span(f"child-{i}"):
                pass
    if end:
        root.end()
    return root


def test_the_buffer_keeps_the_newest_requests_and_forgets_the_oldest_first():
    buffer = RecentRequests(3, gateway_id="gw")
    tracer = _provider(buffer)
    for i in range(5):
        _request(tracer, f"req-{i}")
    assert buffer.request_ids() == ["req-2", "req-3", "req-4"] and len(buffer) == 3
    assert buffer.story("req-0") is None and buffer.story("req-1") is None
    kept = buffer.story("req-4")
    assert [s["name"] for s in kept["spans"]] == ["gateway.request", "child-0"]  # the request's own first
    assert kept["spans"][1]["parent_id"] == kept["spans"][0]["span_id"]
    assert kept["trace_id"] == kept["spans"][0]["trace_id"] and not kept["in_progress"]


def test_the_buffer_caps_the_spans_of_one_request_and_always_keeps_its_own():
    buffer = RecentRequests(10, gateway_id="gw", max_spans=3)
    tracer = _provider(buffer)
    _request(tracer, "many", children=6)  # the request's span ends last, after its six children
    kept = buffer.story("many")
    assert [s["name"] for s in kept["spans"]] == ["gateway.request", "child-0", "child-1"]
    assert kept["dropped_spans"] == 4


def test_the_buffer_keeps_only_its_own_gateways_requests_and_their_traces():
    buffer = RecentRequests(10, gateway_id="gw")
    tracer = _provider(buffer)
    _request(tracer, "other-gateway", gateway="gw-2")
    with tracer.start_as_current_span("unrelated"):  # not a request: nothing is kept
        pass
    assert len(buffer) == 0 and buffer.story("other-gateway") is None


def test_a_request_still_running_is_there_with_what_has_ended():
    buffer = RecentRequests(10, gateway_id="gw")
    tracer = _provider(buffer)
    root = _request(tracer, "running", end=False)
    kept = buffer.story("running")
    assert kept["in_progress"] and kept["spans"][0]["duration_us"] is None
    assert [s["name"] for s in kept["spans"]] == ["gateway.request", "child-0"]
    root.end()
    assert buffer.story("running")["spans"][0]["duration_us"] >= 0


def test_none_kept_when_disabled_or_closed():
    off = RecentRequests(0, gateway_id="gw")
    assert not off.attach(TracerProvider()) and not off.enabled
    buffer = RecentRequests(5, gateway_id="gw")
    tracer = _provider(buffer)
    _request(tracer, "a")
    buffer.close()
    _request(tracer, "b")
    assert len(buffer) == 0 and buffer.story("a") is None


def test_span_dict_is_plain_and_bounded():
    buffer = RecentRequests(5, gateway_id="gw")
    tracer = _provider(buffer)
    root = tracer.start_span("gateway.request", attributes={"warmserve.request_id": "r", "warmserve.gateway": "gw",
                                                            "warmserve.queue_wait_s": 0.25})
    root.add_event("warmserve.error", {"detail": "x" * 5000})
    root.set_status(trace.StatusCode.ERROR)
    root.end()
    d = span_dict(buffer._traces[root.get_span_context().trace_id].root)
    assert d["service"] == "warmserve-gateway" and d["parent_id"] is None and d["error"] is True
    assert len(d["trace_id"]) == 32 and len(d["span_id"]) == 16
    assert d["start_us"] == root.start_time // 1000 and d["duration_us"] == (root.end_time - root.start_time) // 1000
    assert d["attributes"]["warmserve.queue_wait_s"] == 0.25
    assert len(d["events"][0]["attributes"]["detail"]) < 1100
    json.dumps(d)  # travels as JSON


# ---------------------------------------------------------------------- over the bus


def _gateway(gateway_id: str, capacity: int = 10) -> tuple[Gateway, trace.Tracer]:
    gw = Gateway(GatewaySettings(gateway_id=gateway_id, recent_requests=capacity))
    return gw, _provider(gw.recent)


async def test_every_gateway_is_asked_and_the_one_that_has_the_request_answers():
    nc = InMemoryNats()
    nc.max_payload = 1024 * 1024
    gateways = [_gateway("gw-a"), _gateway("gw-b")]
    for gw, _ in gateways:
        gw.nc = nc
        await nc.subscribe(GATEWAY_ADMIN.wildcard, cb=gw._on_admin)  # as Gateway.start does: no queue group
    _request(gateways[1][1], "chatcmpl-b1", gateway="gw-b")
    client = AdminClient(nc)

    answers = await client.ask_all("request", {"request_id": "chatcmpl-b1"}, timeout=2,
                                   enough=lambda r: r.ok and r.result["found"])
    found = next(r.result for r in answers if r.result["found"])
    assert found["gateway"] == "gw-b" and found["spans"][0]["attributes"]["warmserve.request_id"] == "chatcmpl-b1"

    missing = await client.ask_all("request", {"request_id": "chatcmpl-nope"}, timeout=2, settle_s=0.2)
    assert sorted(r.result["gateway"] for r in missing) == ["gw-a", "gw-b"]
    assert all(r.ok and not r.result["found"] and r.result["capacity"] == 10 for r in missing)
    message = story.not_found_message("chatcmpl-nope", [r.result for r in missing], None)
    assert "not in the last 10 requests of any gateway (2 answered)" in message
    assert "set WARMSERVE_TRACES_URL" in message

    with pytest.raises(AdminError) as bad:  # refused before it is sent
        await client.ask_all("request", {"request_id": "has spaces"})
    assert bad.value.code == "bad_request"


async def test_no_gateway_listening_is_no_answer_at_once():
    nc = InMemoryNats()
    started = asyncio.get_running_loop().time()
    assert await AdminClient(nc).ask_all("request", {"request_id": "x"}, timeout=5) == []
    assert asyncio.get_running_loop().time() - started < 1  # NATS's no-responders status, not the timeout
    assert "no gateway answered" in story.not_found_message("x", [], None)


# ---------------------------------------------------------------------- the tree and its rendering

T0 = 1_700_000_000_000_000  # µs since the epoch
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(span_id, name, start_ms, took_ms, parent=None, service="warmserve-gateway", attributes=None, events=()):
    return {"trace_id": TRACE, "span_id": span_id, "parent_id": parent, "name": name, "service": service,
            "start_us": T0 + int(start_ms * 1000), "duration_us": None if took_ms is None else int(took_ms * 1000),
            "attributes": attributes or {}, "error": False,
            "events": [{"name": n, "time_us": T0 + int(at * 1000), "attributes": a} for n, at, a in events]}


COLD = [
    span("00000000000000a1", "gateway.request", 0, 2500.0, attributes={
        "warmserve.model": "tiny", "warmserve.request_id": "chatcmpl-1", "warmserve.stream": True,
        "warmserve.outcome": "cold", "warmserve.worker": "worker-0", "warmserve.instance": "i-7",
        "warmserve.queue_wait_s": 2.3, "warmserve.prompt_tokens": 5, "warmserve.completion_tokens": 8,
        "http.response.status_code": 200}, events=[("first_token", 2400.0, {"ttft_s": 2.4})]),
    span("00000000000000b2", "worker.generate", 2310.0, 180.0, parent="00000000000000a1",
         service="warmserve-gpu_worker",
         attributes={"warmserve.request_id": "chatcmpl-1", "warmserve.completion_tokens": 8},
         events=[("first_token", 2395.0, {"prefill_s": 0.085, "prompt_tokens": 5})]),
    span("00000000000000c3", "gateway.queue", 1.0, 2300.0, parent="00000000000000a1", attributes={
        "warmserve.reason": "no_instance", "warmserve.queue_depth": 1, "warmserve.outcome": "cold"},
        events=[("scale_up.asked", 1.5, {"reason": "no_instance", "waiting": 1})]),
    span("00000000000000d4", "orchestrator.scale_up", 3.0, 2250.0, parent="00000000000000c3",
         service="warmserve-prewarm_orchestrator", attributes={"warmserve.outcome": "cold"}),
    span("00000000000000e5", "worker.activate", 10.0, 2200.0, parent="00000000000000d4",
         service="warmserve-gpu_worker", attributes={"warmserve.model": "tiny"}),
]


def test_the_tree_nests_by_parent_in_start_order_and_orphans_are_roots():
    tree = story.build_tree(COLD + [span("00000000000000f6", "lost.child", 5.0, 1.0, parent="ffffffffffffffff")])
    assert [(d, n["name"]) for d, n in story.walk(tree)] == [
        (0, "gateway.request"), (1, "gateway.queue"), (2, "orchestrator.scale_up"), (3, "worker.activate"),
        (1, "worker.generate"), (0, "lost.child")]


def test_rendering_shows_offsets_durations_and_the_story():
    text = story.render({"request_id": "chatcmpl-1", "trace_id": TRACE, "source": "test", "spans": COLD})
    lines = text.splitlines()
    assert lines[0] == f"request chatcmpl-1  trace {TRACE}  (test)"
    assert lines[1] == ("  outcome cold · worker worker-0 (instance i-7) · queue wait 2300.0 ms · scale-up 2250.0 ms "
                        "(orchestrator) · activation 2200.0 ms · prefill 85.0 ms · first token at +2400.0 ms · tokens "
                        "5 prompt + 8 completion · status 200 · took 2500.0 ms")
    body = "\n".join(lines[3:])
    assert ("gateway.request [gateway]  +0.0 ms  2500.0 ms  model=tiny stream=true outcome=cold worker=worker-0 "
            "instance=i-7 queue_wait=2300.0 ms prompt_tokens=5 completion_tokens=8 status=200") in body
    assert "  · first_token at +2400.0 ms  ttft=2400.0 ms" in body
    assert "\n  gateway.queue [gateway]  +1.0 ms  2300.0 ms  reason=no_instance queue_depth=1 outcome=cold" in body
    assert "\n    · scale_up.asked at +1.5 ms  reason=no_instance waiting=1" in body
    assert "\n    orchestrator.scale_up [prewarm_orchestrator]  +3.0 ms  2250.0 ms" in body
    assert "\n      worker.activate [gpu_worker]  +10.0 ms  2200.0 ms  model=tiny" in body
    assert "\n  worker.generate [gpu_worker]  +2310.0 ms  180.0 ms  completion_tokens=8" in body
    assert "\n    · first_token at +2395.0 ms  prefill=85.0 ms prompt_tokens=5" in body
    assert "request_id=" not in body  # in the header line, not repeated on every span


def test_rendering_the_gateways_own_spans_of_a_request_still_running():
    spans = [span("00000000000000a1", "gateway.request", 0, None, attributes={
                 "warmserve.request_id": "cmpl-2", "warmserve.outcome": "prewarm_hit", "warmserve.worker": "w"}),
             span("00000000000000c3", "gateway.queue", 0.5, 40.0, parent="00000000000000a1",
                  events=[("scale_up.asked", 0.6, {}), ("scale_up.answered", 40.0, {
                      "ok": True, "worker": "w", "instance": "i", "outcome": "prewarm_hit", "scale_up_s": 0.0391,
                      "error": ""})])]
    text = story.render({"request_id": "cmpl-2", "trace_id": TRACE, "source": "gateway gw", "spans": spans,
                         "notes": ["a note"]})
    assert "outcome prewarm_hit · worker w · scale-up 39.1 ms (as the orchestrator answered) · still running" in text
    assert "gateway.request [gateway]  +0.0 ms  running" in text
    assert "· scale_up.answered at +40.0 ms  ok=true worker=w instance=i outcome=prewarm_hit scale_up=39.1 ms" in text
    assert text.endswith("\n\na note")


def test_json_is_the_nested_tree():
    out = story.as_json({"request_id": "chatcmpl-1", "trace_id": TRACE, "source": "s", "spans": COLD})
    assert "spans" not in out and out["tree"][0]["name"] == "gateway.request"
    assert [c["name"] for c in out["tree"][0]["children"]] == ["gateway.queue", "worker.generate"]
    json.dumps(out)


# ---------------------------------------------------------------------- Jaeger's JSON

JAEGER_TRACE = {
    "data": [{
        "traceID": TRACE,
        "spans": [
            {"traceID": TRACE, "spanID": "a1", "operationName": "gateway.request", "references": [],
             "startTime": T0, "duration": 2_500_000, "processID": "p1", "warnings": None, "flags": 1,
             "tags": [{"key": "warmserve.request_id", "type": "string", "value": "chatcmpl-1"},
                      {"key": "warmserve.outcome", "type": "string", "value": "cold"},
                      {"key": "warmserve.worker", "type": "string", "value": "worker-0"},
                      {"key": "warmserve.queue_wait_s", "type": "float64", "value": 2.3},
                      {"key": "warmserve.stream", "type": "bool", "value": True},
                      {"key": "http.response.status_code", "type": "int64", "value": 200},
                      {"key": "otel.scope.name", "type": "string", "value": "warmserve.gateway"},
                      {"key": "span.kind", "type": "string", "value": "internal"},
                      {"key": "internal.span.format", "type": "string", "value": "otlp"}],
             "logs": [{"timestamp": T0 + 2_400_000, "fields": [
                 {"key": "event", "type": "string", "value": "first_token"},
                 {"key": "ttft_s", "type": "float64", "value": 2.4}]}]},
            {"traceID": TRACE, "spanID": "b2", "operationName": "worker.generate",
             "references": [{"refType": "CHILD_OF", "traceID": TRACE, "spanID": "a1"}],
             "startTime": T0 + 2_310_000, "duration": 180_000, "processID": "p2",
             "tags": [{"key": "warmserve.completion_tokens", "type": "int64", "value": 8},
                      {"key": "error", "type": "bool", "value": True},
                      {"key": "otel.status_code", "type": "string", "value": "ERROR"}],
             "logs": [{"timestamp": T0 + 2_395_000, "fields": [
                 {"key": "event", "type": "string", "value": "first_token"},
                 {"key": "prefill_s", "type": "float64", "value": 0.085}]}]},
            {"traceID": TRACE, "spanID": "e5", "operationName": "worker.activate",
             "references": [{"refType": "CHILD_OF", "traceID": TRACE, "spanID": "d4"}],
             "startTime": T0 + 10_000, "duration": 2_200_000, "processID": "p2", "tags": [], "logs": []},
        ],
        "processes": {"p1": {"serviceName": "warmserve-gateway", "tags": []},
                      "p2": {"serviceName": "warmserve-gpu_worker",
                             "tags": [{"key": "telemetry.sdk.language", "type": "string", "value": "python"}]}},
        "warnings": None,
    }],
    "total": 0, "limit": 0, "offset": 0, "errors": None,
}


def test_jaeger_json_becomes_span_dicts():
    spans = {s["name"]: s for s in story.from_jaeger(JAEGER_TRACE, TRACE)}
    root, gen, act = spans["gateway.request"], spans["worker.generate"], spans["worker.activate"]
    assert root["trace_id"] == TRACE and root["span_id"] == "00000000000000a1" and root["parent_id"] is None
    assert root["service"] == "warmserve-gateway" and root["start_us"] == T0 and root["duration_us"] == 2_500_000
    assert root["attributes"]["warmserve.stream"] is True and root["attributes"]["http.response.status_code"] == 200
    assert root["events"] == [{"name": "first_token", "time_us": T0 + 2_400_000, "attributes": {"ttft_s": 2.4}}]
    assert gen["parent_id"] == "00000000000000a1" and gen["service"] == "warmserve-gpu_worker" and gen["error"]
    assert act["parent_id"] == "00000000000000d4"  # its parent (the orchestrator's span) is not in this answer
    assert story.from_jaeger(JAEGER_TRACE, "0" * 31 + "1") == [] and story.from_jaeger({"data": []}) == []


def test_a_jaeger_trace_renders_with_the_workers_spans():
    text = story.render({"request_id": "chatcmpl-1", "trace_id": TRACE, "source": "Jaeger",
                         "spans": story.from_jaeger(JAEGER_TRACE)})
    assert "outcome cold · worker worker-0 · queue wait 2300.0 ms · activation 2200.0 ms · prefill 85.0 ms · " \
           "first token at +2400.0 ms · status 200 · took 2500.0 ms" in text
    assert "\n  worker.generate [gpu_worker]  +2310.0 ms  180.0 ms  ERROR  completion_tokens=8" in text
    assert "\nworker.activate [gpu_worker]  +10.0 ms  2200.0 ms" in text  # an orphan: a root of its own
    assert "otel.scope" not in text and "span.kind" not in text and "internal.span" not in text


def test_a_jaeger_search_finds_the_requests_trace():
    search = {"data": [
        {"traceID": "1" * 32, "spans": [{
            "traceID": "1" * 32, "spanID": "01", "operationName": "gateway.request",
            "tags": [{"key": "warmserve.request_id", "type": "string", "value": "other"}]}]},
        JAEGER_TRACE["data"][0]]}
    assert story.trace_id_in_search(search, "chatcmpl-1") == TRACE
    assert story.trace_id_in_search(search, "nope") is None
    assert story.trace_id_in_search({"data": None}, "x") is None


def test_spans_jaeger_has_not_received_yet_are_added_from_the_gateway():
    jaeger = story.from_jaeger(JAEGER_TRACE)
    merged = story.merge(jaeger, COLD)
    assert len(merged) == len(jaeger) + 2  # gateway.queue and the orchestrator's span; a1, b2 and e5 are there
    assert {s["span_id"] for s in merged} == {s["span_id"] for s in COLD} | {s["span_id"] for s in jaeger}


def test_not_found_with_a_traces_url_says_where_it_looked():
    answers = [{"found": False, "gateway": "gw", "capacity": 1000, "kept": 3}]
    msg = story.not_found_message("chatcmpl-x", answers, "http://127.0.0.1:16686")
    assert "not in the last 1000 requests of any gateway (1 answered)" in msg
    assert "Jaeger at http://127.0.0.1:16686 has no trace with warmserve.request_id=chatcmpl-x" in msg
    assert "could not be asked (refused)" in story.not_found_message("x", answers, "http://j", "refused")
    assert "WARMSERVE_RECENT_REQUESTS is 0" in story.not_found_message("x", [{"found": False, "capacity": 0}], None)


# ---------------------------------------------------------------------- the id on error responses


async def test_an_error_after_the_id_exists_carries_it():
    async def refused():
        raise ApiError(404, "The model 'x' does not exist", code="model_not_found", headers={"Retry-After": "1"})

    with pytest.raises(ApiError) as err:
        await _quoting("chatcmpl-9", refused())
    assert err.value.response().headers[REQUEST_ID_HEADER] == "chatcmpl-9"
    assert err.value.response().headers["retry-after"] == "1"


def test_an_unexpected_failure_is_a_500_that_carries_the_id():
    app = FastAPI()
    errors.install(app)

    @app.post("/boom")
    async def boom():
        async def broken():
            raise RuntimeError("a bug")
        return await _quoting("cmpl-5", broken())

    resp = TestClient(app, raise_server_exceptions=False).post("/boom")
    assert resp.status_code == 500 and resp.headers[REQUEST_ID_HEADER] == "cmpl-5"
    assert resp.json()["error"]["code"] == "internal"


# ---------------------------------------------------------------------- where the story comes from


def _sources(monkeypatch, found=None, answers=None, jaeger=None):
    """The gateways answer ``found`` (and ``answers``); Jaeger answers ``jaeger(url, params)`` (a dict, None
    for 404, or raises ``TracesError``). Returns the URLs Jaeger was asked."""
    asked = []

    async def gateways(nats_url, request_id, timeout):
        return found, answers if answers is not None else ([found] if found else [])

    def get(url, params=None, timeout=10.0):
        asked.append((url, params))
        return jaeger(url, params) if jaeger else None

    monkeypatch.setattr(story, "ask_gateways", gateways)
    monkeypatch.setattr(story, "_jaeger_get", get)
    return asked


BUFFERED = {"found": True, "gateway": "gw-1", "capacity": 1000, "kept": 5, "request_id": "chatcmpl-1",
            "trace_id": TRACE, "in_progress": False, "dropped_spans": 0, "spans": COLD[:1] + COLD[2:3]}


def test_without_a_traces_url_the_story_is_the_gateways(monkeypatch):
    asked = _sources(monkeypatch, found=BUFFERED)
    told = story.find_story("chatcmpl-1", "nats://x", None, 1.0)
    assert told["source"] == "gateway gw-1: its own spans" and told["spans"] == BUFFERED["spans"]
    assert any("WARMSERVE_TRACES_URL" in n for n in told["notes"]) and asked == []


def test_with_a_traces_url_jaeger_has_the_whole_trace_and_the_gateway_adds_what_is_not_exported_yet(monkeypatch):
    asked = _sources(monkeypatch, found=BUFFERED, jaeger=lambda url, params: JAEGER_TRACE)
    told = story.find_story("chatcmpl-1", "nats://x", "http://jaeger:16686/", 1.0)
    assert asked == [(f"http://jaeger:16686/api/traces/{TRACE}", None)]  # the trace id came from the gateway
    names = sorted(s["name"] for s in told["spans"])
    assert names == ["gateway.queue", "gateway.request", "worker.activate", "worker.generate"]
    assert told["source"] == "Jaeger at http://jaeger:16686/ and gateway gw-1 (1 spans not exported yet)"


def test_a_request_the_gateways_forgot_is_searched_in_jaeger_by_its_id(monkeypatch):
    def jaeger(url, params):
        if params:  # the search
            assert params["service"] == "warmserve-gateway" and params["operation"] == "gateway.request"
            assert json.loads(params["tags"]) == {"warmserve.request_id": "chatcmpl-1"}
            return {"data": JAEGER_TRACE["data"]}
        return JAEGER_TRACE

    asked = _sources(monkeypatch, answers=[{"found": False, "capacity": 1000}], jaeger=jaeger)
    told = story.find_story("chatcmpl-1", "nats://x", "http://jaeger:16686", 1.0)
    assert [u for u, _ in asked] == ["http://jaeger:16686/api/traces", f"http://jaeger:16686/api/traces/{TRACE}"]
    assert told["trace_id"] == TRACE and told["source"] == "Jaeger at http://jaeger:16686"
    assert len(told["spans"]) == 3


def test_jaeger_away_falls_back_to_the_gateway_and_nowhere_is_a_clear_error(monkeypatch):
    def away(url, params):
        raise story.TracesError("ConnectError: refused")

    _sources(monkeypatch, found=BUFFERED, jaeger=away)
    told = story.find_story("chatcmpl-1", "nats://x", "http://jaeger:16686", 1.0)
    assert told["spans"] == BUFFERED["spans"] and any("could not be asked" in n for n in told["notes"])

    _sources(monkeypatch, answers=[{"found": False, "capacity": 1000}], jaeger=lambda url, params: None)
    with pytest.raises(SystemExit) as gone:
        story.find_story("chatcmpl-1", "nats://x", "http://jaeger:16686", 1.0)
    assert "not in the last 1000 requests of any gateway" in str(gone.value)
    assert "has no trace with warmserve.request_id=chatcmpl-1" in str(gone.value)
