"""The answer's length against the model's context: a chat request without max_tokens may fill the context, as
vLLM's server allows; one with max_tokens must fit it."""

import pytest

from services.gpu_worker.engines import EngineError, answer_budget
from shared.messages import InferRequest, SamplingParams


def request(**sampling) -> InferRequest:
    return InferRequest(model="m", prompt="x", sampling=SamplingParams(**sampling))


def test_without_max_tokens_the_answer_may_run_to_the_contexts_end():
    assert answer_budget(request(max_tokens=256, fill_context=True), 1000, 2048).max_tokens == 1048
    assert answer_budget(request(max_tokens=256, fill_context=True), 2000, 2048).max_tokens == 48  # past the cap


def test_an_asked_length_must_fit():
    assert answer_budget(request(max_tokens=48), 2000, 2048).max_tokens == 48
    with pytest.raises(EngineError) as err:
        answer_budget(request(max_tokens=49), 2000, 2048)
    assert err.value.code == "context_length_exceeded"


def test_a_prompt_that_fills_the_context_leaves_no_room_even_without_max_tokens():
    with pytest.raises(EngineError) as err:
        answer_budget(request(max_tokens=256, fill_context=True), 2048, 2048)
    assert err.value.code == "context_length_exceeded"
