"""The whole local cluster as a user runs it: ``warmserve up``, then the official openai client."""

import re
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from openai import OpenAI

from tests.e2e.conftest import start_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    up = start_cluster(state)
    children = psutil.Process(up.proc.pid).children(recursive=True)
    yield {"url": f"http://127.0.0.1:{up.port}", "up": up, "output": up.output, "children": children,
           "state": state, "env": up.env, "key": up.info["api_key"]}
    up.stop()


def test_up_reports_progress_and_answers_the_smoke_request(cluster):
    text = cluster["output"]
    assert re.search(r"\[7/7\] smoke request .* ok", text), text
    # readiness means servable: the demo model is active, or prewarmed and activated by this very request
    assert re.search(r"answer: '.+' \(\d+ tokens, outcome (warm|prewarm_hit), finish (length|stop)\)", text), text
    assert re.search(r"worker\(s\) with the (vllm|sim) engine", text), text
    assert f"{cluster['url']}/v1" in text


def test_chat_completion_with_the_official_client(cluster):
    client = OpenAI(base_url=f"{cluster['url']}/v1", api_key=cluster["key"])
    models = client.models.list()
    assert "tiny-llama" in [m.id for m in models.data]

    resp = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hello!"}],
                                          max_tokens=12, seed=5)
    assert resp.object == "chat.completion" and resp.model == "tiny-llama"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 12 and resp.usage.prompt_tokens > 0

    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hello!"}],
                                            max_tokens=12, seed=5, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == resp.choices[0].message.content  # same seed, same tokens
    assert finish == "length" and usage.completion_tokens == 12

    completion = client.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=4)
    assert completion.choices[0].text and completion.usage.completion_tokens == 4


def test_errors_reach_the_client_as_openai_errors(cluster):
    import openai

    client = OpenAI(base_url=f"{cluster['url']}/v1", api_key=cluster["key"], max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(exc.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x " * 3000}],
                                       max_tokens=8)
    with pytest.raises(openai.BadRequestError) as exc:  # a parameter vLLM takes but no worker here honours
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"use_beam_search": True})
    assert "use_beam_search" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}], n=17)
    assert exc.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError) as exc:
        OpenAI(base_url=f"{cluster['url']}/v1", api_key="ws-not-a-key", max_retries=0).models.list()
    assert exc.value.code == "invalid_api_key"


def test_cli_admin_commands_talk_to_the_cluster(cluster):
    run = lambda *a: subprocess.run([sys.executable, "-m", "tooling.cli.main", *a], env=cluster["env"],
                                    capture_output=True, text=True, timeout=60)
    workers = run("workers")
    assert workers.returncode == 0, workers.stderr
    # active after the smoke request, or prewarmed again once the autoscaler stopped the idle instance
    assert "worker-0" in workers.stdout and re.search(r"tiny-llama\s+(active|prewarmed)", workers.stdout)
    import importlib.util

    expected = "vllm" if importlib.util.find_spec("vllm") else "sim"  # auto: real inference when installed
    assert f"engine={expected}" in workers.stdout
    models = run("model", "list")
    assert re.search(r"^tiny-llama\s+active\s+1\s", models.stdout, re.M), models.stdout
    pin = run("prewarm", "pin", "tiny-llama", "--copies", "1")
    assert pin.returncode == 0 and "1 prewarmed copy kept" in pin.stdout
    assert re.search(r"^pin 1\s+tiny-llama", run("prewarm", "list").stdout, re.M)
    show = run("placement", "show")
    assert show.returncode == 0 and re.search(r"^tiny-llama .* worker-0 \(pinned\)", show.stdout, re.M), show.stdout
    assert run("prewarm", "unpin", "tiny-llama").returncode == 0
    unknown = run("worker", "drain", "worker-77")
    assert unknown.returncode != 0 and "no worker 'worker-77'" in unknown.stderr
    bad = run("model", "register", "Bad.Slug", "/nowhere")
    assert bad.returncode != 0 and "bad_request" in bad.stderr
    history = run("placement-history", "--limit", "1")
    assert history.returncode == 0 and "tiny-llama" in history.stdout
    chat = run("chat", "hi", "--stream", "--max-tokens", "3")
    assert chat.returncode == 0 and chat.stdout.strip()


def test_history_reaches_postgres(cluster):
    import psycopg

    pgdata = cluster["state"] / "postgres" / "data"
    def query(sql):
        with psycopg.connect(f"postgresql://postgres@/warmserve?host={pgdata}") as conn:
            return conn.execute(sql).fetchall()

    deadline = time.monotonic() + 15  # events are stored asynchronously; liveness every 10 s
    while True:
        events = query("select to_state from model_events where model = 'tiny-llama' order by at, id")
        plans = query("select count(*) from placement_decisions")[0][0]
        workers = query("select id from workers")
        if (len(events) >= 3 and workers) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [e[0] for e in events][:3] == ["loading", "prewarmed", "active"]
    assert plans >= 1 and ("worker-0",) in workers


def test_ctrl_c_stops_everything(cluster):
    up, children = cluster["up"], cluster["children"]
    assert len(children) >= 6  # nats-server + five services (postgres is daemonised by pg_ctl)
    rest = up.stop(timeout_s=60)
    assert up.proc.returncode == 0, rest
    assert "stopped." in rest
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans: {[p.pid for p in alive]}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cluster['url']}/healthz", timeout=2)
    assert not (cluster["state"] / "postgres" / "data" / "postmaster.pid").exists()
