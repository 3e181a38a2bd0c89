"""vLLM's request surface through a real vLLM CPU worker over real NATS: one worker, one tiny model (random
weights), many requests. Each checks what vLLM itself did: structured outputs parsed against their schema,
``n`` choices, finite logprobs, token-id prompts and echo, ``min_tokens``/``ignore_eos``/``stop_token_ids``,
forced tool calls read back as calls, refusals named, and one bus chunk per engine step.

A random-weight model under a JSON grammar tends to emit whitespace for ever (the grammar allows it between
tokens). vLLM's server does not turn that off by default, so neither do we: the requests bound the schema
(enum values) and push whitespace tokens away with ``logit_bias``, as a client of vLLM's server could."""

import asyncio
import importlib.util
import json
import math
from pathlib import Path

import pytest

from services.gpu_worker.main import WorkerService
from shared import bus
from shared.messages import (
    CancelRequest, ChatMessage, CommandKind, CommandResult, InferChunk, InferRequest, ModelSpec, SamplingParams,
    StructuredOutput, Tools, WorkerCommand,
)
from shared.model_folder import max_context, weight_bytes
from shared.settings import WorkerSettings
from shared.subjects import CANCEL, INFER, WORKER_CMD
from tests.helpers import eventually
from tooling.modelgen import TinyLlamaShape, create_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

WID = "vllm-surface"
# vLLM's CPU attention needs a head size of 64 or more
SHAPE = TinyLlamaShape(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
CHAT = [ChatMessage(role="user", content="What is the weather like?")]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "size", "ok"],
          "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                         "size": {"type": "string", "enum": ["small", "large"]}, "ok": {"type": "boolean"}}}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "required": ["city"],
                                                           "properties": {"city": {"type": "string",
                                                                                   "enum": ["paris", "rome"]}}}}}


class Model:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.eos = json.loads((path / "config.json").read_text())["eos_token_id"]
        vocab = self.tokenizer.get_vocab_size()
        # tokens that are only whitespace: a grammar lets a random model emit them for ever
        self.no_whitespace = {i: -100.0 for i in range(vocab)
                              if not self.tokenizer.decode([i], skip_special_tokens=False).strip()}


@pytest.fixture(scope="module")
async def worker(nats_url, nats_urls, tmp_path_factory):
    path = create_tiny_llama(tmp_path_factory.mktemp("vllm-surface") / "tiny", SHAPE, seed=3)
    spec = ModelSpec(slug="tiny", path=str(path), parameter_bytes=weight_bytes(path),
                     max_context_tokens=max_context(path))
    service = WorkerService(WorkerSettings(nats_url=nats_urls.worker(WID), worker_id=WID, engine="vllm",
                                           memory_budget_bytes=6 * 2**30, kv_cache_bytes=512 * 2**20,
                                           heartbeat_interval_s=0.5))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    nc = await bus.connect(nats_url, "vllm-surface-test")
    activate = WorkerCommand(kind=CommandKind.ACTIVATE, model="tiny", spec=spec)  # idempotent: may be sent again

    async def activated():
        try:
            return await bus.request(nc, WORKER_CMD.format(worker=WID), activate, CommandResult, timeout=240)
        except bus.BusError:
            return None

    try:
        r = await eventually(activated, timeout=300, what="the vLLM worker activating the tiny model")
        assert r.ok, r.error
        yield nc, Model(path), service
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)
        await nc.close()


async def generate(nc, req: InferRequest) -> list[InferChunk]:
    return [c async for c in bus.request_stream(nc, INFER.format(worker=WID), req, InferChunk, first_timeout=120,
                                                idle_timeout=60, is_last=lambda c: c.last)]


def choice_texts(chunks: list[InferChunk]) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        for d in c.choice_deltas():
            out[d.index] = out.get(d.index, "") + d.text
    return out


def finish_reasons(chunks: list[InferChunk]) -> dict[int, str]:
    return {d.index: d.finish_reason for c in chunks for d in c.choice_deltas() if d.finish_reason}


