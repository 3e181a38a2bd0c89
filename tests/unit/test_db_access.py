"""Only the services that use Postgres get a database URL, each its own role's: the gateway and the workers
get none, from the settings, `warmserve up` or docker compose (a compromised worker holding the owner's URL
could insert an API key that placement then publishes to every gateway)."""

import re
from collections import defaultdict
from pathlib import Path

import yaml

from shared.settings import GatewaySettings, LocalClusterSettings, PlacementSettings, WorkerSettings

ROOT = Path(__file__).parents[2]
OWNER = "postgresql://owner:owner-secret@db.internal/warmserve"
ROLES = {"placement": "placement", "prewarm_orchestrator": "orchestrator", "forecaster": "forecaster"}


def test_the_gateway_and_workers_have_no_database_setting(monkeypatch):
    monkeypatch.setenv("WARMSERVE_DATABASE_URL", OWNER)
    for cls in (GatewaySettings, WorkerSettings):
        assert "database_url" not in cls.model_fields, cls
        assert OWNER not in repr(cls().model_dump())
    assert PlacementSettings().database_url == OWNER


def test_warmserve_up_gives_each_service_only_its_own_database_url(tmp_path, monkeypatch):
    from tooling.localcluster.up import SERVICES, Cluster

    # the shell running `warmserve up` may hold the owner's URL and the passwords `warmserve migrate` reads
    monkeypatch.setenv("WARMSERVE_DATABASE_URL", OWNER)
    monkeypatch.setenv("WARMSERVE_DB_PLACEMENT_PASSWORD", "pl-secret")
    cluster = Cluster(LocalClusterSettings(state_dir=tmp_path, workers=2), tmp_path)
    cluster.nats_urls = defaultdict(lambda: "nats://127.0.0.1:4222")
    cluster.database_url = OWNER
    cluster.database_urls = {role: f"postgresql://{role}_login:{role}-pw@db.internal/warmserve"
                             for role in ROLES.values()}
    started = []
    cluster.start = started.append  # record what would run, start nothing
    cluster.start_services()
    envs = {name: env for name, (_, env) in cluster.commands.items()}
    assert set(envs) == set(SERVICES) | {"gpu_worker-0", "gpu_worker-1"}
    for name, env in envs.items():
        values = " ".join(env.values())
        assert "owner-secret" not in values and "pl-secret" not in values, name
        assert not [k for k in env if k.startswith("WARMSERVE_DB_")], name
        if name in ROLES:
            assert env["WARMSERVE_DATABASE_URL"] == cluster.database_urls[ROLES[name]], name
        else:  # gateway, gpu_worker-N
            assert "WARMSERVE_DATABASE_URL" not in env, name
            assert "postgresql://" not in values, name


def test_compose_gives_the_gateway_and_workers_no_database_and_the_others_their_roles():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("gateway", "gpu-worker"):
        env = services[name].get("environment") or {}
        assert not [k for k in env if "DATABASE" in k or k.startswith("WARMSERVE_DB_")], name
        assert "postgresql://" not in " ".join(map(str, env.values())), name
    for name, role in (("placement", "placement"), ("prewarm-orchestrator", "orchestrator"),
                       ("forecaster", "forecaster")):
        url = services[name]["environment"]["WARMSERVE_DATABASE_URL"]
        # its own login (shared/db/roles.login_role for the database "warmserve"), its password required
        assert re.fullmatch(rf"postgresql://warmserve_{role}_login:\$\{{WARMSERVE_DB_{role.upper()}_PASSWORD:\?[^}}]+\}}"
                            r"@postgres:5432/warmserve", url), (name, url)
    migrate = services["migrate"]["environment"]
    assert migrate["WARMSERVE_DATABASE_URL"].startswith("postgresql://warmserve:")  # the owner creates the users
    for role in ("PLACEMENT", "ORCHESTRATOR", "FORECASTER"):
        assert migrate[f"WARMSERVE_DB_{role}_PASSWORD"].startswith(f"${{WARMSERVE_DB_{role}_PASSWORD:?")


def test_compose_login_names_are_the_roles_migrations_create():
    from shared.db.roles import login_role

    text = (ROOT / "docker-compose.yml").read_text()
    for role in ROLES.values():
        assert f"postgresql://{login_role('warmserve', role)}:" in text


def test_local_database_passwords_are_generated_once_and_private(tmp_path):
    import stat

    from tooling.localcluster.db_users import load_or_create_passwords

    path = tmp_path / "db-users.json"
    first = load_or_create_passwords(path)
    assert set(first) == set(ROLES.values()) and len(set(first.values())) == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_passwords(path) == first  # kept across restarts
    path.write_text("not json")
    assert set(load_or_create_passwords(path)) == set(ROLES.values())  # a damaged file is replaced
