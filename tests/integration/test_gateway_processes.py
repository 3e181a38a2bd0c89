"""The gateway as several processes on one port (WARMSERVE_GATEWAY_PROCESSES=2), as `python -m
services.gateway` runs it: both serve, each key's limits hold for the host, a process that dies is started
again, and SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from shared.apikeys import hash_key, new_key
from shared.messages import ApiKeyRecord, InferChunk, InferRequest, Usage
from shared.subjects import INFER
from tests.helpers import eventually, seed_serving
from tooling.localcluster.processes import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
MODEL, WORKER = "procs-m", "procs-worker"
WIDE, TWO, SLOW = new_key(), new_key(), new_key()  # no tight limit; 2 in flight; 0.01 requests/s


class HoldingWorker:
    """An active instance of MODEL: a request whose prompt is ``hold`` gets one chunk, then the rest once
    ``release`` is set; any other is answered at once."""

    def __init__(self, nc):
        self.nc, self.release, self.tasks = nc, asyncio.Event(), set()

    async def on_infer(self, msg) -> None:
        task = asyncio.create_task(self.answer(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, msg) -> None:
        req = InferRequest.decode(msg.data)
        send = lambda **kw: self.nc.publish(msg.reply, InferChunk(request_id=req.request_id, **kw).encode())  # noqa: E731
        await send(seq=0, text="a")
        if req.messages[-1].content == "hold":
            await self.release.wait()
        await send(seq=1, text="b", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=2))


@pytest.fixture
async def gateway(nats_urls, nc, tmp_path):
    catalog, workers, keys = await seed_serving(nc.jetstream(), MODEL, WORKER, "procs-i", batch_capacity=64)
    await keys.put(hash_key(WIDE), ApiKeyRecord(id="procs-wide", name="wide", max_concurrency=64,
                                                 rate_limit_rps=1000).encode())
    await keys.put(hash_key(TWO), ApiKeyRecord(id="procs-two", name="two", max_concurrency=2,
                                                rate_limit_rps=1000).encode())
    await keys.put(hash_key(SLOW), ApiKeyRecord(id="procs-slow", name="slow", rate_limit_rps=0.01).encode())
    worker = HoldingWorker(nc)
    sub = await nc.subscribe(INFER.format(worker=WORKER), cb=worker.on_infer)

    port = free_port()
    env = dict(os.environ, WARMSERVE_NATS_URL=nats_urls["gateway"], WARMSERVE_PORT=str(port),
               WARMSERVE_HOST="127.0.0.1", WARMSERVE_GATEWAY_PROCESSES="2", WARMSERVE_GATEWAY_ID="gw-procs",
               WARMSERVE_HEARTBEAT_TIMEOUT_S="3600", WARMSERVE_QUEUE_WAIT_S="2", WARMSERVE_SHUTDOWN_GRACE_S="2")
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:  # a file, not a pipe nobody reads: a full pipe would block the logging
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        await eventually(lambda: _ready(url), what="the gateway's processes to be ready")
        yield url, proc, worker
    finally:
        worker.release.set()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        await sub.unsubscribe()
        await catalog.delete(MODEL)
        await workers.delete(WORKER)
        for k in (WIDE, TWO, SLOW):
            await keys.delete(hash_key(k))


async def _ready(url: str) -> bool:
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as http:
            return (await http.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


def chat(content: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": True}


def serving(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children()


async def hold(url: str, key: str, clients: list[httpx.AsyncClient], opened: list) -> int:
    """Start a held stream on a connection of its own; its status (200: it is in flight)."""
    http = httpx.AsyncClient(base_url=url, timeout=10, headers={"Authorization": f"Bearer {key}"},
                             limits=httpx.Limits(max_connections=1))
    clients.append(http)
    stream = http.stream("POST", "/v1/chat/completions", json=chat("hold"))
    resp = await stream.__aenter__()
    lines = resp.aiter_lines()
    opened.append((stream, lines))  # kept: a line iterator garbage-collected closes its connection
    if resp.status_code == 200:
        async for line in lines:
            if line.startswith("data: "):
                break
    return resp.status_code


async def close_all(clients, opened) -> None:
    for stream, lines in opened:
        await lines.aclose()
        await stream.__aexit__(None, None, None)
    for c in clients:
        await c.aclose()


async def test_both_processes_serve_on_one_port(gateway):
    url, proc, worker = gateway
    children = serving(proc)
    assert len(children) == 2
    clients, opened = [], []
    try:
        statuses = await asyncio.gather(*(hold(url, WIDE, clients, opened) for _ in range(24)))
        assert statuses == [200] * 24
        port = int(url.rsplit(":", 1)[1])
        # 24 connections spread by the kernel: each process holds some (all on one: 2 in 2^23)
        per_process = [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                           for c in child.net_connections("tcp")) for child in children]
        assert all(n > 0 for n in per_process) and sum(per_process) == 24, (per_process, children)
    finally:
        worker.release.set()
        await close_all(clients, opened)


async def test_a_keys_concurrency_limit_holds_for_the_host(gateway):
    url, _, worker = gateway
    clients, opened = [], []
    try:
        statuses = await asyncio.gather(*(hold(url, TWO, clients, opened) for _ in range(10)))
        assert sorted(statuses) == [200, 200] + [429] * 8  # two in flight on the host, not two per process
        worker.release.set()
        await close_all(clients, opened)
        clients, opened = [], []
        worker.release.clear()
        async def slots_back() -> bool:  # both slots were given back: two fit again, a third does not
            statuses = await asyncio.gather(*(hold(url, TWO, clients, opened) for _ in range(3)))
            return sorted(statuses) == [200, 200, 429]
        assert await slots_back()
    finally:
        worker.release.set()
        await close_all(clients, opened)


async def test_a_keys_rate_limit_holds_for_the_host(gateway):
    url, _, _ = gateway

    async def one() -> int:  # a connection of its own each, so the kernel spreads them over both processes
        async with httpx.AsyncClient(base_url=url, timeout=10, headers={"Authorization": f"Bearer {SLOW}"}) as http:
            return (await http.post("/v1/chat/completions", json=chat("now") | {"stream": False})).status_code

    statuses = await asyncio.gather(*(one() for _ in range(12)))
    assert sorted(statuses) == [200] + [429] * 11  # a burst of one for the host (per process: up to two)


async def test_a_process_that_dies_is_started_again_and_sigterm_stops_all(gateway):
    url, proc, _ = gateway
    first = serving(proc)
    first[0].kill()
    await eventually(lambda: len(serving(proc)) == 2 and first[0].pid not in {c.pid for c in serving(proc)},
                     what="the dead process to be replaced")
    await eventually(lambda: _all_ready(url), what="the gateway to serve again")
    children = serving(proc)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


async def _all_ready(url: str) -> bool:
    return all(await asyncio.gather(*(_ready(url) for _ in range(8))))
