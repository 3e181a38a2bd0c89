"""A request's story end to end on a local cluster of one sim worker: every completion response carries its id in
``x-request-id`` (the body's ``id``; an error response too, once the id exists), and ``warmserve request ID``
finds the request in the gateway's buffer over NATS (no trace backend here: WARMSERVE_TRACES_URL unset) and
prints its span tree; an unknown id fails with a message that says where it looked and what to set."""

import json

import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import cli, start_cluster

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"  # the demo model `warmserve up` creates, pins and waits for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    up = start_cluster(tmp_path_factory.mktemp("story"), "--engine", "sim", "--workers", "1", "--no-smoke",
                       timeout_s=180)
    yield up
    up.stop()


@pytest.fixture
def env(cluster):
    env = dict(cluster.env)
    env.pop("WARMSERVE_TRACES_URL", None)  # the gateways' buffer, whatever the machine running this has set
    return env


@pytest.fixture
def client(cluster):
    return OpenAI(base_url=f"http://127.0.0.1:{cluster.port}/v1", api_key=cluster.info["api_key"], max_retries=0,
                  timeout=60)


def story_of(env, request_id: str) -> str:
    out = cli(env, "request", request_id, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


def assert_the_story(text: str, request_id: str, outcome: str) -> None:
    assert text.startswith(f"request {request_id}  trace ")
    assert "gateway.request [gateway]  +0.0 ms" in text
    assert f"outcome {outcome}" in text and f"outcome={outcome}" in text
    assert "worker worker-0 (instance " in text and "worker=worker-0" in text
    assert "first token at +" in text and "· first_token at +" in text
    assert "completion" in text and "status 200" in text
    assert "WARMSERVE_TRACES_URL" in text  # the worker's own spans (activation, prefill) are elsewhere


def test_responses_carry_their_id_and_the_cli_tells_their_story(client, env):
    plain = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "the story"}], max_tokens=4)
    request_id, body = plain.headers["x-request-id"], plain.parse()
    assert request_id == body.id and request_id.startswith("chatcmpl-")
    assert_the_story(story_of(env, request_id), request_id, plain.headers["x-warmserve-outcome"])

    streamed = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "the stream"}], max_tokens=4, stream=True)
    stream_id = streamed.headers["x-request-id"]
    chunks = list(streamed.parse())
    assert chunks and {c.id for c in chunks} == {stream_id} and stream_id != request_id
    text = story_of(env, stream_id)
    assert_the_story(text, stream_id, streamed.headers["x-warmserve-outcome"])
    assert "stream=true" in text

    tree = json.loads(cli(env, "request", stream_id, "--json").stdout)
    assert tree["request_id"] == stream_id and tree["tree"][0]["name"] == "gateway.request"
    assert tree["tree"][0]["attributes"]["warmserve.request_id"] == stream_id


def test_an_error_response_carries_the_id(client):
    with pytest.raises(openai.NotFoundError) as err:  # the id exists before the model is looked up
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2)
    assert err.value.response.headers["x-request-id"].startswith("chatcmpl-")


def test_an_unknown_id_fails_saying_where_it_looked(env):
    out = cli(env, "request", "chatcmpl-0123456789abcdef0123456789abcdef", timeout=60)
    assert out.returncode != 0
    assert "not in the last 1000 requests of any gateway (1 answered)" in out.stderr, out.stderr
    assert "set WARMSERVE_TRACES_URL" in out.stderr
