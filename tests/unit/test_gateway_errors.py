"""Gateway error mapping: every failure is an OpenAI-shaped JSON error with the right status, and bad
input (oversized, badly encoded, out-of-range) is a clear 4xx naming what was wrong."""

import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.gateway import errors
from services.gateway.api_types import ChatCompletionRequest
from services.gateway.app import create_app
from services.gateway.admission_core import AdmissionCore
from services.gateway.routing import RoutingTable
from shared.messages import ModelSpec
from shared.settings import GatewaySettings


def app_with(route):
    app = FastAPI()
    errors.install(app)
    app.post("/x")(route)
    return TestClient(app, raise_server_exceptions=False)


def test_unexpected_exceptions_become_openai_500s():
    async def boom():
        raise RuntimeError("secret detail")

    resp = app_with(boom).post("/x")
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "internal" and err["message"] == errors.INTERNAL[2]
    assert "secret detail" not in resp.text and "RuntimeError" not in resp.text


def test_validation_errors_name_the_parameter():
    async def chat(body: ChatCompletionRequest):
        return {}

    client = app_with(chat)
    resp = client.post("/x", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": -3})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_k"
    assert "top_k" in resp.json()["error"]["message"]
    # a parameter vLLM accepts but no worker here honours is refused by name; one nobody knows is ignored, as
    # vLLM's server ignores it (docs/api.md)
    resp = client.post("/x", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                   "use_beam_search": True})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "use_beam_search"
    assert resp.json()["error"]["code"] == "unsupported_parameter"
    resp = client.post("/x", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1})
    assert resp.status_code == 200, resp.text
    resp = client.post("/x", json={"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    assert resp.status_code == 400 and "messages.0.role" in resp.json()["error"]["message"]
    resp = client.post("/x", content=b"[1,", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


def test_worker_error_codes_map_to_statuses():
    assert errors.from_worker("context_length_exceeded", "m").status == 400
    busy = errors.from_worker("not_active", "m")
    assert busy.status == 503 and busy.headers["Retry-After"] == "1"
    assert errors.from_worker("something_new", "m").status == 500


def test_an_engines_refusal_of_a_parameter_reaches_the_client_naming_it():
    refused = errors.from_worker("invalid_request", "top_p must be in (0, 1], got 2.0. (parameter=top_p, value=2.0)")
    assert (refused.status, refused.code, refused.param) == (400, "invalid_request", "top_p")
    assert "top_p must be in (0, 1]" in refused.message
    long = errors.from_worker("invalid_request", "x" * 5000)
    assert len(long.message) == errors.CLIENT_DETAIL_CHARS and long.param is None
    # other codes keep the worker's words out of the answer
    hidden = errors.from_worker("engine_dead", "the vLLM engine of m died at /srv/worker-3")
    assert "/srv" not in hidden.message and "/srv" in hidden.detail
    assert errors.from_worker("tool_parser_unavailable", "no parser 'x'").status == 500
    assert errors.from_worker("no_chat_template", "m has none").status == 400


# ------------------------------------------------------------ bad input on the real gateway app
# The app from create_app without its lifespan (no NATS): a stub catalog holds one model, so every
# request below is refused before routing.

CONTEXT = 512
LIMITS = dict(max_body_bytes=4096, max_messages=3, max_prompt_chars=100)


@pytest.fixture(scope="module")
def gateway():
    app = create_app(GatewaySettings(require_api_key=False, **LIMITS))
    spec = ModelSpec(slug="m", path="/m", parameter_bytes=1, max_context_tokens=CONTEXT)
    app.state.gateway.table = RoutingTable(SimpleNamespace(items={"m": spec}), SimpleNamespace(items={}), 5,
                                           AdmissionCore(queue_size=4))
    return TestClient(app, raise_server_exceptions=False)


def error_of(resp, status: int) -> dict:
    """The OpenAI error object of a response that must have ``status``."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] != "server_error", err
    return err


def chat(**over) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | over


def post_raw(client, raw: bytes, path="/v1/chat/completions", **headers):
    return client.post(path, content=raw, headers={"content-type": "application/json"} | headers)


def test_oversized_body_is_413_before_parsing(gateway):
    err = error_of(gateway.post("/v1/chat/completions", json=chat(user="x" * 5000)), 413)
    assert err["code"] == "request_too_large" and "4096 bytes" in err["message"]
    # not JSON at all: the size is refused before anything parses it
    assert error_of(post_raw(gateway, b"\xff" * 5000), 413)["code"] == "request_too_large"


def test_oversized_chunked_body_without_content_length_is_413(gateway):
    def chunks():
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    resp = gateway.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert resp.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in resp.request.headers
    assert error_of(resp, 413)["code"] == "request_too_large"
    small = gateway.post("/v1/chat/completions", content=iter([json.dumps(chat(top_k=-2)).encode()[:20],
                                                                    json.dumps(chat(top_k=-2)).encode()[20:]]),
                         headers={"content-type": "application/json"})
    assert error_of(small, 400)["param"] == "top_k"  # a chunked body under the limit is parsed as usual


def test_invalid_utf8_is_400(gateway):
    err = error_of(post_raw(gateway, b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400)
    assert err["code"] == "invalid_encoding" and "UTF-8" in err["message"]
    utf16 = json.dumps(chat()).encode("utf-16")  # JSON is UTF-8 (RFC 8259)
    assert error_of(post_raw(gateway, utf16), 400)["code"] == "invalid_encoding"


def test_lone_surrogates_are_400_not_500(gateway):
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    err = error_of(post_raw(gateway, raw), 400)
    assert err["param"] == "messages.0.content" and "surrogate" in err["message"]
    err = error_of(post_raw(gateway, b'{"model": "m\\udfff", "prompt": "x"}', path="/v1/completions"), 400)
    assert err["param"] == "model"
    error_of(post_raw(gateway, b'{"model": "m", "messages": [], "\\ud800": 1}'), 400)  # quoted back safely


@pytest.mark.parametrize("raw", [b"{nope", b'{"model": "m",', b"[" * 2000 + b"]" * 2000, b"\"just a string\""])
def test_malformed_json_is_400(gateway, raw):
    err = error_of(post_raw(gateway, raw), 400)
    assert err["code"] in {"invalid_json", "invalid_request"}


def test_malformed_json_codes(gateway):
    assert error_of(post_raw(gateway, b"{nope"), 400)["code"] == "invalid_json"
    assert error_of(post_raw(gateway, b"[" * 2000 + b"]" * 2000), 400)["code"] == "invalid_json"


@pytest.mark.parametrize("param, raw_value", [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "-Infinity"), ("temperature", "-0.5"),
    ("temperature", "2.5"), ("top_p", "NaN"), ("top_p", "0"), ("top_p", "-1"), ("top_p", "1.5"),
    ("top_p", "Infinity"), ("max_tokens", "-1"), ("max_tokens", "0"), ("max_tokens", "NaN"),
    ("max_tokens", "1e400"), ("max_tokens", "100000000000000000000000"), ("max_completion_tokens", "-5"),
    ("seed", "100000000000000000000000"), ("seed", "NaN"),
])
def test_bad_sampling_values_are_400_naming_the_parameter(gateway, param, raw_value):
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (
        param.encode(), raw_value.encode())
    err = error_of(post_raw(gateway, raw), 400)
    assert err["param"] == param and err["code"] == "invalid_request" and param in err["message"]


def test_nan_is_named_as_not_finite(gateway):
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    assert "finite" in error_of(post_raw(gateway, raw), 400)["message"]


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_at_or_above_the_models_context_is_400(gateway, param):
    err = error_of(gateway.post("/v1/chat/completions", json=chat(**{param: CONTEXT})), 400)
    assert err["param"] == param and err["code"] == "context_length_exceeded" and str(CONTEXT) in err["message"]
    err = error_of(gateway.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 4000}), 400)
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"


def test_too_many_messages_is_400(gateway):
    err = error_of(gateway.post("/v1/chat/completions",
                                json=chat(messages=[{"role": "user", "content": "x"}] * 4)), 400)
    assert err["param"] == "messages" and err["code"] == "too_many_messages" and "at most 3" in err["message"]


def test_prompt_over_the_character_limit_is_400(gateway):
    err = error_of(gateway.post("/v1/chat/completions", json=chat(
        messages=[{"role": "system", "content": "x" * 60}, {"role": "user", "content": "y" * 41}])), 400)
    assert err["param"] == "messages" and err["code"] == "prompt_too_long" and "101" in err["message"]
    err = error_of(gateway.post("/v1/completions", json={"model": "m", "prompt": "z" * 101}), 400)
    assert err["param"] == "prompt" and err["code"] == "prompt_too_long"


def test_stop_sequences_are_bounded(gateway):
    assert error_of(gateway.post("/v1/chat/completions", json=chat(stop=[""])), 400)["param"] == "stop"
    assert error_of(gateway.post("/v1/chat/completions", json=chat(stop=["a"] * 5)), 400)["param"] == "stop"


def test_unknown_model_is_404_before_the_limits(gateway):
    err = error_of(gateway.post("/v1/chat/completions", json=chat(model="other", max_tokens=CONTEXT)), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_starlette_errors_are_openai_shaped(gateway):
    err = error_of(gateway.get("/v1/chat/completions"), 405)
    assert err["code"] == "method_not_allowed" and err["type"] == "invalid_request_error"
    assert error_of(gateway.post("/v1/nothing-here"), 404)["code"] == "not_found"


def test_error_bodies_survive_unpaired_surrogates_quoted_back():
    resp = errors.ApiError(400, "unsupported parameter: \ud800", param="\ud800", code="invalid_request").response()
    body = json.loads(resp.body.decode("ascii"))
    assert body["error"]["param"] == "\ud800" and resp.status_code == 400


def test_worker_context_errors_name_the_prompt_parameter():
    err = errors.from_worker("context_length_exceeded", "too long", prompt_param="messages")
    assert err.status == 400 and err.param == "messages"
    assert errors.from_worker("bad_request", "no", prompt_param="messages").param is None


def test_key_slots_count_per_key_with_overrides():
    from services.gateway.limits import KeySlots
    from shared.messages import ApiKeyRecord

    slots = KeySlots(default_limit=2)
    a, b = ApiKeyRecord(id="a", name="a"), ApiKeyRecord(id="b", name="b", max_concurrency=1)
    ra1, ra2, rb = slots.acquire(a), slots.acquire(a), slots.acquire(b)
    for record in (a, b):
        with pytest.raises(errors.ApiError) as over:
            slots.acquire(record)
        assert over.value.status == 429 and over.value.code == "concurrency_limit_exceeded"
        assert over.value.headers["Retry-After"] == "1" and over.value.type == "rate_limit_error"
    ra1()
    ra1()  # giving a slot back twice frees it once
    assert slots.in_flight == {"a": 1, "b": 1}
    ra3 = slots.acquire(a)
    for release in (ra2, ra3, rb):
        release()
    assert slots.in_flight == {}
    assert slots.acquire(None)() is None  # no key required: nothing counted


# ------------------------------------------------------------ what a worker's failure tells the client
# Workers' error messages and bus errors name workers, instances, subjects, paths and exception text: the
# client gets the stable sentence of the code; the detail goes to the log and the request's span.

SECRET = "/srv/models/secret-llama/model.safetensors on leak-worker-7"
LEAKS = ("/srv/models", "leak-worker-7", "RuntimeError", "warmserve.infer", "leak-instance")


@pytest.fixture
def served_by(spans):
    """The real gateway app whose one instance (leak-instance on leak-worker-7) answers with ``chunks``."""
    from shared.messages import Outcome
    from shared.policy.routing import Route

    def make(chunks):
        app = create_app(GatewaySettings(require_api_key=False))
        gw = app.state.gateway
        spec = ModelSpec(slug="m", path="/m", parameter_bytes=1, max_context_tokens=CONTEXT)
        gw.table = RoutingTable(SimpleNamespace(items={"m": spec}), SimpleNamespace(items={}), 5,
                                AdmissionCore(queue_size=4))
        route = Route(worker_id="leak-worker-7", instance_id="leak-instance", in_flight=0)

        async def admit(model, exclude=()):
            if route.instance_id in exclude:
                raise errors.ApiError(503, "No instance", code="no_capacity", detail="nothing left")
            return route, Outcome.WARM, 0.0

        async def stream(_route, _infer):
            for chunk in chunks:
                if isinstance(chunk, Exception):
                    raise chunk
                yield chunk

        gw.admission = SimpleNamespace(admit=admit, notify=lambda: None)
        gw.table.finished = lambda _route: None
        gw.chunks = stream
        gw.cancel = lambda *_: None
        return TestClient(app, raise_server_exceptions=False)

    return make


def _chunk(seq, **kw):
    from shared.messages import ErrorInfo, InferChunk

    if "error" in kw:
        kw["error"] = ErrorInfo(code=kw["error"][0], message=kw["error"][1])
    return InferChunk(request_id="r", seq=seq, **kw)


def _no_leak(text: str) -> None:
    assert not any(leak in text for leak in LEAKS), text


@pytest.mark.parametrize("code, status", [("internal", 500), ("load_failed", 500), ("bad_request", 400),
                                          ("context_length_exceeded", 400)])
def test_a_workers_error_reaches_the_client_as_the_stable_message_and_the_log(served_by, spans, caplog, code, status):
    detail = f"generation failed: RuntimeError('{SECRET}')"
    client = served_by([_chunk(0, error=(code, detail))])
    with caplog.at_level("INFO", logger="warmserve.gateway"):
        resp = client.post("/v1/chat/completions", json=chat())
    err = resp.json()["error"]
    assert resp.status_code == status, resp.text
    known = code in errors.WORKER_ERRORS
    assert err["code"] == (code if known else "internal")
    assert err["message"] == (errors.WORKER_ERRORS[code][1] if known else errors.INTERNAL[2])
    _no_leak(resp.text)
    logged = [r.getMessage() for r in caplog.records if SECRET in r.getMessage()]
    assert len(logged) == 1 and "leak-worker-7" in logged[0], caplog.text
    [span] = [s for s in spans.get_finished_spans() if s.name == "gateway.request"
              and any(e.attributes.get("detail") == f"{code}: {detail}" for e in s.events)]
    assert span.attributes["error.type"] == err["code"]


def test_a_stream_that_fails_midway_ends_with_the_stable_message(served_by, spans, caplog):
    from shared.bus import BusError

    cases = {
        "engine_dead": [_chunk(0, text="a"), _chunk(1, error=("engine_dead", f"the vLLM engine died: {SECRET}"))],
        "responder_lost": [_chunk(0, text="a"), BusError("responder_lost", "the worker behind "
                                                                             "warmserve.infer.leak-worker-7 is gone")],
        "internal": [_chunk(0, text="a"), RuntimeError(SECRET)],
    }
    for code, chunks in cases.items():
        caplog.clear()
        with caplog.at_level("INFO", logger="warmserve.gateway"):
            resp = served_by(chunks).post("/v1/chat/completions", json=chat(stream=True))
        events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
        err = events[-1]["error"]
        assert err["code"] == code and resp.text.rstrip().endswith("data: [DONE]"), resp.text
        assert err["message"] in ({m for _, m in errors.WORKER_ERRORS.values()} | {errors.INTERNAL[2]})
        _no_leak(resp.text)
        assert "leak-worker-7" in caplog.text, (code, caplog.text)  # the operator still learns which worker


def test_a_failed_requests_logged_detail_is_shortened(caplog):
    """A worker's message may quote the prompt: the log line keeps its start only."""
    from unittest.mock import MagicMock

    from services.gateway.app import LOGGED_DETAIL_CHARS, Served

    served = Served(MagicMock(), "tiny", "req-1", MagicMock())
    detail = "engine_error: prompt was " + "secret " * 200
    with caplog.at_level("INFO", logger="warmserve.gateway"):
        served.failed(errors.ApiError(500, "failed", code="engine_error", detail=detail))
    [line] = [r.getMessage() for r in caplog.records if "req-1" in r.getMessage()]
    assert line.count("secret") < 60 and len(line) < LOGGED_DETAIL_CHARS + 120
    assert line.endswith(f"({len(detail) - LOGGED_DETAIL_CHARS} more characters)")


def test_gateways_behind_one_balancer_each_enforce_their_share_of_a_keys_limits():
    """With N gateways (WARMSERVE_GATEWAYS) each admits 1/N of a key's concurrency and rate, so the key's
    limits hold across all of them; never less than one request each."""
    from services.gateway.app import Gateway
    from services.gateway.limits import KeySlots
    from shared.apikeys import hash_key
    from shared.messages import ApiKeyRecord
    from shared.settings import GatewaySettings

    assert KeySlots(default_limit=10, gateways=3).limit(ApiKeyRecord(id="a", name="a")) == 4
    assert KeySlots(default_limit=10, gateways=3).limit(ApiKeyRecord(id="b", name="b", max_concurrency=1)) == 1
    assert KeySlots(default_limit=10).limit(ApiKeyRecord(id="a", name="a")) == 10

    def admitted(gateways: int) -> int:  # requests of one key admitted at once by one gateway, rate 10/s
        gw = Gateway(GatewaySettings(rate_limit_rps=10.0, gateways=gateways))
        gw.keys = type("Keys", (), {"items": {hash_key("k"): ApiKeyRecord(id="k", name="k")}})()
        n = 0
        try:
            while n < 100:
                gw.authorize("Bearer k")
                n += 1
        except errors.ApiError as exc:
            assert exc.status == 429
        return n
    assert admitted(1) == 20 and admitted(2) == 10, "a burst of twice the rate, of this gateway's share"
