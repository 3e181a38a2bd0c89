"""The Grafana dashboards (tooling/dashboards.py -> infra/grafana/dashboards/*.json): the committed JSON is what
the code builds, every query names only metrics the services export, and the compose stack's Prometheus and
Grafana configuration is valid and points at them. tests/e2e/test_dashboards_prometheus.py runs every query
against a real Prometheus scraping a local cluster."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tooling import dashboards

ROOT = Path(__file__).parents[2]
METRIC = re.compile(r"warmserve:[A-Za-z0-9_:]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def exported() -> set[str]:
    """The metric families every WarmServe process exports (each service's modules register theirs)."""
    import services.forecaster.metrics  # noqa: F401
    import services.gpu_worker.metrics  # noqa: F401
    import services.placement.metrics  # noqa: F401
    import services.prewarm_orchestrator.metrics  # noqa: F401
    from services.gateway.metrics import GatewayMetrics
    from shared.metrics import REGISTRY

    return {m.name for registry in (REGISTRY, GatewayMetrics().registry) for m in registry.collect()}


def family(name: str, known: set[str]) -> str | None:
    """The exported family a series name in a query belongs to (``_bucket`` of a histogram, ``_total`` of a
    counter), or None."""
    if name in known:
        return name
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return None


def queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, expression) of every target and variable in the built dashboards."""
    out = []
    for d in dashboards.DASHBOARDS:
        built = dashboards.to_json(d)
        out += [(d.uid, p["title"], t["expr"]) for p in built["panels"] for t in p["targets"]]
        out += [(d.uid, f"${v['name']}", v["definition"]) for v in built["templating"]["list"]]
    return out


def test_the_committed_dashboards_are_what_the_code_builds(tmp_path):
    dashboards.main([str(tmp_path)])
    for d in dashboards.DASHBOARDS:
        committed = dashboards.OUT / f"{d.uid}.json"
        assert committed.read_text() == (tmp_path / f"{d.uid}.json").read_text(), \
            f"{committed} is stale: run python -m tooling.dashboards"


def test_every_query_names_only_exported_metrics():
    known = exported()
    assert {"warmserve:worker_memory_bytes", "warmserve:requests", "warmserve:forecast_load"} <= known
    missing = [(uid, panel, name) for uid, panel, expr in queries() for name in METRIC.findall(expr)
               if family(name, known) is None]
    assert not missing, missing
    assert all(METRIC.search(expr) for _, _, expr in queries())


def test_a_query_naming_an_unknown_metric_is_caught():
    known = exported()
    assert family("warmserve:time_to_first_token_seconds_bucket", known) == "warmserve:time_to_first_token_seconds"
    assert family("warmserve:requests_total", known) == "warmserve:requests"
    assert family("warmserve:ttft_seconds_bucket", known) is None  # the old name is gone


def test_every_panel_has_a_unique_id_and_a_query():
    for d in dashboards.DASHBOARDS:
        built = json.loads(dashboards.render(d))
        ids = [p["id"] for p in built["panels"]]
        assert len(ids) == len(set(ids)) and all(p["targets"] for p in built["panels"]), d.uid
        assert all(t["datasource"]["uid"] == "prometheus" for p in built["panels"] for t in p["targets"])


def _promtool() -> str | None:
    venv = ROOT / ".venv" / "prometheus" / "usr" / "bin" / "promtool"
    return str(venv) if venv.exists() else shutil.which("promtool")


def test_the_compose_stack_provisions_prometheus_and_grafana():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert compose[name]["profiles"] == ["monitoring"]
        assert all(p.startswith("127.0.0.1:") for p in compose[name]["ports"]), "loopback only"
    assert "${WARMSERVE_GRAFANA_ADMIN_PASSWORD:?" in compose["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in compose["grafana"]["volumes"]}
    assert mounts["./infra/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    provider = yaml.safe_load((ROOT / "infra/grafana/provisioning/dashboards/warmserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((ROOT / "infra/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == dashboards.DATASOURCE["uid"]
    # every service with a metrics port in compose is scraped by the compose Prometheus
    prom = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    scraped = {t.split(":")[0] for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert scraped == {"gateway", "placement", "prewarm-orchestrator", "forecaster", "gpu-worker"}
    promtool = _promtool()
    if promtool is None:
        pytest.skip("no promtool (./dev test unpacks Debian's prometheus package into .venv/prometheus)")
    check = subprocess.run([promtool, "check", "config", str(ROOT / "infra/prometheus/prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_metrics_keep_their_colons_whatever_the_scraper_accepts():
    """Prometheus asks for OpenMetrics first, in which prometheus_client escapes ':' to '_': a service serving
    that had every dashboard query find nothing."""
    from wsgiref.util import setup_testing_defaults

    from shared import metrics

    metrics.LEADER.labels("placement").set(1)
    environ = {"PATH_INFO": "/metrics",
               "HTTP_ACCEPT": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"}
    setup_testing_defaults(environ)
    got = {}
    body = b"".join(metrics.health_app(lambda: (True, {}))(environ, lambda status, headers: got.update(
        status=status, headers=dict(headers))))
    assert got["status"] == "200 OK" and got["headers"]["Content-Type"].startswith("text/plain")
    assert b'warmserve:leader{role="placement"} 1.0' in body