async def test_json_schema_answers_parse_and_match_their_schema(worker):
    jsonschema = pytest.importorskip("jsonschema")
    nc, model, _ = worker
    for n in (1, 2):
        chunks = await generate(nc, InferRequest(model="tiny", messages=CHAT, sampling=SamplingParams(
            max_tokens=80, temperature=0.8, seed=11, n=n, logit_bias=model.no_whitespace,
            structured=StructuredOutput(json_schema=SCHEMA))))
        assert chunks[-1].error is None, chunks[-1].error
        texts = choice_texts(chunks)
        assert sorted(texts) == list(range(n)) and set(finish_reasons(chunks).values()) == {"stop"}
        for text in texts.values():
            jsonschema.validate(json.loads(text), SCHEMA)

    chunks = await generate(nc, InferRequest(model="tiny", prompt="Pick one:", sampling=SamplingParams(
        max_tokens=10, structured=StructuredOutput(choice=["sunny", "rainy"]))))
    assert choice_texts(chunks)[0] in ("sunny", "rainy") and chunks[-1].finish_reason == "stop"

    [refused] = await generate(nc, InferRequest(model="tiny", prompt="x", sampling=SamplingParams(
        structured=StructuredOutput(regex="[unclosed"))))
    assert refused.error.code == "invalid_request" and "regex" in refused.error.message


async def test_n_choices_with_finite_logprobs_stream_one_chunk_per_step(worker):
    nc, _, _ = worker
    steps = 12
    chunks = await generate(nc, InferRequest(model="tiny", prompt="Once upon a time", sampling=SamplingParams(
        max_tokens=steps, n=2, logprobs=2, ignore_eos=True, seed=5)))
    assert chunks[-1].error is None, chunks[-1].error
    shape = [[(d.index, len(d.logprobs or [])) for d in c.deltas] for c in chunks]
    # a chunk per engine step (vLLM may merge steps it ran ahead of us, and may start one choice a step later)
    assert steps * 0.7 <= len(chunks) <= steps + 1, shape
    assert all(len({d.index for d in c.deltas}) == len(c.deltas) for c in chunks), shape  # one delta per choice
    assert sum(len(c.deltas) == 2 for c in chunks) >= len(chunks) - 2, shape  # a step's choices share a chunk
    assert finish_reasons(chunks) == {0: "length", 1: "length"} and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 2 * steps
    for i in (0, 1):
        lps = [lp for c in chunks for d in c.deltas if d.index == i for lp in d.logprobs]
        assert len(lps) == steps
        for lp in lps:  # completions show logprobs + 1 entries: the chosen token, then the top 2 by rank
            assert math.isfinite(lp.logprob) and lp.logprob <= 0
            assert 2 <= len(lp.top) <= 3 and lp.top[0].token == lp.token
            assert all(math.isfinite(t.logprob) for t in lp.top)

    chunks = await generate(nc, InferRequest(model="tiny", messages=CHAT, sampling=SamplingParams(
        max_tokens=4, logprobs=1, ignore_eos=True)))
    lps = [lp for c in chunks for d in c.deltas for lp in d.logprobs]
    assert len(lps) == 4 and all(len(lp.top) == 1 for lp in lps)  # chat: top_logprobs entries


async def test_token_id_prompts_and_echo(worker):
    nc, model, _ = worker
    ids = model.tokenizer.encode("The weather today", add_special_tokens=False).ids
    chunks = await generate(nc, InferRequest(model="tiny", prompts=[ids, "Tomorrow it will"], echo=True,
                                             sampling=SamplingParams(max_tokens=3, ignore_eos=True)))
    assert chunks[-1].error is None, chunks[-1].error
    assert chunks[0].prompt_texts == [model.tokenizer.decode(ids, skip_special_tokens=False), "Tomorrow it will"]
    assert sorted(choice_texts(chunks)) == [0, 1] and finish_reasons(chunks) == {0: "length", 1: "length"}
    with_bos = len(model.tokenizer.encode("Tomorrow it will").ids)  # a text prompt gets the special tokens
    assert chunks[-1].usage.prompt_tokens == len(ids) + with_bos and chunks[-1].usage.completion_tokens == 6

    only = await generate(nc, InferRequest(model="tiny", prompt="Echo me", echo=True,
                                           sampling=SamplingParams(max_tokens=0)))
    assert only[0].prompt_texts == ["Echo me"] and not "".join(choice_texts(only).values())

    [refused] = await generate(nc, InferRequest(model="tiny", prompts=[[10**6]]))
    assert refused.error.code == "invalid_request" and "vocabulary" in refused.error.message


