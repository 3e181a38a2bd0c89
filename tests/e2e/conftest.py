"""Starting the local cluster the way a user does: `warmserve up` in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tooling.localcluster.infra import StartError
from tooling.localcluster.launch import ROOT, Launched, launch

__all__ = ["ROOT", "cli", "start_cluster", "until"]


def cli(env, *args, timeout=120) -> subprocess.CompletedProcess:
    """The ``warmserve`` command line, as an operator runs it against the cluster in ``env``."""
    return subprocess.run([sys.executable, "-m", "tooling.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def until(check, timeout=60.0, every=0.5, what=""):
    """Wait for ``check()`` to return something true, and return it; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s: {what}")


def start_cluster(state: Path, *args: str, extra_env: dict[str, str] | None = None,
                  timeout_s: float = 240) -> Launched:
    """Run `warmserve up` with its state in ``state`` on free ports; returns once it says it is up.
    Fails the test otherwise."""
    try:
        return launch(state, *args, extra_env=extra_env, timeout_s=timeout_s)
    except StartError as exc:
        pytest.fail(str(exc))
