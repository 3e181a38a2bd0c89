"""docker-compose.yml is valid against the compose specification, runs every service, and is safe to expose:
no secret has a default (compose refuses to start without them; ``warmserve compose-secrets`` writes
them), only the gateway is published beyond this host, and infra/compose.tls.yml switches NATS to TLS.

The containers are not started here: tests/containers/test_compose_podman.py runs them with podman. Where
docker compose or podman-compose (a test dependency) can run, its ``config`` checks the interpolation too.
"""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tooling.cli.compose_secrets import ensure_env_file, required_secrets
from tooling.cli.main import SERVICE_MODULES, build_parser
from tooling.localcluster.nats_auth import env_password

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_TLS = ROOT / "infra" / "compose.tls.yml"
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}, ${NAME+alt}
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (the forms this project uses): a required variable that is unset or
    empty raises, naming it and compose's message."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":?", "?") and unset:
            raise KeyError(f"required variable {name} is missing a value: {arg}")
        if op in (":-", "-") and unset:
            return arg
        if op in (":+", "+"):
            return "" if unset else arg
        return value or ""
    return REFERENCE.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def _services(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())["services"]


def _env(svc: dict) -> dict:
    env = svc.get("environment") or {}
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def _runs_service(svc: dict) -> bool:
    return isinstance(svc.get("command"), list) and svc["command"][:1] == ["service"]


def _required_ref(value: str, name: str | None = None) -> bool:
    """``value`` is exactly ``${NAME:?message}`` (of ``name`` if given)."""
    m = REFERENCE.fullmatch(value)
    return bool(m and m.group(2) == ":?" and m.group(3) and (name is None or m.group(1) == name))


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_TLS], ids=lambda p: p.name)
def test_compose_file_validates_against_the_spec(path):
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    result = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_infrastructure_and_all_five_services():
    services = _services()
    assert {"nats", "postgres", "jaeger", "migrate"} <= set(services)
    assert "healthcheck" in services["postgres"]
    assert "-js" in services["nats"]["command"]
    run = {name: svc["command"][1] for name, svc in services.items() if _runs_service(svc)}
    assert set(run.values()) == set(SERVICE_MODULES), run
    for name, target in run.items():
        build_parser().parse_args(["service", target])  # the CLI accepts what compose runs
        assert services[name]["build"]["dockerfile"] == "infra/Dockerfile"
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert (ROOT / "infra" / "Dockerfile").exists()


def test_migration_job_runs_cli_commands_that_exist():
    entry = _services()["migrate"]["entrypoint"][-1]
    for part in entry.split("&&"):
        words = part.split()
        assert words[0] == "warmserve"
        build_parser().parse_args(words[1:])


def test_each_service_connects_to_nats_as_its_own_user():
    from tooling.localcluster.nats_auth import COMPOSE_WORKERS, OPERATOR, SERVICE_USERS, users_for
    from shared.subjects import worker_user

    nats_env = _services()["nats"]["environment"]
    for user in users_for(COMPOSE_WORKERS):  # nats.conf reads every user's password from its environment,
        var = env_password(user)[1:]        # which compose requires (a worker's: WARMSERVE_NATS_WORKER_<ID>_...)
        assert _required_ref(nats_env[var], var), nats_env[var]
    services = yaml.safe_load(interpolate(COMPOSE.read_text(), _secrets()))["services"]
    assert "./infra/nats/nats.conf:/etc/nats/nats.conf:ro" in services["nats"]["volumes"]
    for name, svc in services.items():
        if _runs_service(svc):
            worker_id = svc["environment"].get("WARMSERVE_WORKER_ID")
            service = SERVICE_MODULES[svc["command"][1]].split(".")[1]
            user = worker_user(worker_id) if worker_id else SERVICE_USERS[service]
            url = urlsplit(svc["environment"]["WARMSERVE_NATS_URL"])
            assert (url.username, url.hostname) == (user, "nats"), name
            assert url.password == _secrets()[env_password(user)[1:]], name
    assert "WARMSERVE_NATS_URL" not in _env(services["migrate"])  # it needs Postgres only
    operator = urlsplit(services["placement"]["environment"]["WARMSERVE_OPERATOR_NATS_URL"])
    assert operator.username == OPERATOR  # `docker compose exec placement warmserve ...`


