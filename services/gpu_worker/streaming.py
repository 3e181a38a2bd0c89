"""Coalescing of generated output into bus chunks.

By default (``min_interval_s`` 0) every engine step is its own chunk, as vLLM's server streams, so clients
measure inter-token latency right. With an interval, output is sent at once when the previous chunk went
out at least ``min_interval_s`` ago (so the first token and slow streams are never delayed), and otherwise
held until the next step or the end: fewer NATS messages for a fast engine on a small model. Per-choice
deltas are merged choice by choice. ``RequesterWatch`` stops streams nobody listens to any more.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shared.messages import ChoiceDelta, ToolCallDelta


class ChunkCoalescer:
    def __init__(self, min_interval_s: float = 0.01, clock: Callable[[], float] = time.monotonic):
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._held = ""
        self._held_deltas: list[ChoiceDelta] = []
        self._last_sent = float("-inf")

    def _due(self) -> bool:
        now = self._clock()
        if now - self._last_sent < self.min_interval_s:
            return False
        self._last_sent = now
        return True

    def add(self, text: str) -> str | None:
        """Text to send now, or None to hold it for a little longer."""
        self._held += text
        if not self._held or not self._due():
            return None
        out, self._held = self._held, ""
        return out

    def add_deltas(self, deltas: Iterable[ChoiceDelta]) -> list[ChoiceDelta] | None:
        """Choice deltas to send now (one chunk), or None to hold them for a little longer."""
        self._held_deltas = merge_deltas(self._held_deltas, deltas)
        if not self._held_deltas or not self._due():
            return None
        out, self._held_deltas = self._held_deltas, []
        return out

    def flush(self) -> str:
        """Text still held (at the end of the stream)."""
        out, self._held = self._held, ""
        return out

    def flush_deltas(self) -> list[ChoiceDelta]:
        """Choice deltas still held (at the end of the stream)."""
        out, self._held_deltas = self._held_deltas, []
        return out


def merge_deltas(held: list[ChoiceDelta], new: Iterable[ChoiceDelta]) -> list[ChoiceDelta]:
    """``held`` followed by ``new``, each choice's consecutive deltas merged into one (a choice's finished
    delta stays last). Keeps each choice's order; empty deltas are dropped."""
    out = list(held)
    for d in new:
        if not (d.text or d.logprobs or d.tool_calls or d.finish_reason):
            continue
        at = next((i for i in range(len(out) - 1, -1, -1) if out[i].index == d.index), None)
        if at is None or out[at].finish_reason is not None:
            out.append(d)
            continue
        prev = out[at]
        out[at] = ChoiceDelta(
            index=d.index, text=prev.text + d.text,
            logprobs=(prev.logprobs or []) + (d.logprobs or []) if prev.logprobs or d.logprobs else None,
            tool_calls=_merge_tool_calls(prev.tool_calls, d.tool_calls),
            finish_reason=d.finish_reason, stop_reason=d.stop_reason)
    return out


def _merge_tool_calls(a: list[ToolCallDelta] | None, b: list[ToolCallDelta] | None) -> list[ToolCallDelta] | None:
    """Pieces of tool calls: a piece that only adds arguments to the call before it joins that piece."""
    if not a or not b:
        return a or b
    out = list(a)
    for piece in b:
        last = out[-1]
        if last.index == piece.index and piece.id is None and piece.name is None:
            out[-1] = last.model_copy(update={"arguments": last.arguments + piece.arguments})
        else:
            out.append(piece)
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
