"""The request surface of vLLM's OpenAI server (docs/api.md): each accepted form becomes the right bus request,
each bad value a 400 naming its parameter, a parameter nobody knows is ignored and logged by name, one vLLM
knows but no worker here honours is refused by name; and the OpenAI bodies built from a worker's chunks."""

import json
import logging
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from services.gateway.admission_core import AdmissionCore
from services.gateway.api_types import ChatCompletionRequest, CompletionRequest
from services.gateway.app import create_app
from services.gateway.errors import ApiError
from services.gateway.limits import check_request
from services.gateway.responses import ResponseBuilder
from services.gateway.routing import RoutingTable
from shared.messages import (
    ChoiceDelta, InferChunk, ModelSpec, StructuredOutput, TokenLogprob, ToolCallDelta, TopLogprob, Usage,
)
from shared.settings import GatewaySettings

SPEC = ModelSpec(slug="m", path="/m", parameter_bytes=1, max_context_tokens=4096)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time"}}]


def chat(**over) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | over


def completion(**over) -> dict:
    return {"model": "m", "prompt": "hi"} | over


@pytest.fixture(scope="module")
def gateway():
    """The real app without its lifespan: one catalog model, no workers (accepted requests stop at routing)."""
    app = create_app(GatewaySettings(require_api_key=False))
    app.state.gateway.table = RoutingTable(SimpleNamespace(items={"m": SPEC}), SimpleNamespace(items={}), 5,
                                           AdmissionCore(queue_size=4))
    return TestClient(app, raise_server_exceptions=False)


def refused(resp, param: str, code: str = "invalid_request") -> dict:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error", err
    return err


# ---------------------------------------------------------------- accepted forms -> the bus request


def test_content_parts_are_joined_with_newlines_as_vllm_does_for_string_templates():
    body = ChatCompletionRequest.model_validate(chat(messages=[
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "one"}, "two", {"type": "input_text", "text": "three"},
                                     {"type": "text", "text": None}]},
        {"role": "developer", "content": "dev", "name": "ops"},
    ]))
    messages = body.infer("r").messages
    assert [(m.role, m.content) for m in messages] == [("system", "be brief"), ("user", "one\ntwo\nthree"),
                                                        ("developer", "dev")]
    assert messages[2].name == "ops"
    assert body.prompt_chars() == len("be brief") + len("one\ntwo\nthree") + len("dev")


