"""The vLLM engine's CUDA path with sleep mode, on a real NVIDIA GPU (skipped elsewhere): a prewarmed copy
holds its weights and no KV cache, activation maps the KV cache and serves real tokens, deactivation gives
the KV memory back and keeps the weights, and activating again is fast. ``loadtest/calibrate_gpu.py`` runs it."""

import importlib.util
import time

import pytest

from services.gpu_worker.engines.vllm_engine import VllmEngine
from services.gpu_worker.gpu import Gpu
from shared.messages import ChatMessage, InferRequest, ModelSpec, SamplingParams
from shared.model_folder import max_context, weight_bytes
from tooling.modelgen import SIZES, create_tiny_llama


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.vllm, pytest.mark.cuda, pytest.mark.skipif(not _cuda(), reason="needs an NVIDIA GPU")]

KV = 2 * 1024**3


async def _generate(engine: VllmEngine, model: str) -> str:
    req = InferRequest(model=model, messages=[ChatMessage(role="user", content="Hello")],
                       sampling=SamplingParams(max_tokens=8, temperature=0))
    out = []
    async for delta in engine.generate(req):
        out.append(delta.text or "")
    return "".join(out)


async def test_sleep_mode_prewarm_activate_deactivate(tmp_path):
    path = create_tiny_llama(tmp_path / "m", SIZES["300m"], seed=1)
    spec = ModelSpec(slug="m", path=str(path), parameter_bytes=weight_bytes(path), max_context_tokens=max_context(path))
    gpu = Gpu("cuda:0")
    engine = VllmEngine("cuda:0", KV, gpu)
    used = lambda: gpu.stats().memory_used_bytes  # noqa: E731
    try:
        resident = await engine.load(spec)  # prewarmed: weights on the device, KV cache released
        assert 0 < resident < KV, f"a prewarmed copy holds {resident} bytes: its KV cache was not released"
        before = used()
        t0 = time.perf_counter()
        await engine.activate("m", KV)
        first = time.perf_counter() - t0
        assert used() - before > 0.8 * KV, "activation did not map the KV cache"
        assert len(await _generate(engine, "m")) > 0
        await engine.deactivate("m")
        assert before - 0.05 * KV < used() < before + 0.2 * KV, "deactivation did not give the KV memory back"
        t0 = time.perf_counter()
        await engine.activate("m", KV)
        again = time.perf_counter() - t0
        assert len(await _generate(engine, "m")) > 0  # the weights survived the sleep
        assert again < 5.0 and first < 5.0, f"wake-up took {first:.2f} s then {again:.2f} s"
    finally:
        await engine.close()
