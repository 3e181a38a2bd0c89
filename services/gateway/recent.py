"""The gateway's memory of its recent requests: each one's spans as this process recorded them.

``RecentRequests`` is an OpenTelemetry ``SpanProcessor`` on the process's tracer provider. A ``gateway.request``
span that starts (with its ``warmserve.request_id``, of this gateway) opens an entry keyed by its trace id; every
span of that trace that ends in this process (the request span itself, ``gateway.queue``, and in a test that runs
the services in one process theirs too) is kept there. The newest ``capacity`` requests are kept, the oldest
forgotten first, and at most ``max_spans`` spans each (the request span always, the first ``max_spans - 1`` of
the others; what was left out is counted). Spans are kept as the SDK hands them over, a reference each: turning
them into plain dicts (``span_dict``) is left to the rare question, not paid on every request.

The spans are recorded whether or not they are exported (``shared.telemetry.setup_tracing`` always installs the
SDK's provider: without an OTLP endpoint it has no exporter, and this processor is its only one). What happens in
other processes (the orchestrator's scale-up, a worker's activation and prefill) is in their spans, which only a
trace backend has: ``warmserve request ID`` shows those with ``WARMSERVE_TRACES_URL``.

The gateway answers ``warmserve.admin.gateway.request`` from here (``story``); docs/operations.md, "A request's
story: warmserve request".
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

log = logging.getLogger("warmserve.gateway")

ROOT_SPAN = "gateway.request"
MAX_SPANS_PER_REQUEST = 64
MAX_VALUE_CHARS = 1000  # a string attribute (an error's detail) is cut to this in an answer


class _Entry:
    __slots__ = ("request_id", "root", "spans", "dropped")

    def __init__(self, request_id: str, root: ReadableSpan):
        self.request_id = request_id
        self.root = root  # the live span until it ends, then its finished copy
        self.spans: list[ReadableSpan] = []  # the trace's other spans that ended here, in the order they ended
        self.dropped = 0


class RecentRequests(SpanProcessor):
    """The spans of the newest ``capacity`` requests of gateway ``gateway_id`` (None: of any gateway in this
    process), ``max_spans`` at most per request."""

    def __init__(self, capacity: int, gateway_id: str | None = None, max_spans: int = MAX_SPANS_PER_REQUEST):
        if max_spans < 1:
            raise ValueError("max_spans must be at least 1 (the request's own span)")
        self.capacity, self.gateway_id, self.max_spans = capacity, gateway_id, max_spans
        self._traces: OrderedDict[int, _Entry] = OrderedDict()  # trace id -> entry, oldest first
        self._by_request: dict[str, int] = {}  # request id -> trace id
        self._lock = threading.Lock()  # spans may end on other threads (not the gateway's, but a test's)
        self.enabled = capacity > 0
        self.attached = False

    # ---- the SpanProcessor

    def on_start(self, span, parent_context=None) -> None:
        if not self.enabled or span.name != ROOT_SPAN:
            return
        attributes = span.attributes or {}
        request_id = attributes.get("warmserve.request_id")
        if not isinstance(request_id, str) or (
                self.gateway_id is not None and attributes.get("warmserve.gateway") != self.gateway_id):
            return
        trace_id = span.context.trace_id
        with self._lock:
            old = self._traces.pop(trace_id, None)
            if old is not None:
                self._by_request.pop(old.request_id, None)
            self._traces[trace_id] = _Entry(request_id, span)
            self._by_request[request_id] = trace_id
            while len(self._traces) > self.capacity:
                gone_trace, gone = self._traces.popitem(last=False)
                if self._by_request.get(gone.request_id) == gone_trace:
                    del self._by_request[gone.request_id]

    def on_end(self, span: ReadableSpan) -> None:
        if not self.enabled:
            return
        entry = self._traces.get(span.context.trace_id)
        if entry is None:
            return
        with self._lock:
            if span.context.span_id == entry.root.context.span_id:
                entry.root = span
            elif len(entry.spans) < self.max_spans - 1:
                entry.spans.append(span)
            else:
                entry.dropped += 1

    def shutdown(self) -> None:
        self.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    # ---- attaching, asking

    def attach(self, provider=None) -> bool:
        """Add this processor to ``provider`` (the process's tracer provider by default). A process that never
        set up tracing (a test) has only OpenTelemetry's no-op provider: nothing is recorded, nothing kept."""
        if not self.enabled or self.attached:
            return self.attached
        provider = provider or trace.get_tracer_provider()
        if not hasattr(provider, "add_span_processor"):
            log.info("no tracer provider with span processors here: recent requests are not kept")
            return False
        provider.add_span_processor(self)
        self.attached = True
        return True

    def close(self) -> None:
        """Keep nothing more, and let go of what is kept (a provider cannot remove a processor: it stays, idle)."""
        self.enabled = False
        with self._lock:
            self._traces.clear()
            self._by_request.clear()

    def __len__(self) -> int:
        return len(self._traces)

    def request_ids(self) -> list[str]:
        """The requests kept, oldest first."""
        with self._lock:
            return [e.request_id for e in self._traces.values()]

    def story(self, request_id: str) -> dict[str, Any] | None:
        """What this process recorded of ``request_id``: its trace id and its spans as plain dicts
        (``span_dict``), the request's own first; None if it is not (or no longer) kept."""
        with self._lock:
            trace_id = self._by_request.get(request_id)
            entry = self._traces.get(trace_id) if trace_id is not None else None
            if entry is None:
                return None
            root, spans, dropped = entry.root, list(entry.spans), entry.dropped
        return {"request_id": request_id, "trace_id": format(trace_id, "032x"), "gateway": self.gateway_id,
                "in_progress": root.end_time is None, "dropped_spans": dropped,
                "spans": [span_dict(root)] + [span_dict(s) for s in spans]}


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    """A span as the plain dict ``tooling/cli/request.py`` renders (times in microseconds since the epoch;
    ``duration_us`` None for a span still running)."""
    ctx = span.context
    end = span.end_time
    resource = span.resource.attributes if span.resource is not None else {}
    return {
        "trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent is not None else None,
        "name": span.name, "service": str(resource.get("service.name", "")),
        "start_us": span.start_time // 1000, "duration_us": (end - span.start_time) // 1000 if end else None,
        "attributes": _plain(span.attributes),
        "events": [{"name": e.name, "time_us": e.timestamp // 1000, "attributes": _plain(e.attributes)}
                   for e in span.events],
        "error": span.status.status_code is trace.StatusCode.ERROR,
    }


def _plain(attributes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (attributes or {}).items():
        if isinstance(v, str) and len(v) > MAX_VALUE_CHARS:
            v = v[:MAX_VALUE_CHARS] + f"... ({len(v) - MAX_VALUE_CHARS} more characters)"
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out
