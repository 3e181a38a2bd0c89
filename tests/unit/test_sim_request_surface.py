"""The sim engine's request surface (n, several and token-id prompts, echo, stops, logprobs, structured outputs,
forced tool calls) and the worker's chunks: one per engine step, several choices of a step in one chunk."""

import json
import math
from types import SimpleNamespace

import pytest

from services.gpu_worker import main as worker_main
from services.gpu_worker.engines import EngineError
from services.gpu_worker.engines.sim import SimEngine, SimProfile
from services.gpu_worker.main import WorkerService
from services.gpu_worker.streaming import ChunkCoalescer, RequesterWatch
from shared.messages import (
    ChatMessage, ChoiceDelta, InferChunk, InferRequest, ModelSpec, SamplingParams, StructuredOutput, TokenLogprob,
    Tools,
)
from shared.model_folder import max_context, weight_bytes
from shared.settings import WorkerSettings

FAST = SimProfile(engine_start_s=0.0, decode_s_per_token_per_gb=0.0, prefill_s_per_token_per_gb=0.0, min_step_s=0.0)
CHAT = [ChatMessage(role="user", content="hi")]
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["paris", "rome"]}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}


@pytest.fixture
def spec(tiny_model):
    return ModelSpec(slug="tiny", path=str(tiny_model), parameter_bytes=weight_bytes(tiny_model),
                     max_context_tokens=max_context(tiny_model))


@pytest.fixture
async def engine(spec):
    e = SimEngine(FAST)
    await e.load(spec)
    await e.activate("tiny", 2**30)
    return e


async def run(engine, **kw):
    return [d async for d in engine.generate(InferRequest(model="tiny", **kw))]


def per_choice(deltas) -> dict[int, list[ChoiceDelta]]:
    out: dict[int, list[ChoiceDelta]] = {}
    for d in deltas:
        for c in d.choices:
            out.setdefault(c.index, []).append(c)
    return out


async def test_n_choices_of_several_prompts_step_together_numbered_by_prompt(engine):
    deltas = await run(engine, prompts=["one two", "three"], sampling=SamplingParams(max_tokens=4, n=2, seed=3))
    choices = per_choice(deltas)
    assert sorted(choices) == [0, 1, 2, 3]  # prompt index x n + i
    assert len(deltas) == 4 and all(len(d.choices) == 4 for d in deltas)  # one delta per step, every choice in it
    assert all(cs[-1].finish_reason == "length" for cs in choices.values())
    assert [d.finish_reason for d in deltas] == [None, None, None, "length"]
    assert deltas[-1].completion_tokens == 4 * 4
    assert deltas[-1].prompt_tokens == len(engine._models["tiny"].tokenizer.encode("one two").ids) + \
        len(engine._models["tiny"].tokenizer.encode("three").ids)
    texts = {i: "".join(c.text for c in cs) for i, cs in choices.items()}
    assert texts[0] != texts[1]  # each choice its own seed (seed + index, as vLLM seeds them)
    again = per_choice(await run(engine, prompts=["one two", "three"],
                                 sampling=SamplingParams(max_tokens=4, n=2, seed=3)))
    assert {i: "".join(c.text for c in cs) for i, cs in again.items()} == texts


async def test_token_id_prompts_echo_their_text_and_ids_out_of_vocabulary_are_refused(engine):
    tok = engine._models["tiny"].tokenizer
    ids = tok.encode("hello world").ids
    deltas = await run(engine, prompts=[ids, "plain text"], echo=True, sampling=SamplingParams(max_tokens=2))
    assert deltas[0].prompt_texts == [tok.decode(ids, skip_special_tokens=False), "plain text"]
    assert all(d.prompt_texts is None for d in deltas[1:])
    assert deltas[-1].prompt_tokens == len(ids) + len(tok.encode("plain text").ids)

    only = await run(engine, prompt="just this", echo=True, sampling=SamplingParams(max_tokens=0))
    assert only[0].prompt_texts == ["just this"] and only[-1].finish_reason == "length"
    assert "".join(d.text for d in only) == "" and not any(d.choices for d in only)

    with pytest.raises(EngineError) as exc:
        await run(engine, prompts=[[10**6]])
    assert exc.value.code == "invalid_request" and "out of vocabulary" in str(exc.value)
    with pytest.raises(EngineError) as exc:
        await run(engine, prompts=["x" * 10, "word " * 400], sampling=SamplingParams(max_tokens=4))
    assert exc.value.code == "context_length_exceeded"  # any prompt too long refuses the request


async def test_the_plain_case_streams_text_alone(engine):
    deltas = await run(engine, messages=CHAT, sampling=SamplingParams(max_tokens=5, seed=1))
    assert len(deltas) == 5 and all(d.text and not d.choices for d in deltas)
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5


async def test_min_tokens_masks_stop_token_ids_and_the_stop_reason_is_reported(engine):
    every = engine._models["tiny"].sample_ids  # any token stops the answer, once min_tokens allow it
    deltas = await run(engine, prompt="x", sampling=SamplingParams(max_tokens=20, min_tokens=3, stop_token_ids=every))
    assert deltas[-1].completion_tokens == 4 and deltas[-1].finish_reason == "stop"
    [final] = deltas[-1].choices  # even a plain stream says which stop ended it
    assert final.finish_reason == "stop" and final.stop_reason in every


