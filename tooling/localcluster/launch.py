"""Running ``warmserve up`` as a child process, the way a user does, and waiting until it says it is up.

The end-to-end tests and the load test share this: each gets a cluster of its own (state folder, free
ports, embedded NATS and Postgres) and stops it with SIGINT, as Ctrl-C would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tooling.localcluster.infra import StartError
from tooling.localcluster.processes import die_with_parent, free_port

ROOT = Path(__file__).parents[2]


@dataclass
class Launched:
    proc: subprocess.Popen
    output: str  # what `warmserve up` printed until it was up
    env: dict[str, str]  # its environment: CLI calls with it reach this cluster
    port: int  # the gateway's
    later: deque = field(default_factory=lambda: deque(maxlen=500))  # its output since (restarts, errors)
    reader: threading.Thread | None = None

    @property
    def info(self) -> dict:
        """cluster.json: gateway_url, nats_url (operator credentials), database_url, api_key."""
        return json.loads((Path(self.env["WARMSERVE_STATE_DIR"]) / "cluster.json").read_text())

    def stop(self, timeout_s: float = 60.0) -> str:
        """Ctrl-C, as a user would (SIGKILL if it does not stop in time); returns what it printed since it
        was up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reader is not None:
            self.reader.join(10)
        return "".join(self.later)


def launch(state: Path, *args: str, extra_env: dict[str, str] | None = None, timeout_s: float = 240,
           echo: bool = False) -> Launched:
    """``warmserve up ARGS`` with its state in ``state``, on free ports and with embedded NATS and Postgres;
    returns once it prints that it is up. ``echo`` shows its progress lines. Raises StartError otherwise."""
    port = free_port()
    env = dict(os.environ, WARMSERVE_STATE_DIR=str(state), WARMSERVE_GATEWAY_PORT=str(port), WARMSERVE_NATS_PORT="0",
               **(extra_env or {}))
    for k in ("WARMSERVE_NATS_URL", "WARMSERVE_DATABASE_URL"):  # embedded servers, not the machine's
        env.pop(k, None)
    # it gets SIGTERM (and stops its cluster) if the caller dies, however it dies
    proc = subprocess.Popen([sys.executable, "-m", "tooling.cli.main", "up", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, preexec_fn=die_with_parent)
    out: list[str] = []
    timer = _kill_after(proc, timeout_s)
    try:
        for line in proc.stdout:
            out.append(line)
            if echo:
                print(f"  | {line}", end="", flush=True)
            if line.startswith("Try:"):
                break
    finally:
        timer.cancel()
    text = "".join(out)
    if "WarmServe is up" not in text:
        Launched(proc, text, env, port).stop(timeout_s=30)  # Ctrl-C first: it stops what it started
        raise StartError(f"warmserve up did not come up within {timeout_s:.0f} s:\n{text}")
    launched = Launched(proc, text, env, port)
    # keep reading what it prints, so a full pipe never blocks it
    launched.reader = threading.Thread(target=lambda: launched.later.extend(proc.stdout), daemon=True)
    launched.reader.start()
    return launched


def _kill_after(proc: subprocess.Popen, timeout_s: float):
    """A start-up that hangs without printing must not hang the caller: kill it at the deadline."""
    timer = threading.Timer(timeout_s, lambda: proc.poll() is None and proc.kill())
    timer.daemon = True
    timer.start()
    return timer
