"""The worker's state machine: absent -> loading -> prewarmed -> active -> draining -> absent.

Transport-free: the NATS wiring in ``main`` calls these methods and forwards the events they
emit. Every transition is reported with the bytes it moved and the seconds it took.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from services.gpu_worker.engines import Delta, Engine, EngineError
from services.gpu_worker import metrics
from services.gpu_worker.memory import PAGE_BYTES, MemoryPool, pages
from shared.policy.keepalive import IdleCopy, IdleCopyPolicy, victims
from shared.policy.kv import kv_bytes_to_keep, reclaimable_bytes
from shared.messages import (
    FENCED,
    CommandKind, CommandResult, CopyState, ErrorInfo, InferRequest, ModelCopy, ModelSpec, Outcome, WorkerCommand,
    WorkerEvent,
)

log = logging.getLogger(__name__)


@dataclass
class Copy:
    spec: ModelSpec
    state: CopyState
    since_s: float
    instance_id: str | None = None
    in_flight: int = 0
    resident_bytes: int = 0  # measured by the engine
    kv_granted_bytes: int = 0  # KV cache granted at activation: the most a KV target can take back
    kv_target_free_blocks: int | None = None
    made: Outcome | None = None  # how the active instance was made (gateways label waiting requests by it)
    shared: bool = False  # the active instance is a guest next to another model's (the shared tier)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    requests: set[asyncio.Task] = field(default_factory=set)


class Worker:
    def __init__(self, worker_id: str, engine: Engine, memory: MemoryPool, *,
                 batch_capacity: int = 32, kv_bytes_per_instance: int | None = None,
                 emit: Callable[[WorkerEvent], None] = lambda e: None, clock: Callable[[], float] = time.time,
                 idle_copy_policy: IdleCopyPolicy = "evict"):
        self.worker_id = worker_id
        self.engine = engine
        self.memory = memory
        self.batch_capacity = batch_capacity
        self.kv_bytes_per_instance = kv_bytes_per_instance
        self.copies: dict[str, Copy] = {}
        self._emit = emit
        self._clock = clock
        self.idle_copy_policy = idle_copy_policy  # which prewarmed copies make room first (shared.policy.keepalive)
        self._results: OrderedDict[str, asyncio.Future[CommandResult]] = OrderedDict()
        self.fence_epoch = 0  # the highest orchestrator term seen on a command: lower ones come from a deposed leader
        self._lock = asyncio.Lock()  # one memory-changing command at a time
        # what a loaded copy measured beyond its catalog bytes (engine process, runtime, CPU KV space): the
        # largest seen, so the next load reserves its likely footprint instead of finding out afterwards
        self.engine_overhead_bytes = 0
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ state

    def snapshot(self) -> list[ModelCopy]:
        out = []
        for c in self.copies.values():
            usage = self.engine.kv_usage(c.spec.slug) if c.state is CopyState.ACTIVE else None
            out.append(ModelCopy(
                model=c.spec.slug, state=c.state, weight_bytes=self.memory.weights.get(c.spec.slug, 0) * PAGE_BYTES,
                instance_id=c.instance_id, in_flight=c.in_flight, since_s=c.since_s, resident_bytes=c.resident_bytes,
                kv_bytes=self.memory.kv.get(c.spec.slug, 0) * PAGE_BYTES,
                kv_total_blocks=usage.total_blocks if usage else 0, kv_used_blocks=usage.used_blocks if usage else 0,
                kv_target_free_blocks=c.kv_target_free_blocks, made=c.made, shared=c.shared))
        return out

    def reclaimable_bytes(self) -> int:
        """KV cache the active instances hold beyond their free-block targets (0 for one without a target)."""
        total = 0
        for copy in self.actives():
            usage = self.engine.kv_usage(copy.spec.slug)
            if copy.kv_target_free_blocks is None or usage is None:
                continue
            total += reclaimable_bytes(self.memory.kv.get(copy.spec.slug, 0) * PAGE_BYTES, usage.used_blocks,
                                       copy.kv_target_free_blocks, usage.block_bytes)
        return total

    def actives(self) -> list[Copy]:
        """The serving instances: one, or several under the shared tier."""
        return [c for c in self.copies.values() if c.state is CopyState.ACTIVE]

    def _move(self, copy: Copy, to: CopyState, *, n_bytes: int = 0, seconds: float = 0.0, reason: str = "") -> None:
        now = self._clock()
        event = WorkerEvent(worker_id=self.worker_id, model=copy.spec.slug, from_state=copy.state, to_state=to,
                            bytes=n_bytes, seconds=round(seconds, 6), reason=reason, at_s=now)
        log.info("%s: %s %s -> %s (%d bytes, %.3f s) %s", self.worker_id, copy.spec.slug, copy.state.value,
                 to.value, n_bytes, seconds, reason)
        copy.state, copy.since_s = to, now
        if to is CopyState.ABSENT:
            self.copies.pop(copy.spec.slug, None)
        self._emit(event)

    # ------------------------------------------------------------------ commands

    async def handle(self, cmd: WorkerCommand) -> CommandResult:
        """Run a command once per command_id; a repeat gets the first result. A command stamped with an
        orchestrator term below the highest seen is refused (``fenced``): its sender was deposed."""
        if cmd.epoch is not None:
            if cmd.epoch < self.fence_epoch:
                return CommandResult(command_id=cmd.command_id, ok=False, error=ErrorInfo(
                    code=FENCED, message=f"{self.worker_id} takes commands of orchestrator term {self.fence_epoch} "
                                         f"or later, not {cmd.epoch}: a newer orchestrator leads"))
            self.fence_epoch = cmd.epoch
        fut = self._results.get(cmd.command_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._results[cmd.command_id] = fut
            while len(self._results) > 1024:
                self._results.popitem(last=False)
            started = time.monotonic()

            def result(code: str | None = None, message: str = "", **fields) -> CommandResult:
                return CommandResult(command_id=cmd.command_id, ok=code is None,
                                     error=ErrorInfo(code=code, message=message) if code else None,
                                     seconds=time.monotonic() - started, **fields)
            try:
                fut.set_result(result(**await self._dispatch(cmd)))
            except EngineError as exc:
                fut.set_result(result(code=exc.code, message=str(exc)))
                metrics.ENGINE_ERRORS.labels(self.worker_id, cmd.kind.value, exc.code).inc()
            except Exception as exc:  # report, never crash the worker on one bad command
                log.exception("command %s failed", cmd.kind.value)
                fut.set_result(result(code="internal", message=repr(exc)))
                metrics.ENGINE_ERRORS.labels(self.worker_id, cmd.kind.value, "internal").inc()
            finally:
                if not fut.done():  # cancelled: forget it so a retry runs it again
                    self._results.pop(cmd.command_id, None)
                    fut.set_result(result(code="cancelled", message="the worker stopped before finishing"))
                done = fut.result()
                metrics.COMMAND_SECONDS.labels(self.worker_id, cmd.kind.value,
                                               "ok" if done.ok else done.error.code).observe(done.seconds)
        return await asyncio.shield(fut)

    async def _dispatch(self, cmd: WorkerCommand) -> dict:
        """Run one command; returns the result fields beyond ok/error."""
        if cmd.kind in (CommandKind.PREWARM, CommandKind.ACTIVATE) and cmd.spec is None:
            raise EngineError("bad_command", f"{cmd.kind.value} needs the model spec")
        if cmd.spec is not None and cmd.spec.slug != cmd.model:
            raise EngineError("bad_command", f"spec is for {cmd.spec.slug}, command for {cmd.model}")
        if cmd.kind is CommandKind.PREWARM:
            await self.prewarm(cmd.spec, reason=cmd.reason or "prewarm")
            return {}
        if cmd.kind is CommandKind.EVICT:
            await self.evict(cmd.model, reason=cmd.reason or "evict")
            return {}
        if cmd.kind is CommandKind.ACTIVATE:
            if cmd.share and cmd.replace_active:
                raise EngineError("bad_command", "activate with share and replace_active: choose one")
            return {"instance_id": await self.activate(cmd.spec, reason=cmd.reason or "activate",
                                                       replace_active=cmd.replace_active, share=cmd.share)}
        if cmd.kind is CommandKind.DEACTIVATE:
            await self.deactivate(cmd.model, instance_id=cmd.instance_id, drain=cmd.drain,
                                  reason=cmd.reason or "deactivate")
            return {}
        if cmd.kind is CommandKind.SET_KV_TARGET:
            if cmd.kv_free_blocks is None:
                raise EngineError("bad_command", "set_kv_target needs kv_free_blocks")
            return {"kv_bytes": await self.set_kv_target(cmd.model, cmd.kv_free_blocks)}
        raise EngineError("bad_command", f"unknown command {cmd.kind}")

    async def prewarm(self, spec: ModelSpec, reason: str = "prewarm", make_room: bool = False) -> Copy:
        """Load the weights; idempotent (an existing or loading copy is returned as it is). It reserves the
        catalog bytes plus the engine overhead measured so far; ``make_room`` (a cold start: a request is
        waiting) evicts other prewarmed copies as far as the load needs."""
        if spec.tensor_parallel_size != 1:
            raise EngineError("unsupported", f"{spec.slug} needs {spec.tensor_parallel_size} devices; "
                                             "this worker drives one")
        async with self._lock:
            copy = self.copies.get(spec.slug)
            fresh = copy is None
            if fresh:
                await self._reclaim_stranded()
                need = spec.parameter_bytes + self.engine_overhead_bytes
                if make_room:
                    await self._evict_for(need, spec.slug)
                if not self.memory.fits(need):
                    raise EngineError("insufficient_memory",
                                      f"{spec.slug} needs {need} bytes, "
                                      f"{self.memory.free_bytes()} free on {self.worker_id}")
                self.memory.take(self.memory.weights, spec.slug, need)
                copy = Copy(spec=spec, state=CopyState.ABSENT, since_s=self._clock())
                self.copies[spec.slug] = copy
                self._move(copy, CopyState.LOADING, reason=reason)
        if not fresh:  # someone else is loading (or loaded) it
            await copy.loaded.wait()
            if self.copies.get(spec.slug) is not copy:
                raise EngineError("load_failed", f"loading {spec.slug} failed")
            return copy
        started = time.monotonic()
        try:
            copy.resident_bytes = await self.engine.load(spec)
            await self._true_up(copy, make_room)
        except BaseException as exc:
            self.memory.give_back(self.memory.weights, spec.slug)
            self._move(copy, CopyState.ABSENT, seconds=time.monotonic() - started, reason=f"load failed: {exc}")
            copy.loaded.set()
            if isinstance(exc, EngineError):
                raise
            if isinstance(exc, Exception):
                raise EngineError("load_failed", f"loading {spec.slug} failed: {exc}") from exc
            raise
        self._move(copy, CopyState.PREWARMED, n_bytes=copy.resident_bytes, seconds=time.monotonic() - started,
                   reason=reason)
        copy.loaded.set()
        return copy

    async def _true_up(self, copy: Copy, make_room: bool = False) -> None:
        """Account what the engine measurably occupies, not what was reserved; a copy that turns out not
        to fit (after evicting other prewarmed copies, with ``make_room``) is unloaded again (nothing is
        left half-loaded)."""
        slug = copy.spec.slug
        self.engine_overhead_bytes = max(self.engine_overhead_bytes, copy.resident_bytes - copy.spec.parameter_bytes)
        extra = pages(copy.resident_bytes) - self.memory.weights.get(slug, 0)
        async with self._lock:
            if extra > self.memory.free_pages and make_room:
                await self._evict_for(extra * PAGE_BYTES, slug)
            if extra <= self.memory.free_pages:  # also when it is smaller than reserved: the rest goes back
                self.memory.weights[slug] += extra
                return
        await self._unload_or_strand(slug)
        raise EngineError("insufficient_memory",
                          f"{slug} occupies {copy.resident_bytes} bytes once loaded; only "
                          f"{self.memory.free_bytes() + self.memory.weights.get(slug, 0) * PAGE_BYTES} "
                          f"were available on {self.worker_id}")

    async def _evict_for(self, n_bytes: int | None, for_model: str) -> None:
        """Evict prewarmed copies of other models until ``n_bytes`` are free (every one for None), in the
        ``idle_copy_policy``'s order (largest first, or least recently used first); none at all when
        evicting every one would not be enough. Called with the lock held."""
        idle = [IdleCopy(c.spec.slug, self.memory.weights.get(c.spec.slug, 0) * PAGE_BYTES, c.since_s)
                for c in self.copies.values() if c.spec.slug != for_model and c.state is CopyState.PREWARMED]
        chosen = victims(idle, self.memory.free_bytes(), n_bytes, self.idle_copy_policy)
        if chosen is None:
            raise EngineError("insufficient_memory", f"{for_model} needs {n_bytes} bytes on {self.worker_id}; "
                                                     "evicting every prewarmed copy would not free enough")
        for slug in chosen:  # an unload that fails keeps its pages charged, as for any other unload
            await self._drop_broken(self.copies[slug], f"evicted to make room for {for_model}")

    async def evict(self, model: str, reason: str = "evict") -> None:
        async with self._lock:
            copy = self.copies.get(model)
            if copy is None:
                return
            if copy.state is not CopyState.PREWARMED:
                raise EngineError("wrong_state", f"{model} is {copy.state.value}; only prewarmed copies are evicted")
            started = time.monotonic()
            freed = await self.engine.unload(model)  # measured
            self.memory.give_back(self.memory.weights, model)
            self._move(copy, CopyState.ABSENT, n_bytes=freed, seconds=time.monotonic() - started, reason=reason)

    async def activate(self, spec: ModelSpec, reason: str = "activate", replace_active: bool = False,
                       share: bool = False) -> str:
        """Turn the model into a serving instance on this worker (loading it first on a cold start).

        With ``replace_active`` the instances of other models are drained first (their copies stay
        prewarmed if memory allows); with ``share`` the model serves next to them, with a KV cache of its
        own (the shared tier); with neither, a busy worker refuses."""
        if replace_active:
            others = [c.spec.slug for c in self.actives() if c.spec.slug != spec.slug]
            await asyncio.gather(*(self.deactivate(m, reason=f"replaced by {spec.slug}") for m in others))
        if share and self.kv_bytes_per_instance is None and not getattr(self.engine, "kv_allocated_at_load", False):
            raise EngineError("unsupported", f"sharing {self.worker_id} needs a fixed KV cache per instance "
                                             "(WARMSERVE_KV_CACHE_BYTES): without one an instance takes all the memory")
        self._check_idle_for(spec.slug, share)
        copy = self.copies.get(spec.slug)
        made = Outcome.COLD if copy is None or copy.state is CopyState.LOADING else Outcome.PREWARM_HIT
        if copy is None or copy.state is CopyState.LOADING:
            copy = await self.prewarm(spec, reason="cold start" if copy is None else reason, make_room=True)
        async with self._lock:
            if copy.state is CopyState.ACTIVE and self.copies.get(spec.slug) is copy:
                return copy.instance_id
            self._check_idle_for(spec.slug, share)
            if copy.state is not CopyState.PREWARMED or self.copies.get(spec.slug) is not copy:
                raise EngineError("wrong_state", f"{spec.slug} is {copy.state.value}")
            started = time.monotonic()
            kv = 0 if getattr(self.engine, "kv_allocated_at_load", False) else await self._make_room_for_kv(copy)
            if kv:
                self.memory.take(self.memory.kv, spec.slug, kv)
            try:
                await self.engine.activate(spec.slug, kv)
            except BaseException:
                self.memory.give_back(self.memory.kv, spec.slug)
                raise
            copy.kv_granted_bytes = kv
            copy.made = made
            copy.shared = any(c is not copy for c in self.actives())
            copy.instance_id = f"{self.worker_id}-{spec.slug}-{uuid.uuid4().hex[:8]}"  # unique across restarts
            self._move(copy, CopyState.ACTIVE, n_bytes=kv, seconds=time.monotonic() - started, reason=reason)
            return copy.instance_id

    async def _make_room_for_kv(self, copy: Copy) -> int:
        """The KV bytes to grant ``copy``, evicting other prewarmed copies as far as that needs
        (and none at all if evicting them all would not be enough). Called with the lock held."""
        slug = copy.spec.slug
        await self._reclaim_stranded()
        want = self.kv_bytes_per_instance  # None: all memory beyond the weights becomes KV cache
        try:
            await self._evict_for(want, slug)
        except EngineError:
            raise EngineError("insufficient_memory", f"{slug}'s KV cache needs {want} bytes; "
                                                     "evicting every prewarmed copy would not free enough") from None
        kv = self.memory.free_bytes() if want is None else want
        if kv <= 0 or not self.memory.fits(kv):
            raise EngineError("insufficient_memory", f"no memory left for {slug}'s KV cache")
        return kv

    def _check_idle_for(self, model: str, share: bool = False) -> None:
        others = [c.spec.slug for c in self.actives() if c.spec.slug != model]
        if others and not share:
            raise EngineError("worker_busy", f"{self.worker_id} is serving {', '.join(others)}")

    async def deactivate(self, model: str, *, instance_id: str | None = None, drain: bool = True,
                         reason: str = "deactivate", drain_timeout_s: float = 60.0) -> None:
        """Drain (or abort) in-flight requests, release the KV cache, keep the weights prewarmed."""
        async with self._lock:
            copy = self.copies.get(model)
            if instance_id is not None and (copy is None or copy.instance_id != instance_id):
                raise EngineError("wrong_instance", f"instance {instance_id} is not live on {self.worker_id}")
            if copy is None or copy.state is not CopyState.ACTIVE:
                return  # already prewarmed, loading, or being drained by another command
            self._move(copy, CopyState.DRAINING, reason=reason)
        if not drain:
            await self._cancel_requests(copy)
        started = time.monotonic()
        while copy.in_flight and time.monotonic() - started < drain_timeout_s:
            await asyncio.sleep(0.05)
        await self._cancel_requests(copy)  # whatever outlived the drain timeout
        async with self._lock:
            try:
                await self.engine.deactivate(model)
            except Exception as exc:  # unknown engine state: drop the copy rather than keep a broken one
                freed = await self._drop_broken(copy, f"deactivation failed: {exc}")
                outcome = (f"the copy was unloaded ({freed} bytes freed)" if freed is not None else
                           "the copy was dropped, but its engine failed to unload: its memory stays charged "
                           "until an unload succeeds")
                raise EngineError("deactivate_failed", f"{model} could not release its KV cache ({exc}); "
                                                       f"{outcome}") from exc
            freed = self.memory.give_back(self.memory.kv, model)
            copy.instance_id = None
            copy.made = None
            copy.shared = False
            copy.kv_target_free_blocks = None
            copy.kv_granted_bytes = 0
            self._move(copy, CopyState.PREWARMED, n_bytes=freed, seconds=time.monotonic() - started, reason=reason)

    async def _cancel_requests(self, copy: Copy) -> None:
        tasks = list(copy.requests)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drop_broken(self, copy: Copy, reason: str) -> int | None:
        """Take a copy out of service (evicted, or in an unknown state) and unload it. Returns the bytes freed, or None
        when the unload failed (its pages stay charged, see ``_unload_or_strand``)."""
        freed = await self._unload_or_strand(copy.spec.slug)
        self._move(copy, CopyState.ABSENT, n_bytes=freed or 0,
                   reason=reason if freed is not None else f"{reason}; unload failed, its memory stays charged")
        return freed

    async def _unload_or_strand(self, slug: str) -> int | None:
        """Unload ``slug`` and return its pages; returns the bytes freed. When the unload fails the engine
        may still hold the memory, so its pages move to ``memory.stranded`` (still charged, never offered
        to another copy) until a retry succeeds (``_reclaim_stranded``); returns None."""
        try:
            freed = await self.engine.unload(slug)
        except Exception as exc:
            held = self.memory.strand(slug)
            log.warning("%s: unloading %s failed (%r); its %d bytes stay charged until an unload succeeds",
                        self.worker_id, slug, exc, held)
            return None
        self.memory.give_back(self.memory.kv, slug)
        self.memory.give_back(self.memory.weights, slug)
        return freed

    async def _reclaim_stranded(self) -> None:
        """Retry the unload of dropped copies whose engine failed to unload them, and return the pages of
        those that succeed. Called with the lock held, before memory is handed out."""
        for slug in list(self.memory.stranded):
            if slug in self.copies:  # loaded again since: an unload now would drop the new copy
                continue
            try:
                freed = await self.engine.unload(slug)
            except Exception as exc:
                log.warning("%s: unloading %s failed again (%r); its memory stays charged", self.worker_id, slug, exc)
                continue
            held = self.memory.give_back(self.memory.stranded, slug)
            log.info("%s: %s unloaded at last (%d bytes freed); its %d charged bytes are free again",
                     self.worker_id, slug, freed, held)

    async def set_kv_target(self, model: str, free_blocks: int) -> int:
        """Keep ``free_blocks`` free KV blocks beyond those in use; give the rest back to the pool (or
        take memory back from it when the target rises). Returns the KV bytes now held."""
        async with self._lock:
            copy = self.copies.get(model)
            if copy is None or copy.state is not CopyState.ACTIVE:
                raise EngineError("wrong_state", f"{model} has no active instance on {self.worker_id}")
            usage = self.engine.kv_usage(model)
            if usage is None:
                raise EngineError("unsupported", f"the {self.engine.name} engine does not report KV usage")
            held = self.memory.kv.get(model, 0) * PAGE_BYTES
            keep = kv_bytes_to_keep(usage.used_blocks, free_blocks, usage.block_bytes, copy.kv_granted_bytes)
            if pages(keep) - pages(held) > self.memory.free_pages:
                raise EngineError("insufficient_memory", f"{model} would need {keep} bytes of KV cache; "
                                                         f"{self.memory.free_bytes()} free on {self.worker_id}")
            now_held = await self.engine.resize_kv(model, keep)
            if pages(now_held) - pages(held) > self.memory.free_pages:  # the engine took more than asked
                await self.engine.resize_kv(model, held)
                raise EngineError("insufficient_memory", f"{model}'s engine kept {now_held} bytes of KV cache, "
                                                         f"more than the {keep} asked for")
            self.memory.give_back(self.memory.kv, model)
            self.memory.take(self.memory.kv, model, now_held)
            copy.kv_target_free_blocks = free_blocks
            log.info("%s: %s KV cache %d -> %d bytes (target %d free blocks)", self.worker_id, model, held,
                     now_held, free_blocks)
            return now_held

    # ------------------------------------------------------------------ inference

    async def generate(self, request: InferRequest) -> AsyncIterator[Delta]:
        copy = self.copies.get(request.model)
        if copy is None or copy.state is not CopyState.ACTIVE:
            state = copy.state.value if copy else "absent"
            raise EngineError("not_active", f"{request.model} is {state} on {self.worker_id}, not active")
        if request.instance_id and request.instance_id != copy.instance_id:
            raise EngineError("not_active", f"instance {request.instance_id} is gone from {self.worker_id}")
        if copy.in_flight >= self.batch_capacity:  # a gateway sends no more, but several gateways at once may
            raise EngineError("overloaded", f"{request.model} on {self.worker_id} is serving {copy.in_flight} "
                                            f"requests, its capacity; retry, or send it to another instance")
        task = asyncio.current_task()
        copy.in_flight += 1
        if task is not None:
            copy.requests.add(task)
        try:
            async for delta in self.engine.generate(request):
                yield delta
        except EngineError as exc:
            if exc.code == "engine_dead":  # out of routing at once; the autoscaler makes a new instance
                dropping = asyncio.get_running_loop().create_task(self._drop_dead(copy, str(exc)))
                self._background.add(dropping)
                dropping.add_done_callback(self._background.discard)
            raise
        finally:
            copy.in_flight -= 1
            copy.requests.discard(task)

    async def _drop_dead(self, copy: Copy, reason: str) -> None:
        async with self._lock:
            if self.copies.get(copy.spec.slug) is copy and copy.state is not CopyState.ABSENT:
                log.warning("%s: dropping %s: %s", self.worker_id, copy.spec.slug, reason)
                await self._cancel_requests(copy)
                await self._drop_broken(copy, reason)

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.copies.values())