async def test_stop_strings_cut_or_kept(engine):
    sampling = SamplingParams(max_tokens=40, seed=7)
    text = "".join(d.text for d in await run(engine, prompt="x", sampling=sampling))
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = await run(engine, prompt="x", sampling=sampling.model_copy(update={"stop": [stop]}))
    kept = await run(engine, prompt="x", sampling=sampling.model_copy(update={"stop": [stop],
                                                                               "include_stop_str_in_output": True}))
    cut_text = "".join(d.text for d in cut) + "".join(c.text for d in cut for c in d.choices)
    kept_text = "".join(d.text for d in kept) + "".join(c.text for d in kept for c in d.choices)
    assert stop not in cut_text and kept_text.endswith(stop) and kept_text == cut_text + stop
    assert cut[-1].choices[0].stop_reason == stop


@pytest.mark.parametrize("chat, shown", [(True, 2), (False, 3)])  # chat: top_logprobs; completions: logprobs + 1
async def test_logprobs_are_finite_with_top_alternatives(engine, chat, shown):
    prompt = {"messages": CHAT} if chat else {"prompt": "x"}
    deltas = await run(engine, **prompt, sampling=SamplingParams(max_tokens=6, logprobs=2, seed=2))
    [choice] = per_choice(deltas).values()
    lps: list[TokenLogprob] = [lp for c in choice for lp in c.logprobs]
    assert len(lps) == 6 and "".join(lp.token for lp in lps) == "".join(c.text for c in choice)
    for lp in lps:
        assert math.isfinite(lp.logprob) and lp.logprob <= 0
        assert len(lp.top) == shown and all(math.isfinite(t.logprob) for t in lp.top)
        assert lp.top[0].token == lp.token  # vLLM's order: the chosen token, then the rest by rank
    none = await run(engine, prompt="x", sampling=SamplingParams(max_tokens=2, logprobs=0))
    assert all(len(lp.top) == 1 for d in none for c in d.choices for lp in c.logprobs)


async def test_structured_outputs_get_a_valid_answer_or_a_clear_refusal(engine):
    jsonschema = pytest.importorskip("jsonschema")
    schema = WEATHER["function"]["parameters"]
    [d] = await run(engine, messages=CHAT, sampling=SamplingParams(structured=StructuredOutput(json_schema=schema)))
    jsonschema.validate(json.loads(d.text), schema)
    assert d.finish_reason == "stop" and d.completion_tokens > 0
    [d] = await run(engine, messages=CHAT,
                    sampling=SamplingParams(n=2, structured=StructuredOutput(choice=["yes", "no"])))
    assert [(c.index, c.text) for c in d.choices] == [(0, "yes"), (1, "yes")]
    [d] = await run(engine, prompt="x", sampling=SamplingParams(structured=StructuredOutput(json_object=True)))
    assert isinstance(json.loads(d.text), dict)
    for refused in (StructuredOutput(regex="[a-z]+"), StructuredOutput(json_schema={"anyOf": [{"$ref": "#/x"}]})):
        with pytest.raises(EngineError) as exc:
            await run(engine, prompt="x", sampling=SamplingParams(structured=refused))
        assert exc.value.code == "unsupported" and "vllm engine" in str(exc.value)


async def test_forced_tool_calls_and_auto_without_a_parser(engine, spec):
    jsonschema = pytest.importorskip("jsonschema")
    for choice, named, finish in (("weather", True, "stop"), ("required", False, "tool_calls")):
        [d] = await run(engine, messages=CHAT, tools=Tools(definitions=[WEATHER], choice=choice, named=named))
        [c] = d.choices
        [call] = c.tool_calls
        assert call.name == "weather" and call.id.startswith("chatcmpl-tool-") and c.finish_reason == finish
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    with pytest.raises(EngineError) as exc:
        await run(engine, messages=CHAT, tools=Tools(definitions=[WEATHER], choice="nothere", named=True))
    assert exc.value.code == "invalid_request" and "nothere" in str(exc.value)
    with pytest.raises(EngineError) as exc:
        await run(engine, messages=CHAT, tools=Tools(definitions=[WEATHER], choice="auto"))
    assert exc.value.code == "invalid_request" and "tool parser" in str(exc.value)

    parsed = spec.model_copy(update={"slug": "parsed", "tool_parser": "hermes"})
    await engine.load(parsed)
    await engine.activate("parsed", 2**30)
    deltas = [d async for d in engine.generate(InferRequest(model="parsed", messages=CHAT, sampling=SamplingParams(
        max_tokens=3), tools=Tools(definitions=[WEATHER], choice="auto")))]
    assert len(deltas) == 3 and all(not c.tool_calls for d in deltas for c in d.choices)  # the model chose to answer
    assert deltas[-1].choices[-1].finish_reason == "length"
    # a parser the operator set after the instance started comes with the request from the gateway's catalog
    later = [d async for d in engine.generate(InferRequest(model="tiny", messages=CHAT, sampling=SamplingParams(
        max_tokens=2), tools=Tools(definitions=[WEATHER], choice="auto", parser="hermes")))]
    assert later[-1].choices[-1].finish_reason == "length"


