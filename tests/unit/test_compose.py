"""docker-compose.yml is valid against the compose specification and runs every service.

The containers are not started here (no Docker engine in CI); `warmserve up` is what CI runs.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tooling.cli.main import SERVICE_MODULES, build_parser

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def test_compose_file_validates_against_the_spec():
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    result = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_infrastructure_and_all_five_services():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"nats", "postgres", "jaeger", "migrate"} <= set(services)
    assert "healthcheck" in services["postgres"]
    assert "-js" in services["nats"]["command"]
    run = {name: svc["command"][1] for name, svc in services.items()
           if isinstance(svc.get("command"), list) and svc["command"][:1] == ["service"]}
    assert set(run.values()) == set(SERVICE_MODULES), run
    for name, target in run.items():
        build_parser().parse_args(["service", target])  # the CLI accepts what compose runs
        assert services[name]["build"]["dockerfile"] == "infra/Dockerfile"
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert (ROOT / "infra" / "Dockerfile").exists()


def test_migration_job_runs_cli_commands_that_exist():
    entry = yaml.safe_load(COMPOSE.read_text())["services"]["migrate"]["entrypoint"][-1]
    for part in entry.split("&&"):
        words = part.split()
        assert words[0] == "warmserve"
        build_parser().parse_args(words[1:])


def test_each_service_connects_to_nats_as_its_own_user():
    from urllib.parse import urlsplit

    from tooling.localcluster.nats_auth import OPERATOR, SERVICE_USERS, USERS

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    nats_env = services["nats"]["environment"]
    for user in USERS:  # nats.conf reads every user's password from its environment
        assert nats_env[f"WARMSERVE_NATS_{user.upper()}_PASSWORD"] == \
            f"${{WARMSERVE_NATS_{user.upper()}_PASSWORD:-{user}-change-me}}"
    assert "./infra/nats/nats.conf:/etc/nats/nats.conf:ro" in services["nats"]["volumes"]
    for name, svc in services.items():
        if isinstance(svc.get("command"), list) and svc["command"][:1] == ["service"]:
            user = SERVICE_USERS[SERVICE_MODULES[svc["command"][1]].split(".")[1]]
            url = urlsplit(svc["environment"]["WARMSERVE_NATS_URL"])
            assert (url.username, url.password, url.hostname) == (
                user, f"${{WARMSERVE_NATS_{user.upper()}_PASSWORD:-{user}-change-me}}", "nats"), name
    assert "WARMSERVE_NATS_URL" not in services["migrate"]["environment"]  # it needs Postgres only
    operator = urlsplit(services["placement"]["environment"]["WARMSERVE_OPERATOR_NATS_URL"])
    assert operator.username == OPERATOR  # `docker compose exec placement warmserve ...`
