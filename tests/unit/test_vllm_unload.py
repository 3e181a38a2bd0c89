"""VllmEngine's unload contract without vLLM: a stop that fails is retried by the next unload of the model,
which succeeds (and the worker frees the memory) only once the engine has really stopped."""

import dataclasses

import pytest

from services.gpu_worker.engines.vllm_engine import VllmEngine, _Running
from shared.messages import ModelSpec


class _FakeEngine:
    """Stands in for vLLM's AsyncLLM: shutdown fails ``failures`` times, then succeeds."""

    def __init__(self, failures: int):
        self.failures = failures
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1
        if self.shutdowns <= self.failures:
            raise RuntimeError("engine core did not stop")


def _engine_with(tmp_path, model: str, fake: _FakeEngine) -> VllmEngine:
    engine = VllmEngine("cpu:0", kv_cache_bytes=2**20)
    spec = ModelSpec(slug=model, path=str(tmp_path), parameter_bytes=1, max_context_tokens=64)
    engine._engines[model] = _Running(spec=spec, engine=fake, tokenizer=None, processes=[], tmpdir=tmp_path / "t",
                                      core=0, resident_bytes=0)
    engine._cores[model] = 0
    return engine


async def test_an_unload_whose_stop_failed_is_retried_and_reports_what_the_retry_freed(tmp_path, monkeypatch):
    engine = _engine_with(tmp_path, "tiny", _FakeEngine(failures=0))
    calls = []

    async def stop(run):
        calls.append(run)
        if len(calls) == 1:
            raise RuntimeError("engine processes would not exit")
        return 123

    monkeypatch.setattr(engine, "_stop", stop)
    with pytest.raises(RuntimeError, match="would not exit"):
        await engine.unload("tiny")
    assert await engine.unload("tiny") == 123  # retried the same run; not "nothing loaded, 0 freed"
    assert len(calls) == 2 and calls[0] is calls[1]
    assert await engine.unload("tiny") == 0 and len(calls) == 2  # stopped for good: nothing left to retry


async def test_a_failed_shutdown_is_called_again_and_a_failing_retry_still_raises(tmp_path):
    fake = _FakeEngine(failures=2)
    engine = _engine_with(tmp_path, "tiny", fake)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="did not stop"):
            await engine.unload("tiny")
    assert await engine.unload("tiny") == 0  # no processes measured in this fake: 0 bytes, but success
    assert fake.shutdowns == 3 and engine._stuck == {} and engine._engines == {}


async def test_a_stuck_run_is_retried_even_after_the_model_was_loaded_again(tmp_path):
    old = _FakeEngine(failures=1)
    engine = _engine_with(tmp_path, "tiny", old)
    with pytest.raises(RuntimeError):
        await engine.unload("tiny")
    new = _FakeEngine(failures=0)
    engine._engines["tiny"] = dataclasses.replace(engine._stuck["tiny"][0], engine=new)  # loaded anew
    await engine.unload("tiny")  # stops the new run and the old one that failed before
    assert old.shutdowns == 2 and new.shutdowns == 1 and engine._stuck == {}
