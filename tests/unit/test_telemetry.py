from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import extract_context, inject_headers


def test_trace_context_survives_a_hop_through_headers():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("gateway") as parent:
        headers = inject_headers({"Nats-Msg-Id": "x"})
    assert headers["Nats-Msg-Id"] == "x"
    assert headers["traceparent"].split("-")[1] == format(parent.get_span_context().trace_id, "032x")
    with tracer.start_as_current_span("worker", context=extract_context(headers)):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["worker"].context.trace_id == spans["gateway"].context.trace_id
    assert spans["worker"].parent.span_id == spans["gateway"].context.span_id


def test_no_context_gives_a_new_root():
    ctx = extract_context(None)
    assert trace.get_current_span(ctx).get_span_context().is_valid is False