# ---- no default secrets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_TLS], ids=lambda p: p.name)
def test_no_secret_has_a_default(path):
    text = path.read_text()
    for m in REFERENCE.finditer(text):  # every use of a secret is required, none falls back to a value
        if SECRET.search(m.group(1)):
            assert m.group(2) == ":?" and m.group(3), f"{m.group(0)}: a secret must be ${{NAME:?message}}"
    assert "change-me" not in text
    doc = yaml.safe_load(text)
    for name, svc in doc["services"].items():
        for key, value in _env(svc).items():
            value = str(value)
            if SECRET.search(key):  # POSTGRES_PASSWORD, WARMSERVE_NATS_*_PASSWORD, WARMSERVE_DB_*_PASSWORD...
                assert _required_ref(value), f"{name}: {key}={value!r} is a literal or defaulted secret"
            userinfo = re.match(r"[a-z+]+://[^:@/]+:(.*)@[^@]*$", value)  # not urlsplit: "?" ends its netloc
            if userinfo:
                assert _required_ref(userinfo.group(1)), f"{name}: {key} holds a password: {value!r}"


def test_only_the_gateway_is_published_beyond_this_host():
    for path in (COMPOSE, COMPOSE_TLS):
        services = yaml.safe_load(interpolate(path.read_text(), _secrets()))["services"]
        for name, svc in services.items():
            for port in svc.get("ports", []):
                host_ip = port.get("host_ip") if isinstance(port, dict) else \
                    (str(port).rsplit(":", 2)[0] if str(port).count(":") == 2 else None)
                if name != "gateway":
                    assert host_ip == "127.0.0.1", f"{path.name}: {name} publishes {port} beyond this host"
    gateway = _services()["gateway"]["ports"]
    assert [str(p).rsplit(":", 2)[1:] for p in gateway] == [["8080", "8080"]]


def _secrets() -> dict[str, str]:
    return {name: f"s3cret-{name.lower()}" for name in required_secrets(COMPOSE.read_text())}


def test_compose_refuses_to_start_without_its_secrets():
    text = COMPOSE.read_text()
    names = required_secrets(text)
    assert {"WARMSERVE_POSTGRES_PASSWORD", "WARMSERVE_NATS_OPERATOR_PASSWORD"} <= set(names)
    for missing in names:  # each one alone stops compose, with the message that says what to run
        env = {n: "x" for n in names if n != missing}
        with pytest.raises(KeyError, match=f"{missing} .*warmserve compose-secrets"):
            interpolate(text, env)
        with pytest.raises(KeyError, match=missing):
            interpolate(text, {**env, missing: ""})  # set but empty is missing too


def test_a_generated_env_file_is_all_compose_needs(tmp_path):
    env_file = tmp_path / ".env"
    ensure_env_file(env_file, required_secrets(COMPOSE.read_text()))
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if not line.startswith("#"))
    services = yaml.safe_load(interpolate(COMPOSE.read_text(), env))["services"]
    pg = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert pg == env["WARMSERVE_POSTGRES_PASSWORD"] and len(pg) >= 24
    assert urlsplit(services["migrate"]["environment"]["WARMSERVE_DATABASE_URL"]).password == pg
    for name, svc in services.items():
        if _runs_service(svc):
            url = urlsplit(svc["environment"]["WARMSERVE_NATS_URL"])
            assert url.password == services["nats"]["environment"][env_password(url.username)[1:]]
    assert len(set(env.values())) == len(env)  # every secret its own


def _docker_compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"], [sys.executable, "-m", "podman_compose"]):
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


