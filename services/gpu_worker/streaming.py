"""Coalescing of generated text into bus chunks.

A fast engine on a small model produces a token every few milliseconds; one NATS message per token
costs more than the tokens are worth. Text is sent at once when the previous chunk went out at least
``min_interval_s`` ago (so the first token and slow streams are never delayed), and otherwise held
until the next token or the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class ChunkCoalescer:
    def __init__(self, min_interval_s: float = 0.01, clock: Callable[[], float] = time.monotonic):
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._held = ""
        self._last_sent = float("-inf")

    def add(self, text: str) -> str | None:
        """Text to send now, or None to hold it for a little longer."""
        self._held += text
        now = self._clock()
        if not self._held or now - self._last_sent < self.min_interval_s:
            return None
        out, self._held, self._last_sent = self._held, "", now
        return out

    def flush(self) -> str:
        """Everything still held (at the end of the stream)."""
        out, self._held = self._held, ""
        return out
