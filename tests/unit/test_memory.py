import pytest

from services.gpu_worker.memory import PAGE_BYTES, MemoryPool, pages


def test_pages_round_up():
    assert pages(1) == 1 and pages(PAGE_BYTES) == 1 and pages(PAGE_BYTES + 1) == 2 and pages(0) == 0


def test_pool_accounts_roles_and_refuses_overcommit():
    pool = MemoryPool(budget_bytes=10 * PAGE_BYTES)
    pool.take(pool.weights, "a", 3 * PAGE_BYTES)
    pool.take(pool.kv, "a", 5 * PAGE_BYTES - 1)
    assert pool.free_pages == 2 and pool.bytes_of(pool.kv) == 5 * PAGE_BYTES
    assert not pool.fits(3 * PAGE_BYTES)
    with pytest.raises(MemoryError):
        pool.take(pool.weights, "b", 3 * PAGE_BYTES)
    assert pool.give_back(pool.weights, "a") == 3 * PAGE_BYTES
    assert pool.free_pages == 5
    assert pool.give_back(pool.weights, "missing") == 0


def test_coalescer_sends_first_and_slow_text_at_once_and_merges_bursts():
    from services.gpu_worker.streaming import ChunkCoalescer

    now = [0.0]
    c = ChunkCoalescer(min_interval_s=0.01, clock=lambda: now[0])
    assert c.add("a") == "a"  # the first token never waits
    now[0] = 0.002
    assert c.add("b") is None  # a burst: held
    now[0] = 0.004
    assert c.add("c") is None
    now[0] = 0.015
    assert c.add("d") == "bcd"  # merged into one chunk
    now[0] = 0.1
    assert c.add("e") == "e"  # slow stream: immediately
    assert c.add("") is None and c.flush() == ""
    now[0] = 0.101
    c.add("f")
    assert c.flush() == "f"


def test_a_stream_stops_after_two_probes_in_a_row_find_nobody_listening():
    from services.gpu_worker.streaming import RequesterWatch

    now = [0.0]
    w = RequesterWatch("_INBOX.w.x", every_s=2.0, misses=2, clock=lambda: now[0])
    t = w.start("req-1")
    first = w.reply_for(t)
    assert first == f"_INBOX.w.x.{t}"  # the first chunk probes at once
    assert w.reply_for(t) is None  # then once every 2 s
    assert w.on_no_responders(first) is None  # one miss may be a reconnect race
    now[0] = 2.0
    second = w.reply_for(t)
    assert w.on_no_responders(second) == "req-1"  # two in a row: nobody listens
    u = w.start("req-2")
    now[0] = 4.0
    assert w.on_no_responders(w.reply_for(u)) is None
    now[0] = 6.0
    w.reply_for(u)  # no answer: the requester got this one
    now[0] = 8.0
    assert w.on_no_responders(w.reply_for(u)) is None  # misses count only in a row
    w.end(u)
    assert w.reply_for(u) is None and w.on_no_responders(f"_INBOX.w.x.{u}") is None
