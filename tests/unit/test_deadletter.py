"""Which failures of a durable consumer's handler are retried and which are given up on."""

import base64

import psycopg
import psycopg.errors as pe
import pytest
from sqlalchemy import exc as sa

from shared.deadletter import MAX_BACKOFF_S, TRANSIENT_DELAY_S, Fault, classify, retry_delay, service_of


def wrapped(cls, orig):
    return cls("insert ...", {}, orig)


@pytest.mark.parametrize("exc, fault", [
    (wrapped(sa.DataError, pe.StringDataRightTruncation("value too long for type character varying(32)")), Fault.POISON),
    (wrapped(sa.IntegrityError, pe.NotNullViolation("null value")), Fault.POISON),
    (wrapped(sa.DBAPIError, pe.NumericValueOutOfRange("out of range")), Fault.POISON),  # SQLSTATE 22 however wrapped
    (wrapped(sa.OperationalError, psycopg.OperationalError("connection refused")), Fault.TRANSIENT),
    (wrapped(sa.OperationalError, pe.AdminShutdown("terminating connection")), Fault.TRANSIENT),
    (wrapped(sa.InterfaceError, psycopg.InterfaceError("connection closed")), Fault.TRANSIENT),
    (wrapped(sa.ProgrammingError, pe.UndefinedTable("no relation model_events")), Fault.TRANSIENT),  # not migrated yet
    (sa.TimeoutError("pool exhausted"), Fault.TRANSIENT),
    (ConnectionRefusedError(), Fault.TRANSIENT),
    (TimeoutError(), Fault.TRANSIENT),
    (RuntimeError("a bug"), Fault.UNKNOWN),
    (ValueError("a bug"), Fault.UNKNOWN),
])
def test_classify(exc, fault):
    assert classify(exc) is fault


def test_retries_back_off_and_an_outage_is_retried_steadily():
    assert [retry_delay(Fault.UNKNOWN, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert retry_delay(Fault.UNKNOWN, 50) == MAX_BACKOFF_S
    assert retry_delay(Fault.TRANSIENT, 500) == TRANSIENT_DELAY_S


def test_a_dead_letter_names_the_service_that_runs_the_consumer():
    assert service_of("orchestrator-events") == "orchestrator"
    assert service_of("placement-history") == "placement"
    assert service_of("forecaster") == "forecaster"
    assert service_of("some-test") == "some-test"
    assert service_of("Not.A.Token") == "unknown"


def test_the_dead_letter_counter_is_served_on_the_metrics_port_and_a_taken_port_is_a_clear_error():
    import socket

    import httpx

    from shared import metrics
    from tooling.localcluster.processes import free_port

    port = free_port()
    metrics.serve("127.0.0.1", port)
    metrics.DEAD_LETTERS.labels("placement", "WARMSERVE_FORECAST").inc()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'warmserve:dead_letters_total{service="placement",stream="WARMSERVE_FORECAST"}' in text
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit, match="cannot serve metrics on 127.0.0.1"):
            metrics.serve("127.0.0.1", taken.getsockname()[1])
    metrics.serve("127.0.0.1", 0)  # off: nothing started


class _Msg:
    """Just what shared.deadletter reads of a JetStream message."""

    def __init__(self, data: bytes):
        from types import SimpleNamespace

        self.data, self.subject = data, "warmserve.event.worker.w0"
        self.metadata = SimpleNamespace(stream="WARMSERVE_EVENTS", sequence=SimpleNamespace(stream=7), num_delivered=1)
        self.acted = []

    async def term(self):
        self.acted.append("term")

    async def nak(self, delay=None):
        self.acted.append("nak")


def test_a_payload_too_large_for_a_dead_letter_is_cut_to_fit_and_flagged():
    from shared.deadletter import letter

    for data in (b"{" + b'"\n' * 5000, bytes(range(256)) * 40):  # escapes double it or more; bytes go as base64
        small = letter(_Msg(data), "orchestrator-events", "malformed", ValueError("bad"), 0.0)
        assert not small.payload_truncated and small.payload_bytes == len(data)
        cut = letter(_Msg(data), "orchestrator-events", "malformed", ValueError("bad"), 0.0, max_bytes=4000)
        assert cut.payload_truncated and cut.payload_bytes == len(data) and 3900 < len(cut.encode()) <= 4000
        kept = base64.b64decode(cut.payload) if cut.payload_base64 else cut.payload.encode()
        assert data.startswith(kept) and kept


async def test_a_dead_letter_that_can_never_fit_terminates_the_message_instead_of_redelivering_it():
    import nats.errors

    from shared.deadletter import give_up

    class TooSmall:
        async def publish(self, *args, **kwargs):
            raise nats.errors.MaxPayloadError

    msg = _Msg(b"{not json")
    assert await give_up(TooSmall(), msg, "orchestrator-events", "malformed", ValueError("bad"), max_payload=100) is False
    assert msg.acted == ["term"]
