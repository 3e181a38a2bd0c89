"""The per-key limits table that the gateway processes of one host share: each process is a real process
here (forked, inheriting the table's descriptor as the gateway's serving processes do)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from services.gateway.errors import ApiError
from services.gateway.shared_limits import (
    PROBE, LimitTable, LocalRates, SharedKeySlots, SharedRates, create_table_fd,
)
from shared.messages import ApiKeyRecord
from shared.policy.ratelimit import TokenBucket

PROCS = multiprocessing.get_context("fork")  # children inherit the descriptor, as pass_fds gives it


def _table(processes: int = 2, rows: int = 64) -> int:
    return create_table_fd(processes, rows=rows)


# ---------------------------------------------------------------- one process, two columns


def test_slots_are_counted_for_the_host_and_given_back_per_process():
    fd = _table()
    a, b = LimitTable(fd, 0), LimitTable(fd, 1)
    assert a.acquire("k", 3, 0.0) == -1 and b.acquire("k", 3, 0.0) == -1 and b.acquire("k", 3, 0.0) == -1
    assert a.acquire("k", 3, 0.0) == 3  # refused: three in flight on the host
    assert a.in_flight("k") == b.in_flight("k") == 3
    a.release("k")
    a.release("k")  # more releases than acquires in this column never eat another process's slots
    assert b.in_flight("k") == 2
    assert a.acquire("other", 1, 0.0) == -1  # another key has its own count


def test_the_shared_bucket_answers_as_one_token_bucket_would():
    fd = _table()
    a, b = LimitTable(fd, 0), LimitTable(fd, 1)
    bucket = TokenBucket(rate=2.0, burst=4.0)
    times = [10.0, 10.0, 10.1, 10.2, 10.2, 10.3, 11.0, 11.0, 11.9, 15.0]
    for i, now in enumerate(times):
        table = a if i % 2 else b  # the two processes take turns
        assert table.take("k", 2.0, 4.0, now) == pytest.approx(bucket.take(now))


def test_a_changed_rate_starts_a_full_bucket():
    fd = _table()
    a = LimitTable(fd, 0)
    assert [a.take("k", 1.0, 1.0, 5.0) > 0 for _ in range(2)] == [False, True]
    assert a.take("k", 5.0, 10.0, 5.0) == 0.0  # the operator raised the key's rate


def test_idle_rows_are_reused_and_a_busy_window_falls_back_to_none():
    fd = _table(rows=PROBE)  # one probe window: every key competes for the same rows
    a = LimitTable(fd, 0)
    for i in range(PROBE):  # every row held by a key with a request in flight
        assert a.acquire(f"busy-{i}", 1, 0.0) == -1
    assert a.acquire("newcomer", 1, 0.0) is None and a.take("newcomer", 1.0, 2.0, 0.0) is None
    a.release("busy-0")  # idle again (no bucket used): its row can go to another key
    assert a.acquire("newcomer", 1, 0.0) == -1 and a.in_flight("newcomer") == 1
    assert a.in_flight("busy-0") == 0  # its count starts afresh, as an idle key's would


def test_the_adapters_answer_as_the_gateway_does():
    fd = _table()
    table = LimitTable(fd, 0)
    slots = SharedKeySlots(default_limit=2, table=table, clock=time.monotonic)
    record = ApiKeyRecord(id="k", name="team", max_concurrency=1)
    release = slots.acquire(record)
    with pytest.raises(ApiError) as exc:
        slots.acquire(record)
    assert exc.value.status == 429 and exc.value.code == "concurrency_limit_exceeded"
    release()
    release()  # once, however often it is called
    assert table.in_flight("k") == 0 and slots.acquire(None)() is None
    rates, local = SharedRates(table), LocalRates()
    assert [rates.take("r", 1.0, 2.0, 3.0) for _ in range(3)] == [local.take("r", 1.0, 2.0, 3.0) for _ in range(3)]


# ---------------------------------------------------------------- real processes


def _hammer(fd: int, index: int, limit: int, wanted: int, witness, peak, admitted, start) -> None:
    """Take and give back slots as fast as possible until ``wanted`` were had; ``witness`` counts the holders
    apart from the table (under its own lock), ``peak`` keeps the most holders seen by either."""
    table = LimitTable(fd, index)
    got, deadline = 0, time.monotonic() + 60
    start.wait()
    while got < wanted and time.monotonic() < deadline:
        if table.acquire("hot", limit, 0.0) != -1:
            continue
        got += 1
        with witness.get_lock():
            witness.value += 1
            peak.value = max(peak.value, witness.value, table.in_flight("hot"))
        time.sleep(0)  # hold it a moment: others try meanwhile
        with witness.get_lock():
            witness.value -= 1
        table.release("hot")
    admitted[index] = got


def _take_burst(fd: int, index: int, attempts: int, admitted, start) -> None:
    table = LimitTable(fd, index)
    start.wait()
    passed = sum(table.take("burst", 1.0, 3000.0, 1000.0) == 0.0 for _ in range(attempts))
    with admitted.get_lock():
        admitted.value += passed


def _acquire_and_die(fd: int, index: int) -> None:
    table = LimitTable(fd, index)
    table.acquire("leak", 5, 0.0)
    table.acquire("leak", 5, 0.0)
    os._exit(3)  # no release, no cleanup: as a crash


def _run(target, *args) -> multiprocessing.Process:
    proc = PROCS.Process(target=target, args=args)
    proc.start()
    return proc


def test_concurrent_processes_never_hold_more_than_the_limit_together():
    processes, limit = 4, 2
    fd = _table(processes)
    witness, peak, admitted = PROCS.Value("i", 0), PROCS.Value("i", 0), PROCS.Array("i", processes)
    start = PROCS.Barrier(processes)
    procs = [_run(_hammer, fd, i, limit, 1_000, witness, peak, admitted, start) for i in range(processes)]
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert 0 < peak.value <= limit
    assert list(admitted) == [1_000] * processes  # every process had its slots: none was shut out
    assert LimitTable(fd, 0).in_flight("hot") == 0


def test_a_burst_is_shared_by_the_processes_not_granted_to_each():
    processes = 3
    fd = _table(processes)
    admitted, start = PROCS.Value("i", 0), PROCS.Barrier(processes)
    procs = [_run(_take_burst, fd, i, 4000, admitted, start) for i in range(processes)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert admitted.value == 3000  # the burst, once for the host (per process: every attempt would pass)


def test_a_process_that_died_holding_slots_leaks_none_once_restarted():
    fd = _table(2)
    dead = _run(_acquire_and_die, fd, 1)
    dead.join(60)
    assert dead.exitcode == 3
    other = LimitTable(fd, 0)
    assert other.in_flight("leak") == 2
    assert other.acquire("leak", 5, 0.0) == -1  # the lock was not left held by the dead process
    LimitTable(fd, 1).reset_process()  # its successor in that column starts
    assert other.in_flight("leak") == 1  # only what process 0 holds


def test_a_table_is_not_mistaken_for_another_file(tmp_path):
    path = tmp_path / "not-a-table"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(ValueError):
            LimitTable(fd, 0)
        with pytest.raises(ValueError):
            LimitTable(_table(processes=2), 2)  # no such column
    finally:
        os.close(fd)