def test_tool_turns_reach_the_template():
    body = ChatCompletionRequest.model_validate(chat(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"c\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    ], tools=TOOLS, tool_choice="none"))
    infer = body.infer("r")
    assistant, tool = infer.messages[1], infer.messages[2]
    assert assistant.content is None and assistant.tool_calls[0].function.arguments == "{\"c\": 1}"
    assert tool.tool_call_id == "call_1" and tool.content == "sunny"
    assert infer.tools.choice == "none" and infer.tools.definitions == TOOLS


@pytest.mark.parametrize("choice, expected", [
    (None, ("auto", False)), ("auto", ("auto", False)), ("required", ("required", False)),
    ({"type": "function", "function": {"name": "get_time"}}, ("get_time", True)),
])
def test_tool_choice_forms(choice, expected):
    body = ChatCompletionRequest.model_validate(chat(tools=TOOLS, **({} if choice is None else
                                                                     {"tool_choice": choice})))
    tools = body.infer("r").tools
    assert (tools.choice, tools.named) == expected and [d["function"]["name"] for d in tools.definitions] == \
        ["get_weather", "get_time"]


def test_sampling_parameters_reach_the_worker():
    body = ChatCompletionRequest.model_validate(chat(
        n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
        frequency_penalty=-0.5, seed=7, stop=["x", "y"], max_completion_tokens=50, max_tokens=10, min_tokens=5,
        ignore_eos=True, stop_token_ids=[2, 3], skip_special_tokens=False, include_stop_str_in_output=True,
        spaces_between_special_tokens=False, logit_bias={"42": 250, "7": -3.5}, logprobs=True, top_logprobs=4,
        user="u-1", stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    s = body.infer("r").sampling
    assert (s.n, s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (3, 0.7, 0.9, 40, 0.05, 1.1)
    assert (s.presence_penalty, s.frequency_penalty, s.seed, s.stop) == (0.5, -0.5, 7, ["x", "y"])
    assert s.max_tokens == 50 and not s.fill_context  # max_completion_tokens wins over max_tokens, as in vLLM
    assert (s.min_tokens, s.ignore_eos, s.stop_token_ids) == (5, True, [2, 3])
    assert (s.skip_special_tokens, s.include_stop_str_in_output, s.spaces_between_special_tokens) == (False, True,
                                                                                                      False)
    assert s.logit_bias == {42: 100.0, 7: -3.5}  # clamped to [-100, 100] as vLLM does
    assert s.logprobs == 4
    assert body.infer("r").usage_every_chunk


def test_defaults_are_vllms():
    chat_params = ChatCompletionRequest.model_validate(chat()).infer("r").sampling
    assert chat_params.fill_context  # no max_tokens: up to the context's end
    assert (chat_params.temperature, chat_params.top_p, chat_params.top_k, chat_params.min_p) == (1.0, 1.0, 0, 0.0)
    assert chat_params.logprobs is None and chat_params.n == 1 and chat_params.structured is None
    assert ChatCompletionRequest.model_validate(chat(logprobs=True)).infer("r").sampling.logprobs == 0
    assert ChatCompletionRequest.model_validate(chat(top_k=-1)).infer("r").sampling.top_k == 0  # -1: all, too
    done = CompletionRequest.model_validate(completion())
    assert done.infer("r").sampling.max_tokens == 16 and not done.infer("r").sampling.fill_context
    assert CompletionRequest.model_validate(completion(max_tokens=None)).infer("r").sampling.max_tokens == 16
    greedy = ChatCompletionRequest.model_validate(chat(temperature=0)).infer("r").sampling
    assert greedy.temperature == 0.0  # greedy, as in vLLM
    assert not ChatCompletionRequest.model_validate(chat(stream_options=None)).infer("r").usage_every_chunk


@pytest.mark.parametrize("prompt, one, several", [
    ("hello", "hello", None),
    (["hello"], "hello", None),
    (["a", "b"], None, ["a", "b"]),
    ([1, 2, 3], None, [[1, 2, 3]]),
    ([[1, 2], [3]], None, [[1, 2], [3]]),
    (["a", [5, 6]], None, ["a", [5, 6]]),
])
def test_completion_prompt_forms(prompt, one, several):
    body = CompletionRequest.model_validate(completion(prompt=prompt, n=2, logprobs=3))
    infer = body.infer("r")
    assert (infer.prompt, infer.prompts) == (one, several)
    assert body.choices == 2 * (1 if one is not None else len(several))
    assert infer.sampling.n == 2 and infer.sampling.logprobs == 3


def test_completion_echo_and_its_texts():
    body = CompletionRequest.model_validate(completion(prompt=["a", [5, 6]], echo=True))
    assert body.infer("r").echo and body.echo_texts == ["a", None]  # token ids: the worker's text
    assert CompletionRequest.model_validate(completion()).echo_texts == []
    alone = CompletionRequest.model_validate(completion(echo=True, max_tokens=0)).infer("r")
    assert alone.sampling.max_tokens == 0  # vLLM: the prompt alone


def test_max_tokens_zero_needs_echo(gateway):
    refused(gateway.post("/v1/completions", json=completion(max_tokens=0)), "max_tokens")


def test_tool_definitions_count_as_prompt_characters():
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 1000, "parameters": {"type": "object"}}}
    body = ChatCompletionRequest.model_validate(chat(tools=[tool], tool_choice="none"))
    assert body.prompt_chars() > 1000  # the template renders them into the prompt


@pytest.mark.parametrize("over, param", [
    ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"structured_outputs": {"choice": [str(i) for i in range(1025)]}}, "structured_outputs.choice"),
])
def test_lists_the_engine_works_through_every_step_are_bounded(gateway, over, param):
    refused(gateway.post("/v1/chat/completions", json=chat(**over)), param)


def test_tools_are_bounded(gateway):
    tool = {"type": "function", "function": {"name": "f"}}
    refused(gateway.post("/v1/chat/completions", json=chat(tools=[tool] * 129, tool_choice="none")), "tools")


@pytest.mark.parametrize("over, expected", [
    ({"response_format": {"type": "json_object"}}, StructuredOutput(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}},
     StructuredOutput(json_schema={"type": "object"})),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"json": {"type": "integer"}}}, StructuredOutput(json_schema={"type": "integer"})),
    ({"structured_outputs": {"json": "{\"type\": \"integer\"}"}}, StructuredOutput(json_schema={"type": "integer"})),
    ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutput(regex="[0-9]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutput(choice=["yes", "no"])),
    ({"structured_outputs": {"grammar": "root ::= \"a\""}}, StructuredOutput(grammar="root ::= \"a\"")),
    ({"structured_outputs": {"json_object": True}}, StructuredOutput(json_object=True)),
    ({"structured_outputs": {"json": {"type": "object"}},  # response_format overrides the same kind, as vLLM
      "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "array"}}}},
     StructuredOutput(json_schema={"type": "array"})),
])
def test_structured_outputs(over, expected):
    assert ChatCompletionRequest.model_validate(chat(**over)).infer("r").sampling.structured == expected
    assert CompletionRequest.model_validate(completion(**over)).infer("r").sampling.structured == expected


