"""A worker that dies mid-stream, and one that hangs: what clients, placement and the orchestrator do."""

import asyncio
import concurrent.futures
import json
import signal
import threading
import time

import httpx
import pytest

from shared import bus
from shared.admin import AdminClient
from tests.chaos.conftest import (
    cli, ended_with_error, gateway_gauge, service_process, spawn_worker, stream, until, workers,
)

pytestmark = pytest.mark.chaos

HEARTBEAT_TIMEOUT_S = 3  # the cluster fixture's


def plain(url: str, key: str, out: list) -> None:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})
        out.append((r.status_code, r.json()))
    except httpx.HTTPError as exc:
        out.append((None, repr(exc)))


async def commands_to(nats_url: str, worker_id: str, seconds: float,
                      listening: threading.Event | None = None) -> list[bytes]:
    """Every command published to one worker's command subject during ``seconds`` (``listening`` is set once
    the subscription is in place)."""
    nc = await bus.connect(nats_url, "chaos-observer", deadline_s=5)
    seen = []
    try:
        async def record(msg):
            seen.append(msg.data)

        sub = await nc.subscribe(f"warmserve.worker.{worker_id}.cmd", cb=record)
        await nc.flush()
        if listening is not None:
            listening.set()
        await asyncio.sleep(seconds)
        await sub.unsubscribe()
    finally:
        await nc.close()
    return seen


def serving_worker(env) -> str:
    def busy():
        out = json.loads(cli(env, "workers", "--json").stdout)
        return next((w["worker_id"] for w in out if any(c["in_flight"] for c in w["copies"])), None)
    return until(busy, timeout=10, every=0.2, what="a worker with a request in flight")


def only_place_to_serve(env, worker: str) -> None:
    """Wait for ``worker`` to register, then drain the cluster's own workers until they serve nothing."""
    until(lambda: worker in workers(env), timeout=30, what=f"{worker} registered")
    for w in ("worker-0", "worker-1"):
        assert cli(env, "worker", "drain", w).returncode == 0
    until(lambda: not any(m for w, m in workers(env).items() if w != worker and "active" in m.values()),
          timeout=30, what="drained workers serve nothing")


def test_worker_killed_mid_stream(cluster):
    """The client's stream ends with an error event; requests queued behind it are served elsewhere (or
    get a clear 503); placement drops the dead worker within the heartbeat timeout and the orchestrator
    stops sending it commands."""
    env, url, key = cluster["env"], cluster["url"], cluster["key"]
    lost = spawn_worker(cluster["up"], "worker-x")
    try:
        only_place_to_serve(env, "worker-x")
        out: dict = {}
        streamer = threading.Thread(target=stream, args=(url, key, out))
        streamer.start()
        until(lambda: out.get("lines"), timeout=30, what="the stream's first token")
        assert workers(env)["worker-x"].get("tiny-llama") == "active"
        queued: list = []
        waiters = [threading.Thread(target=plain, args=(url, key, queued)) for _ in range(2)]
        for t in waiters:  # one request per instance: these wait behind the stream
            t.start()
        until(lambda: gateway_gauge(url, "warmserve:num_requests_waiting") >= 2, timeout=30, every=0.1,
              what="both requests queued at the gateway")
        listening = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            observing = pool.submit(lambda: asyncio.run(commands_to(
                cluster["nats_url"], "worker-x", HEARTBEAT_TIMEOUT_S + 2.0, listening)))
            assert listening.wait(10), observing.exception(0) if observing.done() else "no observer"
            lost.kill()  # at once: the stream lasts seconds only (sim steps of about a millisecond)
            killed = time.monotonic()
            for w in ("worker-0", "worker-1"):  # the queued requests may now be served there
                assert cli(env, "worker", "undrain", w).returncode == 0
            observed = observing.result()

        streamer.join(30)
        err = ended_with_error(out)
        # the mechanism is the error code below (the heartbeat, not a timeout); this bound only leaves room for
        # a loaded machine
        assert out["lines"][-1][0] - killed < 20, "the stream's error came late"
        assert err["code"] == "responder_lost" and "worker" in err["message"], err  # the heartbeat, not a timeout
        for t in waiters:
            t.join(40)
        assert len(queued) == 2
        for status, body in queued:  # served by another worker, or told clearly that there was no room
            assert status == 200 or (status == 503 and body["error"]["message"]), (status, body)
        assert any(status == 200 for status, _ in queued)

        def replanned():
            show = json.loads(cli(env, "placement", "show", "--json").stdout)
            planned = {c["worker_id"] for c in show["copies"]} | set(show["inputs"].get("workers", {}))
            return "worker-x" not in planned and show
        until(replanned, timeout=HEARTBEAT_TIMEOUT_S + 10, what="placement re-planned without worker-x")
        assert "worker-x" not in workers(env)
        late = asyncio.run(commands_to(cluster["nats_url"], "worker-x", 4.0))
        assert late == [], f"commands still sent to the dead worker: {late}"
        assert len(observed) <= 2, f"the orchestrator kept commanding the dead worker: {observed}"
    finally:
        lost.kill()
        lost.wait()
        for w in ("worker-0", "worker-1"):
            cli(env, "worker", "undrain", w)


