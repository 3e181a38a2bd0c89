"""Per-API-key limits shared by the gateway processes of one host.

With ``WARMSERVE_GATEWAY_PROCESSES`` above 1 the kernel spreads connections over several processes, and a
client's connections may all land on one of them. A key's rate (token bucket) and its requests in flight
are therefore kept in one small table in shared memory, so the limits hold for the host as a whole: never
``processes`` times the limit, and never a refusal below it because of where the connections landed.

The table is a file the supervisor creates and unlinks at once (nothing is left behind however the
processes end); each process maps the inherited descriptor. Every operation holds a POSIX record lock on
the file for a few microseconds (``fcntl.lockf``: per process, and released by the kernel if its holder
dies, so a crashed process cannot wedge the others). Requests in flight are counted per process, so a
process that restarts clears its own column and a crash leaks no slots.

Rows are found by a hash of the key's id with linear probing over a short window. A row whose key is idle
(nothing in flight, bucket full again) may be taken by another key: an idle row is the same as a fresh
one, so nothing is lost. Should a window hold only busy rows, that key is limited per process instead
(``LimitTable`` returns None), with a warning.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import mmap
import os
import struct
import tempfile
from collections.abc import Callable

from shared.messages import ApiKeyRecord
from shared.policy.ratelimit import TokenBucket

log = logging.getLogger(__name__)

MAGIC = 0x57534C31  # "WSL1"
HEADER = struct.Struct("<IIII")  # magic, rows, processes, reserved
ROWS = 4096  # distinct keys busy at once per host, far more than a gateway serves
PROBE = 32  # rows looked at per key
FLOATS = 4  # tokens, last_s, rate, burst (tokens < 0: a fresh bucket)


def table_bytes(rows: int, processes: int) -> int:
    return HEADER.size + rows * 8 + rows * FLOATS * 8 + rows * processes * 8


def create_table_fd(processes: int, rows: int = ROWS) -> int:
    """A new zeroed table for ``processes`` gateway processes; returns an inheritable descriptor of a file
    that is already unlinked (in /dev/shm where there is one: memory, never written to disk)."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="warmserve-gateway-limits-", dir=folder)
    os.unlink(path)
    os.ftruncate(fd, table_bytes(rows, processes))
    os.pwrite(fd, HEADER.pack(MAGIC, rows, processes, 0), 0)
    os.set_inheritable(fd, True)
    return fd


