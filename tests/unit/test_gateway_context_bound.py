"""What the gateway refuses or reroutes so that long prompts and busy instances cost workers nothing:
the cheap character bound on the context, and a worker's `overloaded` answer."""

import pytest

from services.gateway import app as gateway_app
from services.gateway.api_types import ChatCompletionRequest, CompletionRequest
from services.gateway.errors import ApiError, from_worker
from services.gateway.limits import check_request
from shared.messages import ErrorInfo, InferChunk, ModelSpec
from shared.settings import GatewaySettings

SPEC = ModelSpec(slug="m", path="/m", parameter_bytes=1, max_context_tokens=1000)
SETTINGS = GatewaySettings(max_chars_per_token=8, max_prompt_chars=10**6)


def test_a_prompt_longer_than_the_context_can_hold_is_refused_without_tokenising():
    # 1000 tokens of at most 8 characters each hold at most 8000 characters
    check_request(CompletionRequest(model="m", prompt="x" * 8000), SPEC, SETTINGS)  # may fit: the worker counts
    with pytest.raises(ApiError) as exc:
        check_request(CompletionRequest(model="m", prompt="x" * 8001), SPEC, SETTINGS)
    err = exc.value
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "prompt")
    assert "1001 tokens" in err.message and "1000 tokens" in err.message

    # the answer shares the context: with max_tokens 200, 800 tokens (6400 characters) are left for the prompt
    check_request(CompletionRequest(model="m", prompt="x" * 6400, max_tokens=200), SPEC, SETTINGS)
    with pytest.raises(ApiError) as exc:
        check_request(CompletionRequest(model="m", prompt="x" * 6401, max_tokens=200), SPEC, SETTINGS)
    assert exc.value.code == "context_length_exceeded" and "max_tokens (200)" in exc.value.message

    # chat: every message's content counts
    messages = [{"role": "user", "content": "y" * 4000}, {"role": "assistant", "content": "z" * 4001}]
    with pytest.raises(ApiError) as exc:
        check_request(ChatCompletionRequest(model="m", messages=messages), SPEC, SETTINGS)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"


def test_by_default_the_longest_prompt_accepted_is_refused_for_a_small_context():
    defaults = GatewaySettings()
    demo = SPEC.model_copy(update={"max_context_tokens": 2048})  # the demo model's
    with pytest.raises(ApiError) as exc:
        check_request(CompletionRequest(model="m", prompt="x" * defaults.max_prompt_chars), demo, defaults)
    assert exc.value.code == "context_length_exceeded"
    # a model with a long context: only the worker's exact count can tell
    long_context = SPEC.model_copy(update={"max_context_tokens": 32768})
    check_request(CompletionRequest(model="m", prompt="x" * defaults.max_prompt_chars), long_context, defaults)


async def test_an_overloaded_instance_is_a_retryable_503_and_the_request_is_routed_again():
    err = from_worker("overloaded", "busy")
    assert err.status == 503 and err.headers["Retry-After"] == "1"

    async def stream():
        yield InferChunk(request_id="r", seq=0, error=ErrorInfo(code="overloaded", message="m on w0 is busy"))

    with pytest.raises(gateway_app._NotStarted):  # nothing was generated: another instance may serve it
        await gateway_app._first(stream(), "prompt")
