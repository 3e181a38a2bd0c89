"""The keep-alive idle-copy policy (``idle_copy_policy=keep-lru``): idle copies stay while memory allows and
the least recently used make room first, in the policy, in reconcile and in the worker."""

import pytest

from services.gpu_worker.engines.sim import SimEngine, SimProfile
from services.gpu_worker.memory import PAGE_BYTES, MemoryPool
from services.gpu_worker.worker import Worker
from shared.messages import CommandKind, CopyState, ModelSpec, PlannedCopy
from shared.policy.keepalive import IdleCopy, victims
from shared.policy.reconcile import Action, reconcile
from tests.factories import GB, copy, view, worker

FAST = SimProfile(engine_start_s=0.0, decode_s_per_token_per_gb=0.0, prefill_s_per_token_per_gb=0.0, min_step_s=0.0)


def test_least_recently_used_go_first_and_only_as_far_as_needed():
    idle = [IdleCopy("big-recent", 4 * GB, 300.0), IdleCopy("old", GB, 100.0), IdleCopy("middle", GB, 200.0)]
    assert victims(idle, 0, 2 * GB, "keep-lru") == ["old", "middle"]
    assert victims(idle, GB, 2 * GB, "keep-lru") == ["old"]
    assert victims(idle, 2 * GB, 2 * GB, "keep-lru") == []  # room already
    assert victims(idle, 0, None, "keep-lru") == ["old", "middle", "big-recent"]
    assert victims(idle, 0, 7 * GB, "keep-lru") is None  # not enough even with all: none goes
    assert victims(idle, 0, 2 * GB, "evict") == ["big-recent"]  # the plain policy: largest first


def test_reconcile_keeps_unplanned_copies_unless_a_planned_copy_needs_their_room():
    w1 = worker("w1", copy("a", since_s=50.0), copy("b", since_s=10.0), budget=3 * GB)  # 1 GiB free
    w2 = worker("w2", copy("c", since_s=5.0), budget=3 * GB)
    idle = view(w1, w2)
    assert reconcile([], idle, min_active=0, idle_copy_policy="keep-lru") == []  # memory nobody needs: kept
    assert {a.model for a in reconcile([], idle, min_active=0)} == {"a", "b", "c"}  # evict: all at once
    # a planned copy of a 2 GiB model (measured on w2) on w1: the least recently used copy there makes room
    sized = view(w1, worker("w2", copy("c", since_s=5.0), copy("p", weight_bytes=2 * GB), budget=5 * GB))
    plan = [PlannedCopy(model="p", worker_id="w1")]
    actions = reconcile(plan, sized, min_active=0, idle_copy_policy="keep-lru")
    assert actions == [Action(CommandKind.PREWARM, "w1", "p"), Action(CommandKind.EVICT, "w1", "b")]
    # a model no worker has measured: every unplanned copy on that device goes, oldest first
    plan = [PlannedCopy(model="new", worker_id="w1")]
    assert [a.model for a in reconcile(plan, idle, min_active=0, idle_copy_policy="keep-lru")] == ["new", "b", "a"]


@pytest.mark.parametrize("policy, evicted", [("keep-lru", "old"), ("evict", "big")])
async def test_a_worker_making_room_for_a_cold_start_evicts_by_its_policy(tiny_model, policy, evicted):
    clock = iter(range(100, 1000)).__next__
    w = Worker("w0", SimEngine(FAST), MemoryPool(10 * PAGE_BYTES), kv_bytes_per_instance=PAGE_BYTES,
               clock=lambda: float(clock()), idle_copy_policy=policy)

    def spec(slug, n_pages):
        return ModelSpec(slug=slug, path=str(tiny_model), parameter_bytes=n_pages * PAGE_BYTES)

    await w.prewarm(spec("old", 3))  # loaded first, never used since
    await w.prewarm(spec("big", 4))
    await w.activate(spec("big", 4))
    await w.deactivate("big")  # used just now
    await w.activate(spec("new", 3))  # 3 free pages: one copy must go for the weights and the KV cache
    assert set(w.copies) == {"old", "big", "new"} - {evicted}
    assert w.copies["new"].state is CopyState.ACTIVE
