"""vLLM's OpenAI request surface through the real gateway, with the official ``openai`` client, against a
real sim worker on a real nats-server (docs/api.md): content parts, n, logprobs, completions prompt lists and
echo, tool calls, structured output, usage in streams, and one SSE event per engine step."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import httpx
import pytest
import uvicorn
from openai import AsyncOpenAI, BadRequestError

from services.gateway.app import create_app
from services.gpu_worker.main import WorkerService
from shared import bus
from shared.messages import CommandKind, CommandResult, ModelSpec, WorkerCommand
from shared.model_folder import max_context, weight_bytes
from shared.settings import GatewaySettings, WorkerSettings
from shared.subjects import CATALOG_BUCKET, WORKER_CMD
from tests.helpers import eventually, request_raw
from tooling.localcluster.processes import free_port

pytestmark = pytest.mark.integration

MODEL, WORKER = "surface", "surface-worker"


@pytest.fixture(scope="module")
async def served(nats_url, nats_urls, tiny_model):
    """A sim worker with an active instance of MODEL and a gateway in front of it; yields the gateway's URL."""
    nc = await bus.connect(nats_url, "surface-test")
    spec = ModelSpec(slug=MODEL, path=str(tiny_model), parameter_bytes=weight_bytes(tiny_model),
                     max_context_tokens=max_context(tiny_model), tool_parser="hermes")
    kv = (await bus.ensure_all(nc.jetstream()))[CATALOG_BUCKET.name]
    await kv.put(MODEL, spec.encode())
    worker = WorkerService(WorkerSettings(nats_url=nats_urls.worker(WORKER), worker_id=WORKER, engine="sim",
                                          memory_budget_bytes=512 * 2**20, kv_cache_bytes=64 * 2**20,
                                          heartbeat_interval_s=0.2))
    stop = asyncio.Event()
    worker_task = asyncio.create_task(worker.run(stop))

    async def answering():
        try:
            await request_raw(nc, WORKER_CMD.format(worker=WORKER), b"{}", timeout=1)
            return True
        except Exception:
            return False

    await eventually(answering, timeout=20, every=0.05, what="the worker answering commands")
    activated = await bus.request(nc, WORKER_CMD.format(worker=WORKER),
                                  WorkerCommand(kind=CommandKind.ACTIVATE, model=MODEL, spec=spec), CommandResult,
                                  timeout=20)
    assert activated.ok, activated
    port = free_port()
    app = create_app(GatewaySettings(nats_url=nats_urls["gateway"], port=port, gateway_id="gw-surface",
                                     require_api_key=False, queue_wait_s=5, heartbeat_timeout_s=3600))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           timeout_graceful_shutdown=5))
    server_task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"

    async def routable():
        if not server.started:
            return False
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            cards = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
            return cards.get(MODEL, {}).get("active_instances")

    await eventually(routable, timeout=20, what="the model to be routable through the gateway")
    yield url
    server.should_exit = True
    await asyncio.wait_for(server_task, 30)
    stop.set()
    await asyncio.wait_for(worker_task, 40)
    await kv.delete(MODEL)
    await nc.close()


@pytest.fixture
async def client(served):
    async with AsyncOpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


USER = [{"role": "user", "content": "hello there"}]


async def test_content_parts_and_the_extra_roles(client):
    answer = await client.chat.completions.create(model=MODEL, max_tokens=4, seed=1, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "name": "ana", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "you"}]},
    ])
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 4
    with pytest.raises(BadRequestError) as exc:
        await client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert exc.value.body["param"] == "messages.0.content.1" and exc.value.body["code"] == "unsupported_content"


async def test_vllm_sampling_extensions_and_unknown_parameters_are_accepted(client, caplog):
    with caplog.at_level(logging.INFO, logger="warmserve.gateway"):
        answer = await client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=4, presence_penalty=0.5, frequency_penalty=0.5, stop=["\n\n"],
            logit_bias={"5": 1.0}, user="u", extra_body={
                "top_k": 20, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True,
                "stop_token_ids": [2], "skip_special_tokens": True, "include_stop_str_in_output": False,
                "spaces_between_special_tokens": True, "not_a_vllm_parameter": 1})
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 4
    assert "not_a_vllm_parameter" in caplog.text
    with pytest.raises(BadRequestError) as exc:
        await client.chat.completions.create(model=MODEL, messages=USER, extra_body={"use_beam_search": True})
    assert exc.value.body["param"] == "use_beam_search" and exc.value.body["code"] == "unsupported_parameter"