async def test_min_tokens_ignore_eos_and_stop_token_ids(worker):
    nc, model, _ = worker
    eos_first = {model.eos: 100.0}  # the model would end at once

    async def run(**kw) -> InferChunk:
        chunks = await generate(nc, InferRequest(model="tiny", prompt="Tell me", sampling=SamplingParams(**kw)))
        assert chunks[-1].error is None, chunks[-1].error
        return chunks[-1]

    ended = await run(max_tokens=8, logit_bias=eos_first)
    assert ended.finish_reason == "stop" and ended.usage.completion_tokens == 1
    assert (await run(max_tokens=8, logit_bias=eos_first, ignore_eos=True)).usage.completion_tokens == 8
    exact = await run(max_tokens=6, min_tokens=6, logit_bias=eos_first)
    assert exact.finish_reason == "length" and exact.usage.completion_tokens == 6
    later = await run(max_tokens=8, min_tokens=3, logit_bias=eos_first)
    assert later.finish_reason == "stop" and later.usage.completion_tokens == 4

    word = model.tokenizer.token_to_id("the") or next(i for i in range(100, 400) if i not in model.no_whitespace)
    stopped = await run(max_tokens=8, logit_bias={word: 100.0}, stop_token_ids=[word], min_tokens=2)
    assert stopped.finish_reason == "stop" and stopped.usage.completion_tokens == 3
    [final] = stopped.choice_deltas()
    assert final.stop_reason == word  # vLLM names the token that ended it


async def test_forced_tool_calls_come_back_as_calls(worker):
    jsonschema = pytest.importorskip("jsonschema")
    nc, model, _ = worker
    for choice, named, finish in (("weather", True, "stop"), ("required", False, "tool_calls")):
        chunks = await generate(nc, InferRequest(model="tiny", messages=CHAT, tools=Tools(
            definitions=[WEATHER], choice=choice, named=named), sampling=SamplingParams(
            max_tokens=80, temperature=0, logit_bias=model.no_whitespace)))
        assert chunks[-1].error is None, chunks[-1].error
        pieces = [t for c in chunks for d in c.deltas for t in (d.tool_calls or [])]
        assert pieces and pieces[0].id.startswith("chatcmpl-tool-") and pieces[0].name == "weather"
        assert {p.index for p in pieces} == {0} and all(p.id is None for p in pieces[1:])
        arguments = json.loads("".join(p.arguments for p in pieces))
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        assert finish_reasons(chunks) == {0: finish} and not "".join(choice_texts(chunks).values())

    [refused] = await generate(nc, InferRequest(model="tiny", messages=CHAT, tools=Tools(definitions=[WEATHER],
                                                                                         choice="auto")))
    assert refused.error.code == "invalid_request" and "tool parser" in refused.error.message
    [refused] = await generate(nc, InferRequest(model="tiny", messages=CHAT, tools=Tools(
        definitions=[WEATHER], choice="nothere", named=True)))
    assert refused.error.code == "invalid_request" and "tool_choice" in refused.error.message


async def test_plain_streams_are_one_text_chunk_per_step_with_running_usage(worker):
    nc, _, _ = worker
    steps = 24
    chunks = await generate(nc, InferRequest(model="tiny", prompt="Hello", usage_every_chunk=True,
                                             sampling=SamplingParams(max_tokens=steps, ignore_eos=True)))
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == steps
    assert steps * 0.7 <= len(chunks) <= steps and not any(c.deltas for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(set(counts)) and counts[0] >= 1

    [refused] = await generate(nc, InferRequest(model="tiny", prompt="x", sampling=SamplingParams(top_p=2.0)))
    assert refused.error.code == "invalid_request" and "top_p" in refused.error.message
    [refused] = await generate(nc, InferRequest(model="tiny", prompts=["x", "word " * 600]))
    assert refused.error.code == "context_length_exceeded"


async def test_a_cancelled_request_of_several_prompts_frees_every_engine_request(worker):
    nc, _, service = worker
    engine = service.worker.engine._engines["tiny"].engine
    req = InferRequest(model="tiny", prompts=["one", "two", "three"], sampling=SamplingParams(
        max_tokens=400, n=2, ignore_eos=True))
    chunks = []

    async def read():
        async for c in bus.request_stream(nc, INFER.format(worker=WID), req, InferChunk, first_timeout=120,
                                          idle_timeout=60, is_last=lambda c: c.last):
            chunks.append(c)

    reading = asyncio.create_task(read())
    await eventually(lambda: len(chunks) >= 2, timeout=60, every=0.01, what="the first chunks")
    assert engine.output_processor.get_num_unfinished_requests() >= 3  # an engine request per prompt (and choice)
    await nc.publish(CANCEL.format(worker=WID), CancelRequest(request_id=req.request_id).encode())
    await asyncio.wait_for(reading, 60)
    assert chunks[-1].error.code == "aborted"
    await eventually(lambda: engine.output_processor.get_num_unfinished_requests() == 0, timeout=30,
                     what="the engine dropping all three requests")
    assert service.worker.in_flight == 0
