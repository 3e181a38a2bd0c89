"""Starting the local cluster the way a user does: `warmserve up` in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.localcluster.processes import free_port

ROOT = Path(__file__).parents[2]


def start_cluster(state: Path, *args: str, extra_env: dict[str, str] | None = None,
                  timeout_s: float = 240) -> tuple[subprocess.Popen, str, dict[str, str], int]:
    """Run `warmserve up` with its state in ``state`` on free ports; returns once it says it is up
    (process, its output so far, its environment, the gateway port). Fails the test otherwise."""
    port = free_port()
    env = dict(os.environ, WARMSERVE_STATE_DIR=str(state), WARMSERVE_GATEWAY_PORT=str(port), WARMSERVE_NATS_PORT="0",
               **(extra_env or {}))
    for k in ("WARMSERVE_NATS_URL", "WARMSERVE_DATABASE_URL"):  # embedded servers, not the machine's
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli.main", "up", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        out.append(line)
        if line.startswith("Try:"):
            break
    text = "".join(out)
    if "WarmServe is up" not in text:
        proc.kill()
        pytest.fail(f"warmserve up did not come up:\n{text}")
    return proc, text, env, port