# ---------------------------------------------------------------- bad values -> 400 naming the parameter


@pytest.mark.parametrize("over, param, code", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "image_url", "image_url": {"url": "http://x/i.png"}}]}]},
     "messages.0.content.1", "unsupported_content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages.1.content.0", "unsupported_content"),
    ({"messages": [{"role": "user", "content": [{"video_url": {"url": "v"}}]}]}, "messages.0.content.0",
     "unsupported_content"),
    ({"messages": [{"role": "user", "content": [{"type": "sticker"}]}]}, "messages.0.content.0.type",
     "invalid_request"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text",
     "invalid_request"),
    ({"messages": [{"role": "user", "content": [7]}]}, "messages.0.content.0", "invalid_request"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content", "invalid_request"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "invalid_request"),
    ({"n": 0}, "n", "invalid_request"), ({"n": 17}, "n", "invalid_request"),
    ({"n": 2, "temperature": 0}, "n", "invalid_request"),  # vLLM: n must be 1 when greedy
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_request"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "invalid_request"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_request"),  # needs logprobs, as in vLLM
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_request"),
    ({"frequency_penalty": -2.1}, "frequency_penalty", "invalid_request"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "invalid_request"),
    ({"logit_bias": {"-4": 1}}, "logit_bias", "invalid_request"),
    ({"logit_bias": {"4": "lots"}}, "logit_bias.4", "invalid_request"),
    ({"top_k": -2}, "top_k", "invalid_request"), ({"min_p": 1.5}, "min_p", "invalid_request"),
    ({"repetition_penalty": 0}, "repetition_penalty", "invalid_request"),
    ({"min_tokens": -1}, "min_tokens", "invalid_request"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "invalid_request"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0", "invalid_request"),
    ({"stop": 5}, "stop", "invalid_request"),
    ({"seed": 2**63}, "seed", "invalid_request"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_request"),  # needs stream
    ({"tools": []}, "tools", "invalid_request"),
    ({"tool_choice": "auto"}, "tool_choice", "invalid_request"),  # needs tools
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice", "invalid_request"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice",
     "invalid_request"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name",
     "invalid_request"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_request"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "invalid_request"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema",
     "invalid_request"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type", "unsupported_parameter"),
    ({"structured_outputs": {}}, "structured_outputs", "invalid_request"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "invalid_request"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "invalid_request"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "invalid_request"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern",
     "unsupported_parameter"),
    ({"structured_outputs": {"regex": "a"}, "tools": TOOLS, "tool_choice": "required"}, "structured_outputs",
     "invalid_request"),
    # accepted by vLLM, not honoured here: refused by name
    ({"use_beam_search": True}, "use_beam_search", "unsupported_parameter"),
    ({"prompt_logprobs": 1}, "prompt_logprobs", "unsupported_parameter"),
    ({"logprob_token_ids": [1], "logprobs": True}, "logprob_token_ids", "unsupported_parameter"),
    ({"allowed_token_ids": [1]}, "allowed_token_ids", "unsupported_parameter"),
    ({"bad_words": ["x"]}, "bad_words", "unsupported_parameter"),
    ({"truncate_prompt_tokens": 10}, "truncate_prompt_tokens", "unsupported_parameter"),
    ({"priority": 1}, "priority", "unsupported_parameter"),
    ({"cache_salt": "s"}, "cache_salt", "unsupported_parameter"),
    ({"return_token_ids": True}, "return_token_ids", "unsupported_parameter"),
    ({"chat_template": "{{ x }}"}, "chat_template", "unsupported_parameter"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs", "unsupported_parameter"),
    ({"add_generation_prompt": False}, "add_generation_prompt", "unsupported_parameter"),
    ({"continue_final_message": True}, "continue_final_message", "unsupported_parameter"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"documents": [{"title": "t", "text": "x"}]}, "documents", "unsupported_parameter"),
])
def test_bad_chat_values_are_400_naming_the_parameter(gateway, over, param, code):
    err = refused(gateway.post("/v1/chat/completions", json=chat(**over)), param, code)
    assert param.split(".")[0] in err["message"]


