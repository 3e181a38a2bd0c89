"""``warmserve request ID``: one request's story, as the span tree of its trace.

The id is the one the gateway returned (the response body's ``id``, the ``x-request-id`` header). Where the
spans come from:

- every gateway process keeps the spans it recorded of its newest requests (``WARMSERVE_RECENT_REQUESTS``,
  services/gateway/recent.py) and answers ``warmserve.admin.gateway.request`` over NATS with the operator's
  credentials; all are asked at once and the one that has the request answers with its spans. Those are the
  gateway's own: the request, its wait in the queue with the scale-up it asked for and the answer, the worker
  and instance, the outcome, the first token, the tokens;
- with ``WARMSERVE_TRACES_URL`` (a Jaeger query API, e.g. http://127.0.0.1:16686) the whole trace across
  services is read from Jaeger (``GET /api/traces/{trace_id}``): the orchestrator's scale-up, the worker's
  activation and generation with its prefill. The trace id comes from the gateway's answer, or, for a request
  the gateways no longer keep, from a search of Jaeger by the request span's ``warmserve.request_id`` tag.
  Spans the gateway has that Jaeger has not received yet (exports are batched) are added from its answer.

Everything from here on is pure and unit-tested (tests/unit/test_request_story.py): spans are plain dicts
(``trace_id``, ``span_id``, ``parent_id``, ``name``, ``service``, ``start_us``, ``duration_us`` (None: still
running), ``attributes``, ``events`` [{``name``, ``time_us``, ``attributes``}], ``error``), as the gateway
sends them (``services.gateway.recent.span_dict``) and as ``from_jaeger`` makes them of Jaeger's JSON;
``build_tree`` nests them, ``render`` prints the tree. The I/O (NATS, HTTP) is the thin part at the end.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

ROOT_SPAN = "gateway.request"
GATEWAY_SERVICE = "warmserve-gateway"  # the gateway's service.name (shared.telemetry.setup_tracing)
DEFAULT_TRACES_HINT = "http://127.0.0.1:16686"
JAEGER_SEARCH_LIMIT = 20
# tags Jaeger (or the OpenTelemetry SDK) adds to every span: not the request's story
NOISE = frozenset({"span.kind", "internal.span.format", "otel.scope.name", "otel.scope.version", "otel.library.name",
                   "otel.library.version", "otel.status_code", "otel.status_description", "error",
                   "warmserve.request_id", "w3c.tracestate"})
NOISE_PREFIXES = ("telemetry.", "process.", "host.")
RENAMED = {"http.response.status_code": "status", "error.type": "error"}
MAX_SHOWN_CHARS = 200


# ---------------------------------------------------------------------- Jaeger's JSON -> span dicts


def norm_id(value: Any, width: int) -> str:
    """A hex trace or span id as 32 (16) lowercase digits (Jaeger drops leading zeros of a 64-bit id)."""
    return str(value or "").strip().lower().zfill(width)


def _kv(items: list[dict] | None) -> dict[str, Any]:
    return {t["key"]: t.get("value") for t in items or () if isinstance(t, dict) and "key" in t}


def from_jaeger(doc: dict, trace_id: str | None = None) -> list[dict]:
    """The spans of one trace of a Jaeger query answer (``GET /api/traces/{id}``: ``{"data": [trace]}``):
    the trace ``trace_id``, or the first. A span's parent is its ``CHILD_OF`` reference (else its first
    reference); an event is a log, named by its ``event`` field."""
    traces = [t for t in (doc.get("data") or []) if isinstance(t, dict)]
    if trace_id is not None:
        traces = [t for t in traces if norm_id(t.get("traceID"), 32) == norm_id(trace_id, 32)] or traces[:0]
    if not traces:
        return []
    trace = traces[0]
    processes = trace.get("processes") or {}
    spans = []
    for s in trace.get("spans") or []:
        refs = [r for r in s.get("references") or [] if isinstance(r, dict) and r.get("spanID")]
        parent = next((r for r in refs if r.get("refType") == "CHILD_OF"), refs[0] if refs else None)
        tags = _kv(s.get("tags"))
        process = processes.get(s.get("processID")) or s.get("process") or {}
        events = []
        for log in s.get("logs") or []:
            fields = _kv(log.get("fields"))
            name = str(fields.pop("event", "log"))
            events.append({"name": name, "time_us": int(log.get("timestamp", 0)), "attributes": fields})
        spans.append({
            "trace_id": norm_id(s.get("traceID") or trace.get("traceID"), 32), "span_id": norm_id(s.get("spanID"), 16),
            "parent_id": norm_id(parent["spanID"], 16) if parent else None,
            "name": s.get("operationName", ""), "service": process.get("serviceName", ""),
            "start_us": int(s.get("startTime", 0)), "duration_us": int(s.get("duration", 0)),
            "attributes": {k: v for k, v in tags.items()}, "events": events,
            "error": tags.get("error") in (True, "true") or tags.get("otel.status_code") == "ERROR",
        })
    return spans


def trace_id_in_search(doc: dict, request_id: str) -> str | None:
    """The trace whose ``gateway.request`` span is ``request_id``'s, in a Jaeger search answer
    (``GET /api/traces?service=...&tags=...``: ``{"data": [trace, ...]}``)."""
    for trace in doc.get("data") or []:
        for s in trace.get("spans") or []:
            if s.get("operationName") == ROOT_SPAN and _kv(s.get("tags")).get("warmserve.request_id") == request_id:
                return norm_id(s.get("traceID") or trace.get("traceID"), 32)
    return None


def merge(primary: list[dict], extra: list[dict]) -> list[dict]:
    """``primary``'s spans and those of ``extra`` it lacks (by span id)."""
    have = {s["span_id"] for s in primary}
    return primary + [s for s in extra if s["span_id"] not in have]


