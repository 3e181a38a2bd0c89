"""Which idle copies make room, and in what order (``idle_copy_policy``).

A prewarmed copy the placement plan does not list is idle weights: a stopped instance's, or one placement
no longer wants. Under ``evict`` the orchestrator evicts it at once (the plan is the only reason to hold
weights), and a worker that needs room for a load evicts the largest copies first (fewest unloads). Under
``keep-lru`` it stays while memory allows (a keep-alive cache, as serverless systems keep an idle instance
around): room for a load, a KV cache or a planned copy is made by evicting the least recently used first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

IdleCopyPolicy = Literal["evict", "keep-lru"]


@dataclass(frozen=True)
class IdleCopy:
    model: str
    bytes: int
    idle_since_s: float  # when it last served or finished loading


def eviction_order(copies: Sequence[IdleCopy], policy: IdleCopyPolicy) -> list[IdleCopy]:
    """``keep-lru``: least recently used first; ``evict``: largest first. Ties by model, for determinism."""
    if policy == "keep-lru":
        return sorted(copies, key=lambda c: (c.idle_since_s, c.model))
    return sorted(copies, key=lambda c: (-c.bytes, c.model))


def victims(copies: Sequence[IdleCopy], free_bytes: int, need_bytes: int | None,
            policy: IdleCopyPolicy) -> list[str] | None:
    """The copies to evict, in order, until ``need_bytes`` are free (all of them for None); None when
    evicting every one would not be enough (then none should go)."""
    order = eviction_order(copies, policy)
    if need_bytes is None:
        return [c.model for c in order]
    if free_bytes + sum(c.bytes for c in order) < need_bytes:
        return None
    out: list[str] = []
    for c in order:
        if free_bytes >= need_bytes:
            break
        out.append(c.model)
        free_bytes += c.bytes
    return out