@pytest.mark.parametrize("over, param, code", [
    ({"prompt": ""}, "prompt", "invalid_request"),
    ({"prompt": []}, "prompt", "invalid_request"),
    ({"prompt": ["a", ""]}, "prompt.1", "invalid_request"),
    ({"prompt": [[1, 2], []]}, "prompt.1", "invalid_request"),
    ({"prompt": [[1, -2]]}, "prompt.0", "invalid_request"),
    ({"prompt": ["a", {"x": 1}]}, "prompt.1", "invalid_request"),
    ({"prompt": [1, "a"]}, "prompt.0", "invalid_request"),
    ({"prompt": [True, False]}, "prompt.0", "invalid_request"),
    ({"prompt": ["p"] * 65}, "prompt", "invalid_request"),
    ({"prompt": ["p"] * 16, "n": 16}, "n", "invalid_request"),
    ({"logprobs": 21}, "logprobs", "invalid_request"),
    ({"logprobs": -1}, "logprobs", "invalid_request"),
    ({"min_tokens": 17}, "min_tokens", "invalid_request"),  # over the default max_tokens of 16
    ({"echo": True, "logprobs": 1}, "echo", "unsupported_parameter"),
    ({"suffix": "x"}, "suffix", "unsupported_parameter"),
    ({"prompt_embeds": "AAAA"}, "prompt_embeds", "unsupported_parameter"),
    ({"add_special_tokens": False}, "add_special_tokens", "unsupported_parameter"),
])
def test_bad_completion_values_are_400_naming_the_parameter(gateway, over, param, code):
    refused(gateway.post("/v1/completions", json=completion(**over)), param, code)


def test_unknown_parameters_are_ignored_and_logged_once_by_name(gateway, caplog):
    with caplog.at_level(logging.INFO, logger="warmserve.gateway"):
        # an unknown model ends the request after the parameters were read: 404, not 400
        resp = gateway.post("/v1/chat/completions", json=chat(model="other", frobnicate="SECRET-VALUE",
                                                              guided_json={"type": "object"}, metadata={"k": 1}))
    assert resp.status_code == 404, resp.text
    [line] = [r.getMessage() for r in caplog.records if "ignored unknown parameters" in r.getMessage()]
    assert "frobnicate" in line and "guided_json" in line and "metadata" in line and "not constrained" in line
    assert "SECRET-VALUE" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="warmserve.gateway"):
        gateway.post("/v1/chat/completions", json=chat(model="other"))
    assert "ignored unknown parameters" not in caplog.text


def test_auto_tool_choice_needs_the_catalogs_tool_parser():
    settings = GatewaySettings()
    for over in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "required"},
                 {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}):
        with pytest.raises(ApiError) as exc:
            check_request(ChatCompletionRequest.model_validate(chat(**over)), SPEC, settings)
        assert (exc.value.status, exc.value.param) == (400, "tool_choice") and "tool-call parser" in exc.value.message
        check_request(ChatCompletionRequest.model_validate(chat(**over)),
                      SPEC.model_copy(update={"tool_parser": "hermes"}), settings)
    check_request(ChatCompletionRequest.model_validate(chat(tools=TOOLS, tool_choice="none")), SPEC, settings)


def test_each_prompt_is_checked_against_the_context():
    small = SPEC.model_copy(update={"max_context_tokens": 100})
    settings = GatewaySettings(max_chars_per_token=4)
    check_request(CompletionRequest.model_validate(completion(prompt=[[1] * 90, "x" * 360], max_tokens=10)), small,
                  settings)
    with pytest.raises(ApiError) as exc:
        check_request(CompletionRequest.model_validate(completion(prompt=["a", [1] * 91], max_tokens=10)), small,
                      settings)
    assert (exc.value.code, exc.value.param) == ("context_length_exceeded", "prompt.1")
    with pytest.raises(ApiError) as exc:
        check_request(CompletionRequest.model_validate(completion(prompt=["x" * 361, "a"], max_tokens=10)), small,
                      settings)
    assert (exc.value.code, exc.value.param) == ("context_length_exceeded", "prompt.0")


