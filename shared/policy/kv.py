"""KV reservation (docs/design.md, "Prewarming and scaling"): an instance keeps at most ``total_blocks x in_flight / B`` free KV
blocks; memory beyond that goes back to the worker's pool as prewarm capacity, and comes back when
load rises."""

from __future__ import annotations

import math


def free_blocks_target(total_blocks: int, in_flight: int, batch_capacity: int) -> int:
    """Free blocks an instance should keep for its current load (at least one request's worth)."""
    if total_blocks <= 0:
        return 0
    share = math.ceil(total_blocks * max(in_flight, 1) / max(batch_capacity, 1))
    return min(share, total_blocks)


def kv_bytes_to_keep(used_blocks: int, target_free_blocks: int, block_bytes: int, max_bytes: int) -> int:
    """Bytes of KV cache to hold: what is in use plus the free target, never above the instance's maximum."""
    want = (max(used_blocks, 0) + max(target_free_blocks, 0)) * block_bytes
    return min(max(want, max(used_blocks, 0) * block_bytes), max_bytes)


def reclaimable_bytes(held_bytes: int, used_blocks: int, target_free_blocks: int, block_bytes: int) -> int:
    """What the instance holds beyond its target: memory the worker could hand to prewarming."""
    return max(held_bytes - (used_blocks + target_free_blocks) * block_bytes, 0)


def next_kv_target(current: int | None, total_blocks: int, in_flight: int, batch_capacity: int,
                   hysteresis: float = 0.1) -> int | None:
    """The free-block target to send to an instance, or None when the one it has is close enough.

    A rise is sent at once (capacity must come back when load rises); a fall only once it exceeds
    ``hysteresis`` x total blocks, so a fluctuating load does not churn memory between roles.
    """
    want = free_blocks_target(total_blocks, in_flight, batch_capacity)
    if current is None or want > current:
        return want
    if current - want >= max(1, math.ceil(hysteresis * total_blocks)):
        return want
    return None