# ---------------------------------------------------------------- the worker's chunks


@pytest.fixture
async def service(spec, monkeypatch):
    """A worker service with the sim engine whose bus replies are captured (no NATS: the chunking is tested)."""
    s = WorkerService(WorkerSettings(worker_id="w-chunks", engine="sim", memory_budget_bytes=2**30,
                                     kv_cache_bytes=2**20))
    s.worker.engine.profile = FAST
    s.nc, s.requesters, s.sent = None, RequesterWatch("inbox"), []

    async def reply(nc, msg, chunk, reply_to=""):
        s.sent.append(chunk)

    monkeypatch.setattr(worker_main.bus, "reply", reply)
    await s.worker.activate(spec)
    return s


async def stream(service, req: InferRequest) -> list[InferChunk]:
    service.sent.clear()
    await service._generate(SimpleNamespace(headers=None, reply="inbox"), req, 0, service.requesters.start("r"))
    return list(service.sent)


async def test_one_chunk_per_step_with_running_usage_when_asked(service):
    chunks = await stream(service, InferRequest(model="tiny", prompt="x", sampling=SamplingParams(max_tokens=5),
                                                usage_every_chunk=True))
    assert len(chunks) == 5 and [c.seq for c in chunks] == list(range(5))
    assert all(c.text and not c.deltas for c in chunks)  # the plain case: text alone
    assert [c.usage.completion_tokens for c in chunks] == [1, 2, 3, 4, 5]
    assert chunks[-1].finish_reason == "length" and chunks[-1].last and not any(c.last for c in chunks[:-1])

    plain = await stream(service, InferRequest(model="tiny", prompt="x", sampling=SamplingParams(max_tokens=3)))
    assert [c.usage for c in plain[:-1]] == [None, None] and plain[-1].usage.completion_tokens == 3

    # text held back (it may start a stop string) still leaves one chunk per step, as vLLM's server streams
    held = await stream(service, InferRequest(model="tiny", prompt="x", sampling=SamplingParams(
        max_tokens=4, seed=2, stop=["~never~" * 20])))
    assert len(held) == 4 and held[0].text == "" and "".join(c.text for c in held)


async def test_several_choices_of_a_step_share_one_chunk(service):
    chunks = await stream(service, InferRequest(model="tiny", prompts=["a", "b"], echo=True,
                                                sampling=SamplingParams(max_tokens=3, n=2, logprobs=1)))
    assert len(chunks) == 3 and all(sorted(d.index for d in c.deltas) == [0, 1, 2, 3] for c in chunks)
    assert chunks[0].prompt_texts == ["a", "b"] and all(c.prompt_texts is None for c in chunks[1:])
    assert all(d.logprobs for c in chunks for d in c.deltas) and not any(c.text for c in chunks)
    assert chunks[-1].finish_reason == "length" and {d.finish_reason for d in chunks[-1].deltas} == {"length"}
    assert chunks[-1].usage.completion_tokens == 12


async def test_an_interval_merges_steps_choice_by_choice(service):
    req = InferRequest(model="tiny", prompt="x", sampling=SamplingParams(max_tokens=6, n=2, seed=5))
    per_step = await stream(service, req)
    service.settings = service.settings.model_copy(update={"chunk_interval_s": 3600.0})
    merged = await stream(service, req)
    assert len(per_step) == 6 and len(merged) == 2  # the first step at once, the rest held until the end
    assert sorted(d.index for d in merged[-1].deltas) == [0, 1]  # one merged delta per choice
    assert all(d.finish_reason == "length" for d in merged[-1].deltas)

    def texts(chunks):
        return {i: "".join(d.text for c in chunks for d in c.deltas if d.index == i) for i in (0, 1)}

    assert texts(merged) == texts(per_step) and all(texts(merged).values())


def test_coalescer_merges_each_choice_and_keeps_finished_deltas_last():
    now = [0.0]
    c = ChunkCoalescer(min_interval_s=0.01, clock=lambda: now[0])
    assert c.add_deltas([ChoiceDelta(index=0, text="a")]) == [ChoiceDelta(index=0, text="a")]  # first: at once
    now[0] = 0.001
    assert c.add_deltas([ChoiceDelta(index=0, text="b"), ChoiceDelta(index=1, text="x")]) is None
    assert c.add_deltas([ChoiceDelta(index=1, text="y", finish_reason="stop", stop_reason="z"),
                         ChoiceDelta(index=0, text="")]) is None  # an empty delta is dropped
    now[0] = 0.02
    out = c.add_deltas([ChoiceDelta(index=0, text="c", logprobs=[TokenLogprob(token="c", logprob=-1.0)])])
    assert out == [ChoiceDelta(index=0, text="bc", logprobs=[TokenLogprob(token="c", logprob=-1.0)]),
                   ChoiceDelta(index=1, text="xy", finish_reason="stop", stop_reason="z")]
    assert c.flush_deltas() == []