# ---------------------------------------------------------------- responses built from chunks


def chunk(seq, *deltas, usage=None, finish=None, prompt_texts=None, text="") -> InferChunk:
    return InferChunk(request_id="r", seq=seq, deltas=list(deltas), usage=usage, finish_reason=finish,
                      prompt_texts=prompt_texts, text=text)


def built(body, chunks, stream=None):
    """The events a stream sends (stream=True) or the response (False), as the app makes them."""
    b = ResponseBuilder(body, "rid", body.model, 1)
    b.take(chunks[0])
    if stream if stream is not None else body.stream:
        events = b.start_events()
        for c in chunks:
            events += b.events(c)
        return events + b.end_events()
    for c in chunks:
        b.add(c)
    return b.response()


def test_the_plain_case_streams_one_event_per_chunk_after_the_role():
    body = ChatCompletionRequest.model_validate(chat(stream=True, stream_options={"include_usage": True}))
    chunks = [chunk(0, text="Hel"), chunk(1, text="lo"), chunk(2, text="!", finish="stop",
                                                               usage=Usage(prompt_tokens=3, completion_tokens=3))]
    events = built(body, chunks)
    assert [e["choices"][0]["delta"] if e["choices"] else None for e in events] == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {"content": "!"}, None]
    assert events[3]["choices"][0]["finish_reason"] == "stop" and events[1]["choices"][0]["finish_reason"] is None
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert all("usage" not in e for e in events[:-1])  # only at the end without continuous_usage_stats
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and {e["id"] for e in events} == {"rid"}
    full = built(body, chunks, stream=False)
    assert full["object"] == "chat.completion" and full["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "logprobs": None,
         "finish_reason": "stop", "stop_reason": None}]
    assert full["usage"]["total_tokens"] == 6


def test_n_choices_stream_one_event_per_delta_and_collect_per_index():
    body = ChatCompletionRequest.model_validate(chat(n=2, stream=True))
    chunks = [chunk(0, ChoiceDelta(index=0, text="a"), ChoiceDelta(index=1, text="x")),
              chunk(1, ChoiceDelta(index=1, text="y", finish_reason="stop", stop_reason="END")),
              chunk(2, ChoiceDelta(index=0, text="b", finish_reason="length"), finish="length",
                    usage=Usage(prompt_tokens=2, completion_tokens=5))]
    events = built(body, chunks)
    assert [len(e["choices"]) for e in events] == [1] * len(events)  # one choice per event, as vLLM streams
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events[:2]] == [
        (0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    steps = [(e["choices"][0]["index"], e["choices"][0]["delta"]["content"], e["choices"][0]["finish_reason"])
             for e in events[2:]]
    assert steps == [(0, "a", None), (1, "x", None), (1, "y", "stop"), (0, "b", "length")]
    assert events[4]["choices"][0]["stop_reason"] == "END"
    full = built(body, chunks, stream=False)
    assert [(c["index"], c["message"]["content"], c["finish_reason"], c["stop_reason"]) for c in full["choices"]] \
        == [(0, "ab", "length", None), (1, "xy", "stop", "END")]
    assert full["usage"]["completion_tokens"] == 5  # every choice's tokens


def lp(token, value, *top):
    return TokenLogprob(token=token, logprob=value, top=[TopLogprob(token=t, logprob=v) for t, v in top])


def test_chat_logprobs_in_openai_format():
    body = ChatCompletionRequest.model_validate(chat(logprobs=True, top_logprobs=2, stream=True))
    chunks = [chunk(0, ChoiceDelta(text="Hi", logprobs=[lp("Hi", -0.5, ("Hi", -0.5), ("Yo", -1.5))])),
              chunk(1, ChoiceDelta(text="é", logprobs=[lp("é", float("-inf"))], finish_reason="stop"), finish="stop")]
    events = built(body, chunks)
    assert events[0]["choices"][0]["logprobs"] is None  # the role event
    first = events[1]["choices"][0]["logprobs"]["content"]
    assert first == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]}]
    second = events[2]["choices"][0]["logprobs"]["content"][0]
    assert second["logprob"] == -9999.0 and second["bytes"] == [195, 169]  # -inf as vLLM reports it
    full = built(body, chunks, stream=False)
    assert [t["token"] for t in full["choices"][0]["logprobs"]["content"]] == ["Hi", "é"]
    json.dumps(full, allow_nan=False)  # JSON without NaN or Infinity


