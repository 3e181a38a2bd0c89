import pytest
from pydantic import ValidationError

from shared.messages import (
    CopyState, InferChunk, InferRequest, ModelCopy, PlacementPlan, PlannedCopy, Usage, WorkerState,
)


def test_roundtrip_and_unknown_fields_are_ignored():
    req = InferRequest(model="m", prompt="hi")
    raw = req.encode()
    assert InferRequest.decode(raw) == req
    newer = raw.replace(b'{"request_id"', b'{"field_from_the_future": 1, "request_id"')
    assert newer != raw
    assert InferRequest.decode(newer) == req


def test_malformed_message_raises_validation_error():
    with pytest.raises(ValidationError):
        InferRequest.decode(b'{"prompt": "no model"}')
    with pytest.raises(ValidationError):
        InferRequest.decode(b"not json")


def test_chunk_last():
    assert not InferChunk(request_id="r", seq=0, text="a").last
    assert InferChunk(request_id="r", seq=1, finish_reason="stop").last
    assert InferChunk(request_id="r", seq=1, error={"code": "x", "message": "y"}).last
    assert Usage(prompt_tokens=3, completion_tokens=4).total_tokens == 7


def test_worker_state_free_bytes_and_lookup():
    w = WorkerState(worker_id="w", node="n", device="cpu:0", engine="sim", memory_budget_bytes=100,
                    weight_bytes=30, kv_bytes=50,
                    copies=[ModelCopy(model="a", state=CopyState.ACTIVE, weight_bytes=30)])
    assert w.free_bytes == 20
    assert w.copy_of("a").state is CopyState.ACTIVE
    assert w.copy_of("b") is None


def test_plan_comparison_ignores_order_and_ids():
    a = PlacementPlan(created_at_s=1, copies=[PlannedCopy(model="x", worker_id="1"), PlannedCopy(model="y", worker_id="2")])
    b = PlacementPlan(created_at_s=2, copies=[PlannedCopy(model="y", worker_id="2"), PlannedCopy(model="x", worker_id="1")])
    c = PlacementPlan(created_at_s=2, copies=[PlannedCopy(model="y", worker_id="1")])
    assert a.same_copies(b)
    assert not a.same_copies(c)
    assert not a.same_copies(None)
