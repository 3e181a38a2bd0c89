"""Gateway process(es): uvicorn serving the app, with a shutdown that ends requests clearly.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits ``shutdown_grace_s`` for the
requests in flight; the gateway is told first, so it stops being ready at once and, just before the
grace is over, ends what is still running with a 503 or an error event instead of a cut connection.

uvicorn runs on uvloop with the httptools parser where they are installed (its "auto"), and without
an access log line per request unless ``WARMSERVE_ACCESS_LOG`` asks for one (docs/operations.md,
"Performance").

With ``WARMSERVE_GATEWAY_PROCESSES`` above 1 this process is only a supervisor (``Supervisor``): it
binds one listening socket per serving process with SO_REUSEPORT, so the kernel spreads connections
over them, creates the table of per-key limits they share (services/gateway/shared_limits.py) and
starts the serving processes. Each has its own gateway id (``<id>-<n>``: demand is counted per id).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import uvicorn

from shared.settings import GatewaySettings, load_settings
from shared.telemetry import configure_logging, setup_tracing

log = logging.getLogger("warmserve.gateway")
BACKLOG = 2048
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0  # a serving process that dies more often stops the gateway


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway):
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets=None) -> None:
        self.gateway.begin_drain()
        await super().shutdown(sockets)


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level)
    if args.serve is not None:  # one of a supervisor's serving processes
        serve(settings.model_copy(update={"gateway_id": f"{settings.gateway_id}-{args.serve}"}),
              sock=socket.socket(fileno=args.socket), limits=(args.limits, args.serve))
    elif processes(settings) > 1:
        raise SystemExit(Supervisor(settings, processes(settings)).run())
    else:
        serve(settings)


def serve(settings: GatewaySettings, sock: socket.socket | None = None,
          limits: tuple[int, int] | None = None) -> None:
    """Serve on ``sock`` (else bind ``host``:``port``); ``limits``: (descriptor, column) of the shared table."""
    from services.gateway.app import create_app  # here: the supervisor never loads the app

    setup_tracing("gateway", settings.otlp_endpoint)
    app = create_app(settings)
    gateway = app.state.gateway
    if limits is not None:
        share_limits(gateway, *limits)
    DrainingServer(server_config(app, settings), gateway).run(sockets=[sock] if sock is not None else None)


def share_limits(gateway, fd: int, index: int) -> None:
    """Count the gateway's per-key rate and concurrency in the host's shared table, as process ``index``."""
    from services.gateway.shared_limits import LimitTable, SharedKeySlots, SharedRates

    table = LimitTable(fd, index)
    table.reset_process()  # whatever a predecessor in this column held died with it
    gateway.key_slots = SharedKeySlots(gateway.settings.key_max_concurrency, table, time.monotonic,
                                       gateway.settings.gateways)
    gateway.rates = SharedRates(table)


def server_config(app, settings: GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                          timeout_graceful_shutdown=settings.shutdown_grace_s,
                          timeout_keep_alive=settings.keep_alive_s, access_log=settings.access_log,
                          backlog=BACKLOG)


def processes(settings: GatewaySettings) -> int:
    """Serving processes: the setting, 0 meaning one per core this process may run on. One where
    SO_REUSEPORT does not spread connections (outside Linux)."""
    n = settings.gateway_processes or len(os.sched_getaffinity(0))
    if n > 1 and not sys.platform.startswith("linux"):
        log.warning("WARMSERVE_GATEWAY_PROCESSES=%d needs Linux (SO_REUSEPORT balancing); serving with one", n)
        return 1
    return n


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.gateway", description="the HTTP gateway (settings: "
                                "WARMSERVE_* environment variables, docs/configuration.md)")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the supervisor's serving process number
    p.add_argument("--socket", type=int, help=argparse.SUPPRESS)  # its inherited listening socket
    p.add_argument("--limits", type=int, help=argparse.SUPPRESS)  # the inherited shared limits table
    return p.parse_args(argv)


# ---------------------------------------------------------------------- several processes


def listen_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` listening sockets on one port with SO_REUSEPORT (port 0: the first one's). The port is first
    bound without SO_REUSEPORT: a gateway (or anything) already there is an error, never a silent share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            s.listen(BACKLOG)
            s.set_inheritable(True)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


class Supervisor:
    """Starts ``n`` serving processes, each on its own SO_REUSEPORT socket, and keeps them running.

    It holds every socket for the whole run, so a serving process that dies is started again on the same
    socket and the connections the kernel queued there meanwhile are served, not reset. SIGTERM or SIGINT:
    the sockets are closed (new connections go elsewhere, as with one process) and every serving process
    drains as a single gateway does; it exits when they have. A process dying more than ``MAX_RESTARTS``
    times in ``RESTART_WINDOW_S`` stops the gateway (exit 1), for the outer supervisor to see."""

    def __init__(self, settings: GatewaySettings, n: int):
        self.settings, self.n = settings, n
        self.procs: dict[int, subprocess.Popen] = {}
        self.restarts: dict[int, list[float]] = {}
        self.stopping = False

    def run(self) -> int:
        from services.gateway.shared_limits import create_table_fd

        try:
            self.socks = listen_sockets(self.settings.host, self.settings.port, self.n)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", self.settings.host, self.settings.port, exc)
            return 1
        self.table_fd = create_table_fd(self.n)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        log.info("gateway on %s:%d with %d processes", self.settings.host, self.socks[0].getsockname()[1], self.n)
        for i in range(self.n):
            self._start(i)
        code = 0
        while self.procs:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:  # none left (not expected: every one is in self.procs)
                break
            i = next((i for i, p in self.procs.items() if p.pid == pid), None)
            if i is None:
                continue
            proc = self.procs.pop(i)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            now = time.monotonic()
            recent = [t for t in self.restarts.get(i, []) if now - t < RESTART_WINDOW_S]
            if len(recent) >= MAX_RESTARTS:
                log.error("gateway process %d keeps dying (exit %s); stopping the gateway", i, proc.returncode)
                code = 1
                self._stop()
                continue
            self.restarts[i] = recent + [now]
            log.warning("gateway process %d exited (code %s); starting it again", i, proc.returncode)
            self._start(i)
        return code

    def _start(self, i: int) -> None:
        sock = self.socks[i]
        args = [sys.executable, "-m", "services.gateway", "--serve", str(i), "--socket", str(sock.fileno()),
                "--limits", str(self.table_fd)]
        self.procs[i] = subprocess.Popen(args, pass_fds=(sock.fileno(), self.table_fd), start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def _stop(self, *_signal) -> None:
        if self.stopping:
            return
        self.stopping = True
        for s in self.socks:
            s.close()
        for p in self.procs.values():  # os.kill, not send_signal: its poll() would reap what run() waits for
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # already gone: run() reaps it


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, however it dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the supervisor's own SIGTERM handling still stops the children


if __name__ == "__main__":
    main()
