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


class Engine(Protocol):
    name: str

    async def load(self, spec: ModelSpec) -> int:
        """Make the model's weights resident; return the bytes they occupy."""

    async def unload(self, model: str) -> None: ...

    async def activate(self, model: str, kv_bytes: int) -> None:
        """Map a KV cache of ``kv_bytes`` for the model so it can serve."""

    async def deactivate(self, model: str) -> None: ...

    def generate(self, request: InferRequest) -> AsyncIterator[Delta]: ...

    async def close(self) -> None: ...


def make_engine(name: str) -> Engine:
    if name == "sim":
        from services.gpu_worker.engines.sim import SimEngine

        return SimEngine()
    raise EngineError("unknown_engine", f"engine {name!r} is not available in this build (use 'sim')")
