"""Handover end to end on one sim worker: a model whose requests queue takes the worker from another
model's lightly used instance. The instance it replaces is drained, so its request in progress streams to
the end; the queued requests are served from the prewarmed copy, and Postgres records why."""

import concurrent.futures
import json

import pytest
from openai import OpenAI

from tests.e2e.conftest import cli, copy_states, query, start_cluster, stream_chat, until

pytestmark = pytest.mark.e2e

SLOW_TOKENS = 1500  # at 3 ms a token (2 GB of modelled weights on the fast profile): about 4.5 s of stream


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("handover")
    up = start_cluster(state, "--engine", "sim", "--workers", "1", "--no-smoke", timeout_s=180, extra_env={
        "WARMSERVE_BATCH_CAPACITY": "4", "WARMSERVE_QUEUE_WAIT_S": "30", "WARMSERVE_HEARTBEAT_TIMEOUT_S": "3",
        "WARMSERVE_SHARED_TIER": "false"})  # handover alone (the shared tier would serve tiny-llama next to slow)
    info = json.loads((state / "cluster.json").read_text())
    yield {"env": up.env, "state": state, "info": info}
    up.stop()


def test_a_queued_model_takes_the_worker_and_the_replaced_stream_finishes(cluster):
    env, info = cluster["env"], cluster["info"]
    folder = str(cluster["state"] / "models" / "tiny-llama")
    reg = cli(env, "model", "register", "slow", folder, "--parameter-bytes", str(2 * 10**9))
    assert reg.returncode == 0, reg.stderr
    until(lambda: copy_states(env).get("tiny-llama") == "prewarmed", what="the pinned demo model prewarmed")
    client = OpenAI(base_url=f"{info['gateway_url']}/v1", api_key=info["api_key"], max_retries=0, timeout=90)

    def quick(i):
        r = client.chat.completions.with_raw_response.create(
            model="tiny-llama", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8)
        return r.headers["x-warmserve-outcome"], r.parse().choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = pool.submit(stream_chat, client, "slow", SLOW_TOKENS)
        until(lambda: copy_states(env).get("slow") == "active" or slow.done(), every=0.2, what="slow serving")
        assert not slow.done(), "the slow stream ended before the queued requests arrived"
        quick_results = list(pool.map(quick, range(3)))
        pieces, finish, _, _ = slow.result()

    assert finish == "length" and pieces > 0  # the replaced instance's stream ran to its end
    outcomes = [o for o, _ in quick_results]
    assert "cold" not in outcomes and "prewarm_hit" in outcomes, outcomes  # served from the copy
    assert all(content for _, content in quick_results)

    def events():
        return query(info["database_url"], "select model, from_state, to_state, reason from model_events "
                                           "where model in ('slow', 'tiny-llama') order by at, id")

    rows = until(lambda: (lambda r: r if any(e.to_state == "active" and e.reason.startswith("handover")
                                             for e in r) else None)(events()),
                 timeout=30, what="the handover's activation stored")
    slow_states = [(e.from_state, e.to_state, e.reason) for e in rows if e.model == "slow"]
    assert ("active", "draining", "replaced by tiny-llama") in slow_states  # drained, not cut off
    [handover] = [e for e in rows if e.model == "tiny-llama" and e.to_state == "active"
                  and e.reason.startswith("handover")]
    assert "trades" in handover.reason or "fits" in handover.reason
