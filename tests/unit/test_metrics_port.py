"""WARMSERVE_METRICS_PORT is one port per process: every service but the gateway (which serves /metrics on its
HTTP port) serves it, and `warmserve up`, which runs them all on one host, gives each its own (with one port for
every process, all but the first exited 'cannot serve metrics', were restarted, and stopped the cluster)."""

from collections import defaultdict

from shared.settings import (ForecasterSettings, GatewaySettings, LocalClusterSettings, OrchestratorSettings,
                             PlacementSettings, WorkerSettings)


def test_every_service_but_the_gateway_has_a_metrics_port(monkeypatch):
    monkeypatch.setenv("WARMSERVE_METRICS_PORT", "9100")
    for cls in (PlacementSettings, OrchestratorSettings, ForecasterSettings, WorkerSettings):
        assert cls().metrics_port == 9100, cls
    assert "metrics_port" not in GatewaySettings.model_fields


def _cluster(tmp_path, **settings):
    from tooling.localcluster.up import Cluster

    cluster = Cluster(LocalClusterSettings(state_dir=tmp_path, workers=2, **settings), tmp_path)
    cluster.nats_urls = defaultdict(lambda: "nats://127.0.0.1:4222")
    cluster.start = lambda name: None  # record the commands, start nothing
    cluster.start_services()
    return cluster


def _ports(cluster) -> dict[str, str | None]:
    return {name: env.get("WARMSERVE_METRICS_PORT") for name, (_, env) in cluster.commands.items()}


def test_warmserve_up_gives_each_process_its_own_metrics_port_from_the_base(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSERVE_METRICS_PORT", "9100")
    cluster = _cluster(tmp_path)
    assert _ports(cluster) == {"placement": "9100", "prewarm_orchestrator": "9101", "forecaster": "9102",
                               "gpu_worker-0": "9103", "gpu_worker-1": "9104", "gateway": None}
    targets = {t["targets"][0]: t["labels"] for t in cluster.prometheus_targets()}
    assert targets["127.0.0.1:9103"] == {"service": "gpu-worker", "worker": "worker-0"}
    assert targets["127.0.0.1:9101"] == {"service": "prewarm-orchestrator"}
    assert targets[f"127.0.0.1:{cluster.settings.gateway_port}"] == {"service": "gateway"}
    assert cluster.metrics_urls()["forecaster"] == "http://127.0.0.1:9102/metrics"


def test_warmserve_up_without_a_metrics_port_picks_free_distinct_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("WARMSERVE_METRICS_PORT", raising=False)
    ports = _ports(_cluster(tmp_path))
    assert ports.pop("gateway") is None
    assert len(ports) == 5 and all(ports.values()) and len(set(ports.values())) == 5
