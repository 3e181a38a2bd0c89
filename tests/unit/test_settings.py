import pytest

from shared.settings import GatewaySettings, WorkerSettings, load_settings


def test_defaults_work_without_environment(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("WARMSERVE_"):
            monkeypatch.delenv(key)
    s = load_settings(GatewaySettings)
    assert s.port == 8080 and s.nats_url.startswith("nats://")


def test_environment_prefix_is_read(monkeypatch):
    monkeypatch.setenv("WARMSERVE_PORT", "9001")
    monkeypatch.setenv("WARMSERVE_LOG_LEVEL", "debug")
    s = load_settings(GatewaySettings)
    assert s.port == 9001 and s.log_level == "DEBUG"


def test_invalid_values_fail_fast_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("WARMSERVE_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exc:
        load_settings(GatewaySettings)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "WARMSERVE_PORT" in err and "not-a-port" in err


def test_worker_id_must_be_a_subject_token(monkeypatch, capsys):
    monkeypatch.setenv("WARMSERVE_WORKER_ID", "gpu.0")
    with pytest.raises(SystemExit):
        load_settings(WorkerSettings)
    assert "WARMSERVE_WORKER_ID" in capsys.readouterr().err


def test_local_cluster_uses_servers_only_when_their_urls_are_set(monkeypatch):
    from shared.settings import LocalClusterSettings

    monkeypatch.delenv("WARMSERVE_NATS_URL", raising=False)
    monkeypatch.delenv("WARMSERVE_DATABASE_URL", raising=False)
    s = load_settings(LocalClusterSettings)
    assert not s.external_nats and not s.external_database
    monkeypatch.setenv("WARMSERVE_DATABASE_URL", "postgresql://me@db.internal/ws")
    s = load_settings(LocalClusterSettings)
    assert s.external_database and not s.external_nats