async def test_a_stream_sends_one_event_per_engine_step_and_usage_at_the_end(client):
    stream = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, seed=3, stream=True,
                                                  stream_options={"include_usage": True})
    events = [e async for e in stream]
    assert events[0].choices[0].delta.role == "assistant"
    steps = [e for e in events[1:] if e.choices]
    assert all(len(e.choices) == 1 for e in steps)
    usage = events[-1].usage
    assert events[-1].choices == [] and usage.completion_tokens == 8
    # the sim worker takes one step per token and sends each step as it is made: one event per token
    assert len(steps) == usage.completion_tokens and steps[-1].choices[0].finish_reason == "length"

    completion = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=5, seed=3, stream=True,
                                                 stream_options={"include_usage": True})
    events = [e async for e in completion]
    assert len([e for e in events if e.choices]) == 5 and events[-1].usage.completion_tokens == 5


async def test_n_choices(client):
    answer = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, n=2, seed=5)
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason == "length" for c in answer.choices)
    assert answer.usage.completion_tokens == 8  # both choices
    stream = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, n=2, seed=5, stream=True)
    events = [e async for e in stream]
    assert [e.choices[0].delta.role for e in events[:2]] == ["assistant", "assistant"]
    assert {e.choices[0].index for e in events[:2]} == {0, 1}
    assert all(len(e.choices) == 1 for e in events)
    finished = [e.choices[0].index for e in events if e.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


async def test_logprobs(client):
    answer = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, logprobs=True,
                                                  top_logprobs=2, seed=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == 4 and "".join(t.token for t in content) == answer.choices[0].message.content
    for token in content:
        assert math.isfinite(token.logprob) and token.logprob <= 0 and len(token.top_logprobs) == 2
        assert all(math.isfinite(t.logprob) for t in token.top_logprobs)
    done = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=3, logprobs=1, seed=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 3
    assert all(math.isfinite(v) for v in lp.token_logprobs) and lp.text_offset[0] == 0


async def test_completion_prompt_lists_token_ids_and_echo(client):
    prompts = ["once upon", "a time"]
    done = await client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, seed=4, echo=True)
    plain = await client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, seed=4)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]  # prompt index x n + i
    assert all(c.text for c in plain.choices)
    # the same seed, the same answers: echo puts each choice's prompt before it, once
    assert [c.text for c in done.choices] == [p + c.text for p, c in zip([prompts[0]] * 2 + [prompts[1]] * 2,
                                                                       plain.choices)]
    assert done.usage.completion_tokens == 12
    ids = await client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, seed=4)
    assert len(ids.choices) == 2 and all(c.text for c in ids.choices)
    # a token-id prompt is echoed as the worker's text of it
    echoed_ids = await client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, seed=4,
                                                 echo=True)
    for e, p in zip(echoed_ids.choices, ids.choices):
        assert e.text.endswith(p.text) and len(e.text) > len(p.text), (e.text, p.text)
    echoed = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=2, echo=True, seed=4)
    assert echoed.choices[0].text.startswith("once upon") and len(echoed.choices[0].text) > len("once upon")


async def test_continuous_usage_stats(served):
    body = {"model": MODEL, "prompt": "once upon", "max_tokens": 4, "seed": 6, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    async with httpx.AsyncClient(base_url=served, timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            lines = [ln async for ln in resp.aiter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all("usage" in e for e in events), events
    counts = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
    assert counts == [1, 2, 3, 4] and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


async def test_tool_calls(client):
    forced = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, tools=[WEATHER],
                                                  tool_choice="required")
    [choice] = forced.choices
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.type == "function" and call.id
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    stream = await client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=16, tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    events = [e async for e in stream]
    pieces = [t for e in events for t in (e.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].type == "function" and pieces[0].function.name == "get_weather"
    assert "city" in json.loads("".join(p.function.arguments or "" for p in pieces))
    assert events[-1].choices[0].finish_reason == "stop"  # a named function ends with "stop", as in vLLM


async def test_structured_output_is_passed_to_the_worker(client):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    answer = await client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=32,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert isinstance(json.loads(answer.choices[0].message.content)["answer"], int)
    picked = await client.completions.create(model=MODEL, prompt="yes or no?", max_tokens=8,
                                             extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert picked.choices[0].text in {"yes", "no"}
