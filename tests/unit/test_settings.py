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
