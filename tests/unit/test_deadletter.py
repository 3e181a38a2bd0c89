"""Which failures of a durable consumer's handler are retried and which are given up on."""

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
    assert 'warmserve_dead_letters_total{service="placement",stream="WARMSERVE_FORECAST"}' in text
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit, match="cannot serve metrics on 127.0.0.1"):
            metrics.serve("127.0.0.1", taken.getsockname()[1])
    metrics.serve("127.0.0.1", 0)  # off: nothing started