# ---------------------------------------------------------------------- the tree


def build_tree(spans: list[dict]) -> list[dict]:
    """The spans nested by parent (each a copy with ``children``), siblings in start order. A span whose
    parent is not among them (in another process's spans that did not come, or the trace's root) is a root."""
    nodes = {s["span_id"]: {**s, "children": []} for s in spans}
    roots = []
    for node in nodes.values():
        parent = nodes.get(node.get("parent_id")) if node.get("parent_id") != node["span_id"] else None
        (parent["children"] if parent is not None else roots).append(node)

    def order(level: list[dict]) -> list[dict]:
        level.sort(key=lambda n: (n["start_us"], n["name"]))
        for n in level:
            order(n["children"])
        return level
    return order(roots)


def walk(tree: list[dict], depth: int = 0):
    """(depth, node) of every node, depth first."""
    for node in tree:
        yield depth, node
        yield from walk(node["children"], depth + 1)


def request_span(spans: list[dict], request_id: str) -> dict | None:
    """The gateway's ``gateway.request`` span of ``request_id`` (else any ``gateway.request``)."""
    roots = [s for s in spans if s["name"] == ROOT_SPAN]
    return next((s for s in roots if s["attributes"].get("warmserve.request_id") == request_id),
                roots[0] if roots else None)


def _ms(us: float) -> str:
    return f"{us / 1000:.1f} ms"


def _seconds(v: Any) -> str:
    return f"{float(v) * 1000:.1f} ms" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."


def facts(attributes: dict[str, Any]) -> list[str]:
    """An attribute set as ``key=value`` words: ``warmserve.`` left off, seconds (``*_s``) in ms, the
    backends' own tags left out."""
    out = []
    for key, v in attributes.items():
        if key in NOISE or key.startswith(NOISE_PREFIXES) or v in ("", None):
            continue
        name = RENAMED.get(key, key.removeprefix("warmserve."))
        if name.endswith("_s") and isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"{name[:-2]}={_seconds(v)}")
        else:
            out.append(f"{name}={_value(v)}")
    return out


def _service(name: str) -> str:
    return name.removeprefix("warmserve-")