def test_stuck_worker_times_out_and_leaves_routing(cluster):
    """A worker that stops answering (SIGSTOP): its stream ends with a clear error, it drops out of the
    worker list and out of routing, the next request is served elsewhere, and it comes back on SIGCONT."""
    env, url, key, up = cluster["env"], cluster["url"], cluster["key"], cluster["up"]
    out: dict = {}
    streamer = threading.Thread(target=stream, args=(url, key, out))
    streamer.start()
    until(lambda: out.get("lines"), timeout=30, what="the stream's first token")
    stuck_id = serving_worker(env)
    stuck = service_process(up, "gpu_worker", stuck_id)
    stuck.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        streamer.join(30)
        err = ended_with_error(out)
        assert out["lines"][-1][0] - stopped < 20  # room for a loaded machine; the code below is the mechanism
        assert err["code"] == "responder_lost", err  # the stale heartbeat (3 s), before the 5 s silence timeout
        until(lambda: stuck_id not in workers(env), timeout=HEARTBEAT_TIMEOUT_S + 5, what="stuck worker out of the list")
        served: list = []
        plain(url, key, served)
        assert served[0][0] == 200, served
        other = next(w for w in ("worker-0", "worker-1") if w != stuck_id)
        assert workers(env)[other].get("tiny-llama") == "active"
    finally:
        stuck.send_signal(signal.SIGCONT)
    until(lambda: stuck_id in workers(env), timeout=15, what="the worker back after SIGCONT")
    assert stuck.is_running() and stuck.status() != "stopped"


async def first_command(nats_url: str, worker_id: str, kind: str, then, timeout_s: float, after=None) -> float:
    """Subscribe to one worker's commands, call ``then()``, and return when a ``kind`` command reached it
    (and ``await after(nc)`` has run on the same connection, if given)."""
    nc = await bus.connect(nats_url, "chaos-observer", deadline_s=5)
    seen = asyncio.Event()
    try:
        async def record(msg):
            if json.loads(msg.data).get("kind") == kind:
                seen.set()

        sub = await nc.subscribe(f"warmserve.worker.{worker_id}.cmd", cb=record)
        await nc.flush()
        then()
        await asyncio.wait_for(seen.wait(), timeout_s)
        await sub.unsubscribe()
        if after is not None:
            await after(nc)
    finally:
        await nc.close()
    return time.monotonic()


def test_worker_killed_during_a_cold_activation(cluster):
    """The worker chosen for a scale-up dies while it loads the model (a 60 s load here): the orchestrator
    notices its heartbeat go stale, gives up on it and activates the model on another worker, so the
    requests waiting for that instance are served within about the heartbeat timeout, not after the
    activation's 120 s command timeout (nor refused once the gateway's 20 s queue wait runs out)."""
    env, url, key = cluster["env"], cluster["url"], cluster["key"]
    slow = spawn_worker(cluster["up"], "worker-slow", WARMSERVE_SIM_ENGINE_START_S="60")
    try:
        only_place_to_serve(env, "worker-slow")
        assert "active" not in workers(env)["worker-slow"].values()
        served: list = []
        waiters = [threading.Thread(target=plain, args=(url, key, served)) for _ in range(2)]

        def send():
            for t in waiters:
                t.start()

        async def undrain(nc):  # in process: two CLI processes could eat much of the 20 s queue wait
            for w in ("worker-0", "worker-1"):
                await AdminClient(nc).call("worker-undrain", {"worker_id": w}, timeout=15)

        asyncio.run(first_command(cluster["nats_url"], "worker-slow", "activate", send, timeout_s=30, after=undrain))
        assert not served, served  # nothing could serve them yet: the activation takes a minute
        slow.kill()
        killed = time.monotonic()
        for t in waiters:
            t.join(60)
        waited = time.monotonic() - killed
        assert [status for status, _ in served] == [200, 200], served
        assert waited < HEARTBEAT_TIMEOUT_S + 15, f"served {waited:.1f} s after the kill"
        assert any(m.get("tiny-llama") == "active" for w, m in workers(env).items() if w != "worker-slow")
    finally:
        slow.kill()
        slow.wait()
        for w in ("worker-0", "worker-1"):
            cli(env, "worker", "undrain", w)
