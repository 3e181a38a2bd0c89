"""Every dashboard panel's query returns data from a real Prometheus (Debian's package, unpacked into .venv by
./dev test) scraping a local sim cluster under load: `warmserve up` writes the cluster's scrape targets
(prometheus-targets.json) and every service serves /metrics."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import start_cluster, until
from tests.unit.test_dashboards import queries
from tooling.localcluster.processes import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

ROOT = Path(__file__).parents[2]
# the test runs for minutes: a range over all of it, so a command sent once at the start still has a rate
VARIABLES = {"$__rate_interval": "5m", "$model": ".*", "$worker": ".*"}


def prometheus_binary() -> str:
    venv = ROOT / ".venv" / "prometheus" / "usr" / "bin" / "prometheus"
    found = str(venv) if venv.exists() else shutil.which("prometheus")
    if found is None:
        if shutil.which("apt-get"):  # Debian: ./dev test unpacks the package; a missing one is a setup failure
            pytest.fail("no prometheus: ./dev test unpacks Debian's prometheus package into .venv/prometheus")
        pytest.skip("no prometheus on this machine (Debian's package, or any on PATH)")
    return found


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced as the dashboard's 'All' would."""
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def has_data(prom: str, expr: str) -> bool:
    """The query returns at least one finite sample now (NaN: a quantile of nothing, not data)."""
    if expr.startswith("label_values("):  # a Grafana variable: the metric has series with that label
        metric, label = expr[len("label_values("):-1].split(", ")
        expr = f"count by ({label}) ({metric})"
    reply = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return any(math.isfinite(float(r["value"][1])) for r in reply["data"]["result"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("dashboards")
    up = start_cluster(state, "--engine", "sim", "--workers", "2", "--no-smoke", timeout_s=180,
                       extra_env={"WARMSERVE_WINDOW_S": "10"})  # forecast windows close (and are scored) within the test
    yield up, state
    up.stop()


def test_every_panel_query_returns_data_from_prometheus(cluster, tmp_path):
    up, state = cluster
    targets = json.loads((state / "prometheus-targets.json").read_text())
    assert {t["labels"]["service"] for t in targets} == {"gateway", "placement", "prewarm-orchestrator",
                                                         "forecaster", "gpu-worker"}
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: warmserve\n"
                      f"    file_sd_configs: [{{files: ['{state / 'prometheus-targets.json'}']}}]\n")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    served: list[str] = []

    def load() -> None:  # a steady trickle of streamed chat requests, as a client would send
        client = OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key=up.info["api_key"], max_retries=0,
                        timeout=30)
        while not stop.is_set():
            try:
                stream = client.chat.completions.create(model="tiny-llama", max_tokens=8, stream=True,
                                                        messages=[{"role": "user", "content": "hello"}])
                served.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
            except Exception as exc:  # counted by the gateway as an error: what the error panels show
                served.append(f"error: {exc}")
            stop.wait(0.2)

    loader = threading.Thread(target=load, daemon=True)
    try:
        def scraping_all() -> bool:
            try:
                active = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            except httpx.HTTPError:
                return False
            return len(active) == len(targets) and all(t["health"] == "up" for t in active)
        until(scraping_all, timeout=60, every=1, what="Prometheus scraping every service (all targets up)")
        loader.start()  # after the first scrapes: the activations the load causes show as rates
        pending = {(uid, panel, expr) for uid, panel, expr in queries()}

        def all_answered() -> bool:
            for q in list(pending):
                if has_data(prom, concrete(q[2])):
                    pending.discard(q)
            return not pending
        try:
            until(all_answered, timeout=240, every=5, what="data for every panel query")
        except AssertionError:
            raise AssertionError(f"panels without data after {len(served)} requests: "
                                 + "; ".join(f"{uid} / {panel}: {concrete(expr)}" for uid, panel, expr in sorted(pending)))
        assert served and not all(s.startswith("error") for s in served)
    finally:
        stop.set()
        loader.join(40) if loader.is_alive() else None
        proc.terminate()
        proc.wait(20)
        log.close()
