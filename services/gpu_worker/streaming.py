"""Coalescing of generated text into bus chunks.

A fast engine on a small model produces a token every few milliseconds; one NATS message per token
costs more than the tokens are worth. Text is sent at once when the previous chunk went out at least
``min_interval_s`` ago (so the first token and slow streams are never delayed), and otherwise held
until the next token or the end. ``RequesterWatch`` stops streams nobody listens to any more.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass


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


class RequesterWatch:
    """Notices that whoever asked for a stream no longer listens, so a generation whose cancel was lost (a
    core-NATS message, sent at most once) or whose gateway died does not run on to its ``max_tokens``.

    Every ``every_s`` one chunk of each stream goes out with a reply subject of this worker's
    (``reply_for``). NATS answers a message that nobody subscribes to with a no-responders status on its
    reply subject at once, and a live requester simply receives the chunk, so ``on_no_responders`` counts
    the probes that found the requester's inbox gone. ``misses`` such probes in a row end the stream: one
    alone may be a race with a reconnect (the requester's subscription not yet restored). The bound: a
    stream stops within about ``misses`` x ``every_s`` of generated output after its requester left."""

    def __init__(self, prefix: str, every_s: float = 2.0, misses: int = 2, clock: Callable[[], float] = time.monotonic):
        self.prefix = prefix  # this worker's own inbox; the shell subscribes to ``prefix.*``
        self.every_s = every_s
        self.misses = misses
        self._clock = clock
        self._ids = itertools.count()
        self._streams: dict[str, _Watched] = {}  # token -> the stream

    def start(self, request_id: str) -> str:
        token = str(next(self._ids))
        self._streams[token] = _Watched(request_id)
        return token

    def end(self, token: str) -> None:
        self._streams.pop(token, None)

    def reply_for(self, token: str) -> str | None:
        """The reply subject for the stream's next chunk when a probe is due, else None."""
        w = self._streams.get(token)
        now = self._clock()
        if w is None or now < w.next_probe_s:
            return None
        if not w.answered:  # the previous probe reached the requester: misses in a row start again
            w.missed = 0
        w.answered, w.next_probe_s = False, now + self.every_s
        return f"{self.prefix}.{token}"

    def on_no_responders(self, subject: str) -> str | None:
        """A probe found nobody listening: the request id to stop, once ``misses`` in a row did."""
        w = self._streams.get(subject.rsplit(".", 1)[-1])
        if w is None or w.answered:
            return None
        w.answered, w.missed = True, w.missed + 1
        return w.request_id if w.missed >= self.misses else None


@dataclass
class _Watched:
    request_id: str
    next_probe_s: float = float("-inf")  # the first chunk probes at once (the requester may have left during prefill)
    answered: bool = True  # the latest probe got a no-responders answer (or none was sent yet)
    missed: int = 0
