"""The multi-node bed (tests/multinode/bed.py), once per module, with the test thread inside the client node."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.multinode import netns

pytestmark = pytest.mark.multinode
WHY_NOT = netns.available()
PACE_S = 0.1  # between one client's requests: well below each gateway's per-key rate limit


@pytest.fixture(scope="module")
def bed(postgres_server, tiny_model):
    if WHY_NOT is not None:
        pytest.skip(f"MULTI-NODE TESTS SKIPPED: cannot create network namespaces here: {WHY_NOT}")
    from sqlalchemy import create_engine as sync_engine
    from sqlalchemy import text

    from shared.db.migrate import upgrade
    from tests.multinode.bed import Bed
    from tooling.localcluster.up import DEMO_MODEL, local_api_key

    name = f"multinode_{os.getpid()}"
    admin = sync_engine(postgres_server.replace("postgresql://", "postgresql+psycopg://", 1),
                        isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_server.replace("/postgres?", f"/{name}?", 1)
    upgrade(url)
    asyncio.run(_register(url, DEMO_MODEL, tiny_model))
    root = Path(tempfile.mkdtemp(prefix="warmserve-multinode-"))
    b = Bed(root, url)
    try:
        with netns.inside(b.node("client").ns):
            b.start_all()
            b.api_key = asyncio.run(local_api_key(b.nats.urls()))
            b.model = DEMO_MODEL
            yield b
    finally:
        b.stop()
        admin.dispose()
        if os.environ.get("WARMSERVE_KEEP_BED") is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"multi-node bed kept in {root}")


async def _register(url: str, slug: str, path: Path) -> None:
    from shared.db import repo
    from shared.db.engine import create_engine, sessionmaker
    from shared.messages import ModelSpec
    from shared.model_folder import max_context, weight_bytes

    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as s:
            await repo.upsert_model(s, ModelSpec(slug=slug, path=str(path), parameter_bytes=weight_bytes(path),
                                                 max_context_tokens=max_context(path)))
            await s.commit()
    finally:
        await engine.dispose()


@pytest.fixture
def client_ns(bed):
    """The test body runs inside the client node (each test's own thread state is restored after)."""
    with netns.inside(bed.node("client").ns):
        yield bed


def until(check, timeout: float, what: str, every: float = 0.2):
    """Poll ``check`` until it returns something truthy. While NATS fails over, a read may time out: that
    counts as not yet (the last such error is named if time runs out)."""
    deadline = time.monotonic() + timeout
    error = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except AssertionError:
            raise
        except Exception as exc:
            error, value = exc, None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                         + (f" (last error: {error!r})" if error else ""))


def connz(bed, i: int) -> list[str]:
    """Names of the client connections nats-server ``i`` holds (its monitoring endpoint)."""
    s = bed.nats.servers[i]
    with urllib.request.urlopen(f"http://{s.host}:{s.http_port}/connz?limit=1000", timeout=2) as r:
        return [c.get("name", "") for c in json.load(r).get("connections", [])]


class Load:
    """Chat requests from a few client threads, round-robin over the gateways given, counted by outcome."""

    def __init__(self, bed, gateways: list[str], clients: int = 3):
        self.bed, self.gateways, self.clients = bed, gateways, clients
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> "Load":
        ns = self.bed.node("client").ns
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i, ns), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, i: int, ns: str) -> None:
        import openai

        with netns.inside(ns):
            clients = [openai.OpenAI(base_url=f"{self.bed.gateway_url(g)}/v1", api_key=self.bed.api_key,
                                     max_retries=0, timeout=30) for g in self.gateways]
            k = i
            while not self._stop.is_set():
                client = clients[k % len(clients)]
                k += 1
                try:
                    r = client.chat.completions.create(model=self.bed.model, max_tokens=8,
                                                       messages=[{"role": "user", "content": "hi"}])
                    assert r.choices[0].message.content is not None
                    with self._lock:
                        self.ok += 1
                    time.sleep(PACE_S)
                except Exception as exc:  # counted: the test decides which errors are allowed
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    time.sleep(0.2)

    def take(self) -> tuple[int, list[str]]:
        with self._lock:
            ok, errors = self.ok, list(self.errors)
            self.ok, self.errors = 0, []
        return ok, errors

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40)
