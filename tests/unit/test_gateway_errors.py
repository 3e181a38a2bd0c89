"""Gateway error mapping: every failure is an OpenAI-shaped JSON error with the right status."""

from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.gateway import errors
from services.gateway.api_types import ChatCompletionRequest


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
    assert err["type"] == "server_error" and err["code"] == "internal" and "RuntimeError" in err["message"]
    assert "secret detail" not in err["message"]


def test_validation_errors_name_the_parameter():
    async def chat(body: ChatCompletionRequest):
        return {}

    client = app_with(chat)
    resp = client.post("/x", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 3})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_k"
    assert "unsupported parameter" in resp.json()["error"]["message"]
    resp = client.post("/x", json={"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    assert resp.status_code == 400 and "messages.0.role" in resp.json()["error"]["message"]
    resp = client.post("/x", content=b"[1,", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


def test_worker_error_codes_map_to_statuses():
    assert errors.from_worker("context_length_exceeded", "m").status == 400
    busy = errors.from_worker("not_active", "m")
    assert busy.status == 503 and busy.headers["Retry-After"] == "1"
    assert errors.from_worker("something_new", "m").status == 500