class LimitTable:
    """One process's view of the shared table; ``index`` is this process's column (0 .. processes-1)."""

    def __init__(self, fd: int, index: int):
        self._fd = fd
        magic, rows, processes, _ = HEADER.unpack(os.pread(fd, HEADER.size, 0))
        if magic != MAGIC or not 0 <= index < processes:
            raise ValueError(f"not a gateway limits table for process {index} (magic {magic:#x}, {processes} processes)")
        self.rows, self.processes, self.index = rows, processes, index
        self._mm = mmap.mmap(fd, table_bytes(rows, processes))
        view = memoryview(self._mm)
        start = HEADER.size
        self._keys = view[start:start + rows * 8].cast("Q")
        start += rows * 8
        self._floats = view[start:start + rows * FLOATS * 8].cast("d")
        start += rows * FLOATS * 8
        self._held = view[start:start + rows * processes * 8].cast("q")
        self._full_warned = False

    def close(self) -> None:
        for v in (self._keys, self._floats, self._held):
            v.release()
        self._mm.close()

    # ---------------------------------------------------------------- locking

    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- rows

    @staticmethod
    @functools.lru_cache(maxsize=ROWS)
    def key_hash(key_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(key_id.encode(), digest_size=8).digest(), "little") or 1

    def _in_flight(self, row: int) -> int:
        base = row * self.processes
        return sum(self._held[base:base + self.processes])

    def _idle(self, row: int, now: float) -> bool:
        f = row * FLOATS
        tokens, last, rate, burst = self._floats[f:f + FLOATS]
        full = tokens < 0 or tokens + (now - last) * rate >= burst
        return full and self._in_flight(row) == 0

    def _existing_row(self, h: int) -> int | None:
        """The row of key hash ``h`` if it has one (lock held)."""
        for i in range(PROBE):
            row = (h + i) % self.rows
            if self._keys[row] == h:
                return row
        return None

    def _row(self, h: int, now: float) -> int | None:
        """The row of key hash ``h``, claiming an empty or idle one if it has none (lock held)."""
        keys, rows = self._keys, self.rows
        free = None
        for i in range(PROBE):
            row = (h + i) % rows
            k = keys[row]
            if k == h:
                return row
            if free is None and (k == 0 or self._idle(row, now)):
                free = row
        if free is None:
            if not self._full_warned:
                self._full_warned = True
                log.warning("the gateway limits table has no free row for a key: its limits are kept per "
                            "process until one frees up")
            return None
        keys[free] = h
        f = free * FLOATS
        self._floats[f], self._floats[f + 1], self._floats[f + 2], self._floats[f + 3] = -1.0, 0.0, 0.0, 0.0
        base = free * self.processes
        for p in range(self.processes):
            self._held[base + p] = 0
        return free

    # ---------------------------------------------------------------- operations

    def take(self, key_id: str, rate: float, burst: float, now: float) -> float | None:
        """The key's token bucket, host-wide: 0.0 if a request may go now, else the seconds until one may
        (``TokenBucket.take``); a changed rate starts a full bucket. None: no row (limit it locally)."""
        h = self.key_hash(key_id)
        self._lock()
        try:
            row = self._row(h, now)
            if row is None:
                return None
            f = row * FLOATS
            floats = self._floats
            tokens, last = floats[f], floats[f + 1]
            if floats[f + 2] != rate or floats[f + 3] != burst:
                tokens = -1.0
            bucket = TokenBucket(rate=rate, burst=burst, tokens=tokens, last_s=last)
            wait = bucket.take(now)
            floats[f], floats[f + 1], floats[f + 2], floats[f + 3] = bucket.tokens, bucket.last_s, rate, burst
            return wait
        finally:
            self._unlock()

    def acquire(self, key_id: str, limit: int, now: float) -> int | None:
        """Take one of the key's ``limit`` slots, host-wide: -1 when taken, else the number in flight (the
        request is refused). None: no row (limit it locally)."""
        h = self.key_hash(key_id)
        self._lock()
        try:
            row = self._row(h, now)
            if row is None:
                return None
            held = self._in_flight(row)
            if held >= limit:
                return held
            self._held[row * self.processes + self.index] += 1
            return -1
        finally:
            self._unlock()

    def release(self, key_id: str) -> None:
        """Give back a slot this process took with ``acquire``."""
        h = self.key_hash(key_id)
        self._lock()
        try:
            row = self._existing_row(h)
            if row is not None:
                cell = row * self.processes + self.index
                if self._held[cell] > 0:
                    self._held[cell] -= 1
        finally:
            self._unlock()

    def in_flight(self, key_id: str) -> int:
        """The key's requests in flight on the whole host (for tests and metrics)."""
        h = self.key_hash(key_id)
        self._lock()
        try:
            row = self._existing_row(h)
            return 0 if row is None else self._in_flight(row)
        finally:
            self._unlock()

    def reset_process(self) -> None:
        """Forget this process's requests in flight (at its start: a predecessor that died leaks none)."""
        self._lock()
        try:
            for row in range(self.rows):
                self._held[row * self.processes + self.index] = 0
        finally:
            self._unlock()


class SharedKeySlots:
    """``KeySlots`` (services/gateway/limits.py) counted across the host's gateway processes: the same
    ``acquire`` and the same 429. A key the table has no row for is counted by this process alone."""

    def __init__(self, default_limit: int, table: LimitTable, clock: Callable[[], float], gateways: int = 1):
        from services.gateway.limits import KeySlots  # imported here: the supervisor needs only the table

        self.local = KeySlots(default_limit, gateways)
        self.default_limit = default_limit
        self.table = table
        self._clock = clock

    def limit(self, record: ApiKeyRecord) -> int:
        return self.local.limit(record)

    def acquire(self, record: ApiKeyRecord | None) -> Callable[[], None]:
        from services.gateway.errors import ApiError

        if record is None:
            return lambda: None
        limit = self.limit(record)
        held = self.table.acquire(record.id, limit, self._clock())
        if held is None:
            return self.local.acquire(record)
        if held >= 0:
            raise ApiError(429, f"API key '{record.name}' has {held} requests in flight, its limit of concurrent "
                                f"requests is {limit}; retry when one has finished",
                           code="concurrency_limit_exceeded", headers={"Retry-After": "1"})
        released = False
        table, key_id = self.table, record.id

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                table.release(key_id)

        return release


class LocalRates:
    """Each key's token bucket in this process alone (one gateway process per host); ``SharedRates``'s
    fallback. A changed rate starts a full bucket."""

    def __init__(self) -> None:
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, key_id: str, rate: float, burst: float, now: float) -> float:
        """0.0 if the key may send a request now, else the seconds until it may."""
        bucket = self.buckets.get(key_id)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            bucket = self.buckets[key_id] = TokenBucket(rate=rate, burst=burst)
        return bucket.take(now)


class SharedRates:
    """The per-key token buckets, host-wide (``LimitTable.take``); a key the table has no row for gets a
    bucket of this process."""

    def __init__(self, table: LimitTable):
        self.table = table
        self.local = LocalRates()

    def take(self, key_id: str, rate: float, burst: float, now: float) -> float:
        wait = self.table.take(key_id, rate, burst, now)
        return self.local.take(key_id, rate, burst, now) if wait is None else wait
