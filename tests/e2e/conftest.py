"""Starting the local cluster the way a user does: `warmserve up` in a process of its own."""

from __future__ import annotations

import asyncio
import json
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


def worker_copies(env) -> list[dict]:
    """Every copy and instance on every worker, as ``warmserve workers --json`` lists them."""
    out = cli(env, "workers", "--json")
    assert out.returncode == 0, out.stderr
    return [c for w in json.loads(out.stdout) for c in w["copies"]]


def copy_states(env) -> dict[str, str]:
    """Model -> the state of its copy (one worker)."""
    return {c["model"]: c["state"] for c in worker_copies(env)}


def stream_chat(client, model: str, max_tokens: int) -> tuple[int, str | None, float | None, float]:
    """One streamed chat completion read to its end: (chunks with text, finish reason, first text at, ended
    at), times on the monotonic clock."""
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "go"}],
                                            max_tokens=max_tokens, stream=True)
    pieces, finish, first = 0, None, None
    for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].delta.content:
                pieces += 1
                first = first or time.monotonic()
            finish = chunk.choices[0].finish_reason or finish
    return pieces, finish, first, time.monotonic()


def query(database_url: str, sql: str) -> list:
    """Rows of one SQL statement on the cluster's Postgres, as an operator would look."""
    from sqlalchemy import text

    from shared.db.engine import create_engine, sessionmaker

    async def run():
        engine = create_engine(database_url)
        try:
            async with sessionmaker(engine)() as s:
                return (await s.execute(text(sql))).all()
        finally:
            await engine.dispose()
    return asyncio.run(run())


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
