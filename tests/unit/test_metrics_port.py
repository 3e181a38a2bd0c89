"""WARMSERVE_METRICS_PORT is one port per process: only placement, the orchestrator and the forecaster serve
it, and `warmserve up`, which runs them all on one host, gives each its own (with one port for every process,
all but the first exited 'cannot serve metrics', were restarted, and stopped the cluster)."""

from collections import defaultdict

from shared.settings import (ForecasterSettings, GatewaySettings, LocalClusterSettings, OrchestratorSettings,
                             PlacementSettings, WorkerSettings)


def test_only_the_control_plane_services_have_a_metrics_port(monkeypatch):
    monkeypatch.setenv("WARMSERVE_METRICS_PORT", "9100")
    for cls in (PlacementSettings, OrchestratorSettings, ForecasterSettings):
        assert cls().metrics_port == 9100, cls
    for cls in (GatewaySettings, WorkerSettings):
        assert "metrics_port" not in cls.model_fields, cls


def _envs(tmp_path, **settings) -> dict[str, dict[str, str]]:
    from tooling.localcluster.up import Cluster

    cluster = Cluster(LocalClusterSettings(state_dir=tmp_path, workers=2, **settings), tmp_path)
    cluster.nats_urls = defaultdict(lambda: "nats://127.0.0.1:4222")
    cluster.start = lambda name: None  # record the commands, start nothing
    cluster.start_services()
    return {name: env for name, (_, env) in cluster.commands.items()}


def test_warmserve_up_gives_each_control_plane_process_its_own_metrics_port(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSERVE_METRICS_PORT", "9100")
    envs = _envs(tmp_path)
    ports = {name: env.get("WARMSERVE_METRICS_PORT") for name, env in envs.items()}
    assert ports == {"placement": "9100", "prewarm_orchestrator": "9101", "forecaster": "9102", "gateway": None,
                     "gpu_worker-0": None, "gpu_worker-1": None}


def test_warmserve_up_without_a_metrics_port_passes_none_on(tmp_path, monkeypatch):
    monkeypatch.delenv("WARMSERVE_METRICS_PORT", raising=False)
    assert all("WARMSERVE_METRICS_PORT" not in env for env in _envs(tmp_path).values())
