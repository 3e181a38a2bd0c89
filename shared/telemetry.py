"""OpenTelemetry setup and W3C trace context carried in NATS headers.

One request is one trace: the gateway starts it, every bus message carries ``traceparent`` in
its headers, and each service continues it from there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)


def setup_tracing(service: str, otlp_endpoint: str | None = None,
                  extra_processor: SpanProcessor | None = None) -> TracerProvider:
    """Install a tracer provider for ``service``; export over OTLP/HTTP when an endpoint is set. Without one,
    spans are still recorded (the SDK's provider, with no exporter), so in-process processors see them: the
    gateway keeps its recent requests' spans that way (services/gateway/recent.py)."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"warmserve-{service}"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("exporting traces to %s", endpoint)
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers for an outgoing NATS message carrying the current trace context."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context of an incoming NATS message (empty if it carried none)."""
    return propagate.extract(dict(headers or {}))


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
