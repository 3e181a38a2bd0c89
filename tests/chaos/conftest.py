"""Fault injection against a real local cluster (`warmserve up` with sim workers): processes are killed,
stopped and restarted, and clients must see every request answered or clearly refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from tooling.localcluster.launch import ROOT, Launched
from tooling.localcluster.processes import die_with_parent, free_port
from tests.e2e.conftest import cli, start_cluster, until

__all__ = ["ROOT", "Load", "cli", "ended_with_error", "service_process", "spawn_worker", "stream", "until",
           "workers"]






def gateway_gauge(url: str, name: str, model: str = "tiny-llama") -> float:
    """A per-model gauge from the gateway's /metrics (0 when it has no sample yet)."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def workers(env) -> dict[str, dict[str, str]]:
    """Live workers and what each holds: {worker_id: {model: state}}."""
    out = cli(env, "workers", "--json")
    assert out.returncode == 0, out.stderr
    return {w["worker_id"]: {c["model"]: c["state"] for c in w["copies"]} for w in json.loads(out.stdout)}


def service_process(up: Launched, module: str, worker_id: str | None = None) -> psutil.Process:
    """The live process of one service (``services.<module>``) that `warmserve up` supervises."""
    for p in psutil.Process(up.proc.pid).children(recursive=True):
        try:
            if f"services.{module}" in " ".join(p.cmdline()) and (
                    worker_id is None or p.environ().get("WARMSERVE_WORKER_ID") == worker_id):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no live services.{module} process ({worker_id or ''})")


def spawn_worker(up: Launched, worker_id: str, **env: str) -> subprocess.Popen:
    """A worker outside the supervisor (nothing restarts it): its death is final, as a lost machine's.
    It joins with its own NATS user, added to the running nats-server (``infra.add_worker``)."""
    from tooling.localcluster.infra import add_worker

    base = service_process(up, "gpu_worker", "worker-0").environ()  # the same settings
    url = add_worker(Path(up.env["WARMSERVE_STATE_DIR"]), worker_id)
    wenv = dict(base, WARMSERVE_WORKER_ID=worker_id, WARMSERVE_DEVICE="cpu:9", WARMSERVE_NATS_URL=url,
                WARMSERVE_METRICS_PORT=str(free_port()), **env)  # worker-0's port is taken: one per process
    with open(Path(up.env["WARMSERVE_STATE_DIR"]) / "logs" / f"{worker_id}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "services.gpu_worker"], env=wenv, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=die_with_parent)


def stream(url: str, key: str, out: dict, max_tokens: int = 2000) -> None:
    """A long streamed chat completion; records each data line with its arrival time."""
    out["lines"] = []
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["lines"].append((time.monotonic(), line[6:]))
    except httpx.HTTPError as exc:
        out["exc"] = repr(exc)


def ended_with_error(out: dict) -> dict:
    data = [d for _, d in out["lines"]]
    assert data and data[-1] == "[DONE]", data[-3:]
    return json.loads(data[-2])["error"]


@dataclass
class Load:
    """Clients sending requests one after another until stopped; every request ends ok, with a clear
    error (an HTTP error whose body is an OpenAI error), refused (no gateway listening) or lost (no answer)."""

    url: str
    key: str
    model: str = "tiny-llama"
    clients: int = 2
    retries: int = 0
    pause_s: float = 0.1  # between one client's requests: steady load, not a benchmark
    ends: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for _ in range(self.clients):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self) -> None:
        client = OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=self.retries, timeout=30)
        while not self._stop.is_set():
            try:
                r = client.chat.completions.create(model=self.model, max_tokens=4,
                                                   messages=[{"role": "user", "content": "hi"}])
                self.ends["ok" if r.choices[0].message.content is not None else "empty"] += 1
                time.sleep(self.pause_s)
            except openai.APIStatusError as exc:
                clear = isinstance(exc.body, dict) and "message" in exc.body
                self.ends["error" if clear else "lost"] += 1
                self.errors.append(f"{exc.status_code} {exc.message}"[:200])
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                # refused: nothing listened, the request was never accepted (the client knows at once);
                # lost: accepted and then no answer (reset mid-request, timed out)
                refused = type(exc.__cause__).__name__ == "ConnectError"  # the openai client's own httpx build
                self.ends["refused" if refused else "lost"] += 1
                self.errors.append(f"{exc.__class__.__name__}: {exc.__cause__!r}"[:200])
                time.sleep(0.2)

    def take(self) -> Counter:
        """Counts since the last take."""
        out, self.ends = self.ends, Counter()
        return out

    def stop(self) -> Counter:
        self._stop.set()
        for t in self._threads:
            t.join(40)
        return self.ends


GATEWAY_GRACE_S = 2  # the gateway's shutdown grace: shorter than the long requests the tests send


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two supervised sim workers, one request per instance (so requests queue), quick failure detection."""
    state = tmp_path_factory.mktemp("chaos")
    up = start_cluster(state, "--engine", "sim", "--workers", "2", "--no-smoke", timeout_s=180, extra_env={
        "WARMSERVE_BATCH_CAPACITY": "1", "WARMSERVE_HEARTBEAT_TIMEOUT_S": "3", "WARMSERVE_QUEUE_WAIT_S": "20",
        "WARMSERVE_INTER_TOKEN_TIMEOUT_S": "5", "WARMSERVE_WINDOW_S": "10", "WARMSERVE_REPLAN_INTERVAL_S": "1",
        "WARMSERVE_MIN_INSTANCE_LIFETIME_S": "600", "WARMSERVE_RATE_LIMIT_RPS": "1000",
        "WARMSERVE_SHUTDOWN_GRACE_S": str(GATEWAY_GRACE_S),
        # forecasting is not under test here: the statsforecast models' first fit (numba compilation) takes
        # a minute on two busy cores and would hold the forecaster's history writes behind it
        "WARMSERVE_FORECAST_METHODS": "naive"})  # instances stay until a test stops them
    info = up.info
    handle = {"up": up, "env": up.env, "state": state, "url": info["gateway_url"], "key": info["api_key"],
              "nats_url": info["nats_url"], "database_url": info["database_url"], "extra_procs": [],
              "client": OpenAI(base_url=f"{info['gateway_url']}/v1", api_key=info["api_key"], max_retries=0,
                               timeout=60)}
    yield handle
    up.stop()
    for p in handle["extra_procs"]:  # servers a test restarted outside the supervisor
        p.terminate()
        p.wait(15)


def pg_data(state: Path) -> Path:
    return state / "postgres" / "data"


def stop_postgres(state: Path) -> None:
    pid = int((pg_data(state) / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)  # fast shutdown: what a crash or an operator's stop looks like to clients
    until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
          timeout=30, what="postgres stopped")