@pytest.mark.skipif(_docker_compose() is None, reason="no docker compose CLI here")
def test_docker_compose_config_needs_the_generated_env(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "infra", project / "infra")
    shutil.copy(COMPOSE, project / "docker-compose.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WARMSERVE_", "COMPOSE_"))}
    files = ["-f", "docker-compose.yml", "-f", "infra/compose.tls.yml"]
    for args in (files[:2], files):
        run = subprocess.run([*_docker_compose(), *args, "config"], cwd=project, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode != 0 and "warmserve compose-secrets" in run.stderr, run.stdout + run.stderr
    subprocess.run([sys.executable, "-m", "tooling.cli.main", "compose-secrets", "--compose",
                    str(project / "docker-compose.yml")], check=True, cwd=ROOT, timeout=60)
    for args in (files[:2], files):
        run = subprocess.run([*_docker_compose(), *args, "config"], cwd=project, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr


# ---- compose-secrets ------------------------------------------------------------------------------------

def test_compose_secrets_writes_each_secret_once_into_a_private_file(tmp_path):
    compose = tmp_path / "docker-compose.yml"
    compose.write_text("services:\n  a:\n    environment:\n"
                       "      A_PASSWORD: ${A_PASSWORD:?run warmserve compose-secrets}\n"
                       "      B_PASSWORD: ${B_PASSWORD:?run warmserve compose-secrets}\n"
                       "      C_PASSWORD: ${C_PASSWORD:?run warmserve compose-secrets}\n"
                       "      PORT: ${PORT:-80}\n")
    env_file = tmp_path / ".env"
    env_file.write_text("# mine\nA_PASSWORD=chosen-by-me\nB_PASSWORD=\nOTHER=1\n")
    env_file.chmod(0o644)
    args = build_parser().parse_args(["compose-secrets", "--compose", str(compose)])
    assert args.func(args) == 0
    text = env_file.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "# mine\nA_PASSWORD=chosen-by-me\n" in text and "OTHER=1\n" in text  # kept as they were
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert set(values) == {"A_PASSWORD", "B_PASSWORD", "C_PASSWORD", "OTHER"}  # PORT is no secret
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{31}", values["B_PASSWORD"])  # the empty one was filled
    assert values["B_PASSWORD"] != values["C_PASSWORD"]
    assert ensure_env_file(env_file, ["A_PASSWORD", "B_PASSWORD", "C_PASSWORD"]) == []  # a second run: nothing
    assert env_file.read_text() == text
    assert ensure_env_file(env_file, ["A_PASSWORD", "D_SECRET"]) == ["D_SECRET"]  # a new one: only it
    assert env_file.read_text().startswith(text)


def test_a_new_env_file_is_never_readable_by_others(tmp_path):
    env_file = tmp_path / ".env"
    assert ensure_env_file(env_file, ["X_PASSWORD"]) == ["X_PASSWORD"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))


# ---- TLS switch -----------------------------------------------------------------------------------------

def test_the_tls_override_requires_tls_on_nats_and_gives_every_service_the_ca():
    from tooling.localcluster.nats_auth import COMPOSE_TLS as SERVER_TLS, compose_tls_config

    conf = (ROOT / "infra" / "nats" / "nats-tls.conf").read_text()
    assert conf == compose_tls_config(), "regenerate: python -m tooling.localcluster.nats_auth tls > infra/nats/nats-tls.conf"
    assert "include ./nats.conf" in conf  # the users and rules of the plain config, unchanged
    base, tls = _services(), _services(COMPOSE_TLS)
    nats = tls["nats"]
    assert nats["command"] == ["-js", "-c", "/etc/nats/nats-tls.conf"]
    mounts = {v.split(":")[-2] if v.endswith(":ro") else v.split(":")[-1] for v in nats["volumes"]}
    assert "/etc/nats/nats-tls.conf" in mounts
    base_mounts = {v.split(":")[1] for v in base["nats"]["volumes"]}
    assert "/etc/nats/nats.conf" in base_mounts  # beside nats-tls.conf, where its include looks
    tls_dir = next(m for m in mounts if m != "/etc/nats/nats-tls.conf")
    assert SERVER_TLS.cert_file.startswith(tls_dir + "/") and SERVER_TLS.key_file.startswith(tls_dir + "/")
    clients = {name for name, svc in base.items() if "WARMSERVE_NATS_URL" in _env(svc)}
    assert clients == {name for name, svc in base.items() if _runs_service(svc)}
    for name in clients:
        ca = tls[name]["environment"]["WARMSERVE_NATS_TLS_CA"]
        assert any(str(v).endswith(f":{ca}:ro") for v in tls[name]["volumes"]), name
    assert set(tls) == clients | {"nats"}