def summary(spans: list[dict], request_id: str) -> list[str]:
    """The request in a few words, from its spans: outcome, worker, queue wait, scale-up, activation, prefill,
    first token, tokens, status, total. Only what a span says: nothing is estimated."""
    root = request_span(spans, request_id)
    if root is None:
        return []
    a = root["attributes"]
    start = root["start_us"]
    words = []
    if a.get("warmserve.outcome"):
        words.append(f"outcome {a['warmserve.outcome']}")
    if a.get("warmserve.worker"):
        words.append(f"worker {a['warmserve.worker']}" + (f" (instance {a['warmserve.instance']})"
                                                          if a.get("warmserve.instance") else ""))
    if "warmserve.queue_wait_s" in a:
        words.append(f"queue wait {_seconds(a['warmserve.queue_wait_s'])}")
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    scale = by_name.get("orchestrator.scale_up")
    answered = [e for s in by_name.get("gateway.queue", []) for e in s["events"] if e["name"] == "scale_up.answered"]
    if scale and scale[0]["duration_us"] is not None:
        words.append(f"scale-up {_ms(scale[0]['duration_us'])} (orchestrator)")
    elif answered and isinstance(answered[0]["attributes"].get("scale_up_s"), (int, float)):
        words.append(f"scale-up {_seconds(answered[0]['attributes']['scale_up_s'])} (as the orchestrator answered)")
    elif any(e["name"] == "scale_up.asked" for s in by_name.get("gateway.queue", []) for e in s["events"]):
        words.append("scale-up asked")
    activate = by_name.get("worker.activate")
    if activate and activate[0]["duration_us"] is not None:
        words.append(f"activation {_ms(activate[0]['duration_us'])}")
    prefill = [e for s in by_name.get("worker.generate", []) for e in s["events"]
               if e["name"] == "first_token" and "prefill_s" in e["attributes"]]
    if prefill:
        words.append(f"prefill {_seconds(prefill[0]['attributes']['prefill_s'])}")
    first = next((e for e in root["events"] if e["name"] == "first_token"), None)
    if first is not None:
        words.append(f"first token at +{_ms(first['time_us'] - start)}")
    if "warmserve.completion_tokens" in a:
        words.append(f"tokens {a.get('warmserve.prompt_tokens', '?')} prompt + {a['warmserve.completion_tokens']} "
                     "completion")
    if "http.response.status_code" in a:
        words.append(f"status {a['http.response.status_code']}")
    if a.get("error.type"):
        words.append(f"error {a['error.type']}")
    words.append(f"took {_ms(root['duration_us'])}" if root["duration_us"] is not None else "still running")
    return words


def render(story: dict) -> str:
    """The story as text: a header, the summary, then the tree, each span with its start offset from the first
    span and its duration, its key attributes, and its events at their offsets."""
    spans = story["spans"]
    tree = build_tree(spans)
    t0 = min((s["start_us"] for s in spans), default=0)
    lines = [f"request {story['request_id']}  trace {story.get('trace_id') or '?'}  ({story.get('source', '')})"]
    words = summary(spans, story["request_id"])
    if words:
        lines.append("  " + " · ".join(words))
    lines.append("")
    for depth, node in walk(tree):
        pad = "  " * depth
        took = _ms(node["duration_us"]) if node["duration_us"] is not None else "running"
        head = f"{pad}{node['name']} [{_service(node['service'])}]  +{_ms(node['start_us'] - t0)}  {took}"
        if node.get("error"):
            head += "  ERROR"
        shown = facts(node["attributes"])
        lines.append(head + ("  " + " ".join(shown) if shown else ""))
        for e in sorted(node["events"], key=lambda e: e["time_us"]):
            more = facts(e["attributes"])
            lines.append(f"{pad}  · {e['name'].removeprefix('warmserve.')} at +{_ms(e['time_us'] - t0)}"
                         + ("  " + " ".join(more) if more else ""))
    for note in story.get("notes", []):
        lines.append(f"\n{note}")
    return "\n".join(lines)


def as_json(story: dict) -> dict:
    """``--json``: the story with its spans nested."""
    return {k: v for k, v in story.items() if k != "spans"} | {"tree": build_tree(story["spans"])}


def not_found_message(request_id: str, answers: list[dict], traces_url: str | None,
                      jaeger_error: str | None = None) -> str:
    """Why ``request_id`` has no story, and where else to look."""
    if answers:
        kept = max((a.get("capacity", 0) for a in answers), default=0)
        where = (f"not in the last {kept} requests of any gateway ({len(answers)} answered)" if kept
                 else f"not kept by any gateway ({len(answers)} answered; WARMSERVE_RECENT_REQUESTS is 0)")
    else:
        where = "no gateway answered over NATS"
    if traces_url:
        return (f"request {request_id}: {where}, and Jaeger at {traces_url} "
                + (f"could not be asked ({jaeger_error})" if jaeger_error
                   else "has no trace with warmserve.request_id=" + request_id))
    return (f"request {request_id}: {where}; set WARMSERVE_TRACES_URL to a Jaeger query API (e.g. "
            f"{DEFAULT_TRACES_HINT}) to search older traces and see the whole trace across services")


# ---------------------------------------------------------------------- I/O