def test_completion_logprobs_and_text_offsets_across_events():
    body = CompletionRequest.model_validate(completion(logprobs=1, stream=True))
    chunks = [chunk(0, ChoiceDelta(text="ab", logprobs=[lp("a", -0.1, ("a", -0.1)), lp("b", -0.2, ("c", -0.3))])),
              chunk(1, ChoiceDelta(text="cd", logprobs=[lp("cd", -0.4, ("cd", -0.4))], finish_reason="length"),
                    finish="length")]
    events = built(body, chunks)
    assert [e["choices"][0]["logprobs"] for e in events] == [
        {"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{"a": -0.1}, {"b": -0.2, "c": -0.3}],
         "text_offset": [0, 1]},
        {"tokens": ["cd"], "token_logprobs": [-0.4], "top_logprobs": [{"cd": -0.4}], "text_offset": [2]}]
    full = built(body, chunks, stream=False)["choices"][0]
    assert full["text"] == "abcd" and full["logprobs"]["text_offset"] == [0, 1, 2]
    assert full["logprobs"]["tokens"] == ["a", "b", "cd"]


def test_tool_calls_stream_in_openai_format_and_finish_with_tool_calls():
    body = ChatCompletionRequest.model_validate(chat(tools=TOOLS, stream=True))
    chunks = [chunk(0, ChoiceDelta(tool_calls=[ToolCallDelta(index=0, id="call_a", name="get_weather")])),
              chunk(1, ChoiceDelta(tool_calls=[ToolCallDelta(index=0, arguments="{\"city\": "),
                                               ToolCallDelta(index=1, name="get_time", arguments="{}")])),
              chunk(2, ChoiceDelta(tool_calls=[ToolCallDelta(index=0, arguments="\"Oslo\"}")], finish_reason="stop"),
                    finish="stop")]
    events = built(body, chunks)
    deltas = [e["choices"][0]["delta"] for e in events[1:]]
    assert deltas[0] == {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                         "function": {"name": "get_weather", "arguments": ""}}]}
    assert deltas[1]["tool_calls"][0] == {"index": 0, "function": {"arguments": "{\"city\": "}}
    second = deltas[1]["tool_calls"][1]
    assert second["id"].startswith("chatcmpl-tool-") and second["function"] == {"name": "get_time", "arguments": "{}"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"  # vLLM's for auto
    full = built(body, chunks, stream=False)["choices"][0]
    assert full["finish_reason"] == "tool_calls" and full["message"]["content"] is None
    calls = full["message"]["tool_calls"]
    assert [(c["id"] == "call_a", c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (True, "function", "get_weather", "{\"city\": \"Oslo\"}"), (False, "function", "get_time", "{}")]
    # parallel_tool_calls false keeps the first call only; a named function finishes with "stop", as in vLLM
    only = ChatCompletionRequest.model_validate(chat(tools=TOOLS, parallel_tool_calls=False))
    assert len(built(only, chunks, stream=False)["choices"][0]["message"]["tool_calls"]) == 1
    named = ChatCompletionRequest.model_validate(chat(tools=TOOLS, tool_choice={"type": "function", "function": {
        "name": "get_weather"}}))
    named_chunks = chunks[:2] + [chunk(2, ChoiceDelta(finish_reason="tool_calls"), finish="tool_calls")]
    assert built(named, named_chunks, stream=False)["choices"][0]["finish_reason"] == "stop"
    # no tool called under "auto": an ordinary answer
    plain = built(ChatCompletionRequest.model_validate(chat(tools=TOOLS)), [chunk(0, text="no", finish="stop")],
                  stream=False)["choices"][0]
    assert plain["finish_reason"] == "stop" and plain["message"] == {"role": "assistant", "content": "no"}


def test_completion_echo_prepends_each_prompt_to_its_choices():
    body = CompletionRequest.model_validate(completion(prompt=["Say", [9, 9]], n=2, echo=True, stream=True))
    deltas = [ChoiceDelta(index=i, text=f"+{i}", finish_reason="stop") for i in range(4)]
    chunks = [chunk(0, *deltas[:2], prompt_texts=["Say", "nine nine"]), chunk(1, *deltas[2:], finish="stop")]
    events = built(body, chunks)
    assert [(e["choices"][0]["index"], e["choices"][0]["text"]) for e in events] == [
        (0, "Say+0"), (1, "Say+1"), (2, "nine nine+2"), (3, "nine nine+3")]  # index = prompt x n + i
    full = built(body, chunks, stream=False)
    assert [c["text"] for c in full["choices"]] == ["Say+0", "Say+1", "nine nine+2", "nine nine+3"]
    # a worker that sends no prompt texts: the gateway still echoes the text prompts it has
    quiet = built(body, [chunk(0, *deltas[:2]), chunk(1, *deltas[2:], finish="stop")], stream=False)
    assert [c["text"] for c in quiet["choices"]] == ["Say+0", "Say+1", "+2", "+3"]


def test_chat_echo_repeats_the_last_assistant_message():
    messages = [{"role": "user", "content": "Finish: "}, {"role": "assistant", "content": "The sky is"}]
    body = ChatCompletionRequest.model_validate(chat(messages=messages, echo=True, stream=True))
    chunks = [chunk(0, text=" blue", finish="stop")]
    events = built(body, chunks)
    assert [e["choices"][0]["delta"] for e in events] == [{"role": "assistant", "content": ""},
                                                          {"content": "The sky is"}, {"content": " blue"}]
    assert built(body, chunks, stream=False)["choices"][0]["message"]["content"] == "The sky is blue"
    user_last = ChatCompletionRequest.model_validate(chat(echo=True))
    assert built(user_last, chunks, stream=False)["choices"][0]["message"]["content"] == " blue"


def test_continuous_usage_stats_put_usage_on_every_event():
    body = CompletionRequest.model_validate(completion(stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    chunks = [chunk(0, text="a", usage=Usage(prompt_tokens=4, completion_tokens=1)),
              chunk(1, text="b", finish="stop", usage=Usage(prompt_tokens=4, completion_tokens=2))]
    events = built(body, chunks)
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 2]
    assert events[-1]["choices"] == []
    chat_events = built(ChatCompletionRequest.model_validate(chat(stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True})), chunks)
    assert chat_events[0]["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}  # the role
    # continuous_usage_stats counts only with include_usage, as in vLLM
    without = built(CompletionRequest.model_validate(completion(stream=True, stream_options={
        "continuous_usage_stats": True})), chunks)
    assert all("usage" not in e for e in without)


def test_a_choice_the_worker_left_unfinished_is_finished_at_the_end():
    body = ChatCompletionRequest.model_validate(chat(n=2, stream=True))
    chunks = [chunk(0, ChoiceDelta(index=0, text="a", finish_reason="stop")),
              chunk(1, ChoiceDelta(index=1, text="b"), finish="abort")]
    events = built(body, chunks)
    assert [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in events[2:]] == [
        (0, "stop"), (1, None), (1, "abort")]
    assert [c["finish_reason"] for c in built(body, chunks, stream=False)["choices"]] == ["stop", "abort"]


def test_the_api_page_names_every_parameter():
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    for cls in (ChatCompletionRequest, CompletionRequest):
        for name, field in cls.model_fields.items():
            assert f"`{field.alias or name}`" in page, f"{cls.__name__}.{name} is not in docs/api.md"


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": '
                             b'"function", "function": {"name": "f", "parameters": {"a": ["\\ud800"]}}}]}',
     "tools.0.function.parameters"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": '
                             b'"a\\udfffb"}]}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": '
                             b'{"type": "json_schema", "json_schema": {"name": "n", "schema": {"\\ud800": 1}}}}',
     "response_format.json_schema.schema"),
    ("/v1/completions", b'{"model": "m", "prompt": "x", "structured_outputs": {"json": {"a": "\\udfff"}}}',
     "structured_outputs.json"),
    ("/v1/completions", b'{"model": "m", "prompt": ["ok", "\\ud800"]}', "prompt.1"),
])
def test_lone_surrogates_anywhere_sent_on_are_400_not_500(gateway, path, raw, param):
    """Free-form JSON (a tool's parameters, a schema) goes to the worker as UTF-8: a lone surrogate in it would
    fail there, or fail encoding the bus message with a 500."""
    err = refused(gateway.post(path, content=raw, headers={"content-type": "application/json"}), param)
    assert "surrogate" in err["message"]