async def ask_gateways(nats_url: str, request_id: str, timeout: float) -> tuple[dict | None, list[dict]]:
    """(the answer of the gateway that has the request or None, every gateway's answer)."""
    from shared import bus
    from shared.admin import AdminClient, AdminError

    nc = await bus.connect(nats_url, "warmserve-cli", deadline_s=5)
    try:
        replies = await AdminClient(nc).ask_all("request", {"request_id": request_id}, timeout=timeout,
                                                enough=lambda r: r.ok and bool((r.result or {}).get("found")))
    except AdminError as exc:
        raise SystemExit(f"error ({exc.code}): {exc}") from None
    finally:
        await nc.close()
    answers = [r.result for r in replies if r.ok and isinstance(r.result, dict)]
    return next((a for a in answers if a.get("found")), None), answers


class TracesError(Exception):
    """Jaeger could not be asked (unreachable, or an answer that is not its JSON)."""


def _jaeger_get(url: str, params: dict | None = None, timeout: float = 10.0) -> dict | None:
    import httpx

    try:
        r = httpx.get(url, params=params, timeout=timeout)
    except httpx.HTTPError as exc:
        raise TracesError(f"{exc.__class__.__name__}: {exc}") from None
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise TracesError(f"HTTP {r.status_code} from {url}")
    try:
        return r.json()
    except ValueError:
        raise TracesError(f"{url} did not answer JSON") from None


def jaeger_trace(base: str, trace_id: str) -> list[dict]:
    doc = _jaeger_get(f"{base.rstrip('/')}/api/traces/{trace_id}")
    return from_jaeger(doc, trace_id) if doc else []


def jaeger_search(base: str, request_id: str) -> str | None:
    doc = _jaeger_get(f"{base.rstrip('/')}/api/traces", params={
        "service": GATEWAY_SERVICE, "operation": ROOT_SPAN, "limit": str(JAEGER_SEARCH_LIMIT),
        "tags": json.dumps({"warmserve.request_id": request_id})})
    return trace_id_in_search(doc, request_id) if doc else None


def find_story(request_id: str, nats_url: str, traces_url: str | None, timeout: float) -> dict:
    """The story of ``request_id`` from the gateways and, with ``traces_url``, Jaeger; SystemExit with the
    reason where neither has it."""
    from shared.bus import BusError

    found, answers, nats_error = None, [], None
    try:
        found, answers = asyncio.run(ask_gateways(nats_url, request_id, timeout))
    except BusError as exc:
        if not traces_url:
            raise  # main says what to check about NATS
        nats_error = str(exc)
    notes = [f"(the gateways were not asked: {nats_error})"] if nats_error else []
    spans, source, trace_id, jaeger_error = [], "", found.get("trace_id") if found else None, None
    if traces_url:
        try:
            trace_id = trace_id or jaeger_search(traces_url, request_id)
            spans = jaeger_trace(traces_url, trace_id) if trace_id else []
        except TracesError as exc:
            jaeger_error = str(exc)
            notes.append(f"(Jaeger at {traces_url} could not be asked: {exc}; the gateway's own spans only)")
        if spans:
            source = f"Jaeger at {traces_url}"
            if found:
                added = len(merge(spans, found["spans"])) - len(spans)
                spans = merge(spans, found["spans"])
                source += f" and gateway {found.get('gateway')}" + (f" ({added} spans not exported yet)" if added
                                                                    else "")
    if not spans and found:
        spans = found["spans"]
        source = f"gateway {found.get('gateway')}: its own spans"
        if not traces_url:
            notes.append("Activation and prefill run in other processes: their spans are in the trace backend "
                         f"(set WARMSERVE_TRACES_URL, e.g. {DEFAULT_TRACES_HINT}, for the whole trace).")
    if not spans:
        raise SystemExit("error: " + not_found_message(request_id, answers, traces_url, jaeger_error))
    story = {"request_id": request_id, "trace_id": trace_id, "source": source, "spans": spans,
             "in_progress": any(s["duration_us"] is None for s in spans), "notes": notes}
    if found and found.get("dropped_spans"):
        story["notes"].append(f"({found['dropped_spans']} more spans of this request were not kept by the gateway)")
    return story


def cmd_request(a) -> int:
    from shared.settings import CliSettings, load_settings
    from tooling.cli.client import _nats_url

    story = find_story(a.request_id, _nats_url(), load_settings(CliSettings).traces_url, a.timeout)
    print(json.dumps(as_json(story), indent=2) if a.json else render(story))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("request", help="one request's story: its span tree (queue wait, scale-up, worker, "
                                       "activation, prefill, first token, tokens)")
    p.add_argument("request_id", metavar="ID", help="the id the gateway returned (the body's id, x-request-id)")
    p.add_argument("--json", action="store_true", help="the spans as a JSON tree")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the gateways' answers")
    p.set_defaults(func=cmd_request)
