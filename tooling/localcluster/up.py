"""``warmserve up``: bring up the whole local cluster, show progress, stop it cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tooling.localcluster.db_users import ROLE_OF, service_urls
from tooling.localcluster.infra import EmbeddedPostgres, StartError, start_nats
from tooling.localcluster.nats_auth import OPERATOR, SERVICE_USERS, USERS, WORKER, without_user, worker_user
from tooling.localcluster.processes import (become_subreaper, env_with, free_port, kill_orphans, port_free, spawn,
                                           stop_all, tail)
from shared.settings import LocalClusterSettings

DEMO_MODEL = "tiny-llama"
SERVICES = ("forecaster", "placement", "prewarm_orchestrator", "gateway")  # plus one gpu_worker per worker
METRICS_SERVICES = ("placement", "prewarm_orchestrator", "forecaster")  # then each worker (the gateway: its port)
CLUSTER_FILE = "cluster.json"
PROMETHEUS_TARGETS = "prometheus-targets.json"  # file_sd_configs for a Prometheus scraping this cluster
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0


class Progress:
    """One line per step with its duration, so a slow step is obvious."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.monotonic()

    def step(self, what: str):
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} ...", end="", flush=True)
        return _Step()


class _Step:
    def __enter__(self):
        self.t = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            print(f" ok ({time.monotonic() - self.t:.1f} s)", flush=True)
        else:
            print(" failed", flush=True)
        return False


@dataclass
class Cluster:
    settings: LocalClusterSettings
    state_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)
    nats: subprocess.Popen | None = None
    postgres: EmbeddedPostgres | None = None
    nats_urls: dict[str, str] = field(default_factory=dict)  # by NATS user: each service and worker its own
    operator_nats_url: str = ""  # what warmserve up and the CLI connect with (operator credentials)
    database_url: str = ""  # the owner's: migrations, the demo model, cluster.json (the operator's CLI)
    database_urls: dict[str, str] = field(default_factory=dict)  # by database role: each service its own
    metrics_ports: dict[str, int] = field(default_factory=dict)  # by process name: its /metrics port

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway_port}"

    def log(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    @property
    def worker_ids(self) -> list[str]:
        return [f"worker-{i}" for i in range(self.settings.workers)]

    def service_env(self, service: str, worker_id: str | None = None) -> dict[str, str]:
        """The environment of a service process (``service``: its module under services/), with its own
        NATS user's URL (a worker's: that worker's own user)."""
        s = self.settings
        user = worker_user(worker_id) if worker_id else SERVICE_USERS[service]
        name = f"gpu_worker-{self.worker_ids.index(worker_id)}" if worker_id else service
        return self._metrics_env(name, self._database_env(service, env_with({
            "WARMSERVE_NATS_URL": self.nats_urls[user],
            "WARMSERVE_PORT": str(s.gateway_port), "WARMSERVE_HOST": "127.0.0.1",
            "WARMSERVE_LOG_LEVEL": s.log_level, "WARMSERVE_ENGINE": s.resolved_engine,
            "WARMSERVE_MEMORY_BUDGET_BYTES": str(s.worker_memory_budget_bytes),
            # a short forecast window so the local demo shows forecasts within minutes
            "WARMSERVE_WINDOW_S": os.environ.get("WARMSERVE_WINDOW_S", "60"),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        })))

    def _metrics_env(self, name: str, env: dict[str, str]) -> dict[str, str]:
        """Each process but the gateway its own metrics port (``start_services`` picks them: from
        WARMSERVE_METRICS_PORT on, one after another, or free ports where it is 0). One port for every process
        on this host would be taken by the first, and the rest would exit, be restarted, and stop the cluster."""
        env.pop("WARMSERVE_METRICS_PORT", None)
        if name in self.metrics_ports:
            env["WARMSERVE_METRICS_PORT"] = str(self.metrics_ports[name])
        return env

    def metrics_urls(self) -> dict[str, str]:
        """Every process's /metrics, the gateway's first."""
        return {"gateway": f"{self.gateway_url}/metrics",
                **{name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()}}

    def prometheus_targets(self) -> list[dict]:
        """This cluster's /metrics as Prometheus file_sd targets, labelled by service (and worker)."""
        out = [{"targets": [f"127.0.0.1:{self.settings.gateway_port}"], "labels": {"service": "gateway"}}]
        for name, port in self.metrics_ports.items():
            service, _, index = name.partition("-")
            labels = {"service": service.replace("_", "-")}
            if index:
                labels["worker"] = self.worker_ids[int(index)]
            out.append({"targets": [f"127.0.0.1:{port}"], "labels": labels})
        return out

    def _database_env(self, service: str, env: dict[str, str]) -> dict[str, str]:
        """Placement, the orchestrator and the forecaster get their own role's URL; the gateway and the workers
        none (nor any database password this shell may hold), so a compromised one has no database to reach."""
        for k in [k for k in env if k == "WARMSERVE_DATABASE_URL" or k.startswith("WARMSERVE_DB_")]:
            del env[k]
        role = ROLE_OF.get(service)
        if role in self.database_urls:
            env["WARMSERVE_DATABASE_URL"] = self.database_urls[role]
        return env

    def start_services(self) -> None:
        for name in [*METRICS_SERVICES, *(f"gpu_worker-{i}" for i in range(len(self.worker_ids)))]:
            base = self.settings.metrics_port
            self.metrics_ports[name] = base + len(self.metrics_ports) if base else free_port()
        for i, worker_id in enumerate(self.worker_ids):
            name = f"gpu_worker-{i}"
            wenv = dict(self.service_env("gpu_worker", worker_id), WARMSERVE_WORKER_ID=worker_id,
                        WARMSERVE_DEVICE=f"cpu:{i}")
            self.commands[name] = ([sys.executable, "-m", "services.gpu_worker"], wenv)
        for svc in SERVICES:
            self.commands[svc] = ([sys.executable, "-m", f"services.{svc}"], self.service_env(svc))
        for name in self.commands:
            self.start(name)

    def start(self, name: str) -> None:
        args, env = self.commands[name]
        self.procs[name] = spawn(args, self.log(name), env)

    def restart_dead(self, now: float) -> str | None:
        """Restart services that died (a crashed worker comes back empty, as after a reboot).
        Returns the name of one that keeps dying: then the cluster should stop."""
        for name in self.dead():
            recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_S]
            if len(recent) >= MAX_RESTARTS:
                return name
            self.restarts[name] = recent + [now]
            self.reap_orphans()
            print(f"{name} exited (code {self.procs[name].returncode}); restarting it. Its log ends with:\n"
                  f"{tail(self.log(name), 5)}", file=sys.stderr, flush=True)
            self.start(name)
        return None

    def reap_orphans(self) -> None:
        """Kill what services that died left behind (a worker's vLLM engine processes, re-parented to this
        supervisor): they hold memory and cores nobody accounts for."""
        keep = {p.pid for p in self.procs.values()} | ({self.nats.pid} if self.nats else set())
        if self.postgres is not None and self.postgres.pid():
            keep.add(self.postgres.pid())  # daemonised by pg_ctl, so also re-parented here
        killed = kill_orphans(keep)
        if killed:
            print(f"stopped {len(killed)} orphaned process(es) of services that died: {', '.join(sorted(set(killed)))}",
                  file=sys.stderr, flush=True)

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        order = ["gateway", "prewarm_orchestrator", "placement", "forecaster"]
        first = [self.procs[n] for n in order if n in self.procs]
        stop_all(first, timeout_s=15.0)  # the gateway's default shutdown grace (10 s) fits
        stop_all([p for n, p in self.procs.items() if n not in order])
        self.reap_orphans()
        if self.nats is not None:
            stop_all([self.nats])
        if self.postgres is not None:
            self.postgres.stop()
        (self.state_dir / CLUSTER_FILE).unlink(missing_ok=True)


def _prepare_database(url: str) -> None:
    from shared.db.migrate import upgrade

    upgrade(url)


async def ensure_demo_model(database_url: str, path: Path) -> Path:
    """Create the demo model folder if missing and register it in the catalog (idempotent)."""
    from shared.db import repo
    from shared.db.engine import create_engine, sessionmaker
    from shared.messages import ModelSpec
    from shared.model_folder import max_context, weight_bytes
    from tooling.modelgen import create_tiny_llama

    path = create_tiny_llama(path)
    engine = create_engine(database_url)
    try:
        async with sessionmaker(engine)() as session:
            await repo.upsert_model(session, ModelSpec(slug=DEMO_MODEL, path=str(path.resolve()),
                                                       parameter_bytes=weight_bytes(path),
                                                       max_context_tokens=max_context(path)),
                                    keep_tool_parser=True)  # one the operator set survives a restart
            await session.commit()
    finally:
        await engine.dispose()
    return path


def _wait_ready(cluster: Cluster, timeout_s: float, api_key: str) -> None:
    """Until the gateway is ready and the demo model has an active instance."""
    deadline = time.monotonic() + timeout_s
    last = "gateway not answering"
    while time.monotonic() < deadline:
        dead = cluster.dead()
        if dead:
            name = dead[0]
            raise StartError(f"{name} exited during start-up; its log ({cluster.log(name)}) ends with:\n"
                             f"{tail(cluster.log(name))}")
        try:
            r = httpx.get(f"{cluster.gateway_url}/readyz", timeout=1.0)
            if r.status_code == 200:
                models = httpx.get(f"{cluster.gateway_url}/v1/models", timeout=1.0,
                                   headers={"Authorization": f"Bearer {api_key}"}).json()["data"]
                card = next((m for m in models if m["id"] == DEMO_MODEL), None)
                if card and (card["active_instances"] or card["prewarmed_copies"]):
                    return  # active, or prewarmed and one scale-up away (min_active_per_model=0)
                last = f"waiting for {DEMO_MODEL} to be prewarmed ({card})"
            else:
                last = f"gateway not ready: {r.text}"
        except httpx.HTTPError as exc:
            last = f"gateway not answering ({exc.__class__.__name__})"
        time.sleep(0.25)
    raise StartError(f"cluster not ready after {timeout_s:.0f} s: {last}")


async def _wait_workers(nats_url: str, expected: int, timeout_s: float) -> None:
    """Until every worker has reported its state: a cluster that says it is up has all its capacity
    (a scale-up with a worker still starting would be refused)."""
    from shared import bus
    from shared.admin import AdminClient, AdminError

    nc = await bus.connect(nats_url, "warmserve-up", deadline_s=10)
    try:
        deadline = time.monotonic() + timeout_s
        live: list = []
        while time.monotonic() < deadline:
            try:
                live = await AdminClient(nc).call("worker-list", timeout=15)
            except (bus.BusError, AdminError):  # placement restarting: ask again
                live = []
            if len(live) >= expected:
                return
            await asyncio.sleep(0.25)
    finally:
        await nc.close()
    raise StartError(f"{len(live)} of {expected} workers live after {timeout_s:.0f} s")


async def local_api_key(nats_url: str) -> str:
    """A key for this local cluster (created through the admin verb, as an operator would), and a pin
    that keeps the demo model prewarmed: with no load history its forecast is zero, and placement
    prewarms what forecasts ask for (the first request is then a prewarm hit, not a cold start)."""
    from shared import bus
    from shared.admin import AdminClient, AdminError, KeyArgs, PinArgs

    nc = await bus.connect(nats_url, "warmserve-up", deadline_s=10)
    client = AdminClient(nc)
    try:
        name = f"local-{int(time.time())}"
        deadline = time.monotonic() + 60
        while True:  # placement answers admin verbs once it has started
            try:
                key = await client.call("key-create", KeyArgs(name=name), timeout=15)
                break
            except bus.BusError:
                if time.monotonic() > deadline:
                    raise StartError("placement did not answer admin requests within 60 s") from None
                await asyncio.sleep(0.25)
            except AdminError as exc:
                raise StartError(f"could not create an API key: {exc}") from None
        pin = PinArgs(slug=DEMO_MODEL, copies=1, reason="warmserve up keeps the demo model prewarmed")
        while True:  # placement pins a model once its catalog sync has seen it
            try:
                await client.call("prewarm-pin", pin, timeout=15)
                break
            except AdminError as exc:
                if exc.code != "not_found" or time.monotonic() > deadline:
                    raise StartError(f"could not pin {DEMO_MODEL}: {exc}") from None
            await asyncio.sleep(0.25)
    finally:
        await nc.close()
    return key["key"]


def smoke_request(gateway_url: str, api_key: str, model: str = DEMO_MODEL) -> str:
    """One real chat completion through the official OpenAI client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=2)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello to WarmServe."}], max_tokens=16, seed=0)
    resp = raw.parse()
    outcome = raw.headers.get("x-warmserve-outcome")
    return (f"{resp.choices[0].message.content!r} ({resp.usage.completion_tokens} tokens, "
            f"outcome {outcome}, finish {resp.choices[0].finish_reason})")


def up(settings: LocalClusterSettings, smoke: bool = True, ready_timeout_s: float = 180.0,
       exit_after_smoke: bool = False) -> int:
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(settings, state_dir)

    def _on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)  # also when started in the background with SIGINT ignored
    become_subreaper()
    progress = Progress(7 if smoke else 6)
    try:
        if not port_free(settings.gateway_port):
            raise StartError(f"port {settings.gateway_port} is taken: set WARMSERVE_GATEWAY_PORT to a free port")
        with progress.step("NATS with JetStream"):
            if settings.external_nats:  # a server the operator runs, with its own credentials (or none)
                users = [u for u in USERS if u != WORKER] + [worker_user(w) for w in cluster.worker_ids]
                cluster.nats_urls = dict.fromkeys(users, settings.nats_url)
            else:  # one user per service and per worker, each allowed only its own subjects (nats_auth)
                cluster.nats, base, users = start_nats(state_dir, settings.nats_port, cluster.worker_ids)
                cluster.nats_urls = {user: users.url(base, user) for user in users.passwords}
            cluster.operator_nats_url = cluster.nats_urls[OPERATOR]
        with progress.step("PostgreSQL"):
            if settings.external_database:
                cluster.database_url = settings.database_url
            else:
                cluster.postgres = EmbeddedPostgres(state_dir)
                cluster.database_url = cluster.postgres.start()
        with progress.step("database migrations, a database user per service"):
            _prepare_database(cluster.database_url)
            cluster.database_urls = service_urls(cluster.database_url, state_dir / "db-users.json")
        with progress.step(f"model '{DEMO_MODEL}' (created offline if missing)"):
            asyncio.run(ensure_demo_model(cluster.database_url, state_dir / "models" / DEMO_MODEL))
        with progress.step(f"services: gateway, forecaster, placement, orchestrator, "
                           f"{settings.workers} worker(s) with the {settings.resolved_engine} engine"):
            cluster.start_services()
        with progress.step(f"waiting for readiness ({DEMO_MODEL} servable behind the gateway, "
                           f"{settings.workers} worker(s) live)"):
            api_key = asyncio.run(local_api_key(cluster.operator_nats_url))
            _wait_ready(cluster, ready_timeout_s, api_key)
            asyncio.run(_wait_workers(cluster.operator_nats_url, settings.workers, ready_timeout_s))
        (state_dir / CLUSTER_FILE).write_text(json.dumps(
            {"gateway_url": cluster.gateway_url, "nats_url": cluster.operator_nats_url, "database_url": cluster.database_url,
             "api_key": api_key, "pid": os.getpid(), "metrics": cluster.metrics_urls()}, indent=2))
        os.chmod(state_dir / CLUSTER_FILE, 0o600)  # it holds a key and the operator's NATS credentials
        (state_dir / PROMETHEUS_TARGETS).write_text(json.dumps(cluster.prometheus_targets(), indent=2))
        if smoke:
            with progress.step("smoke request through the gateway (official openai client)"):
                answer = smoke_request(cluster.gateway_url, api_key)
            print(f"      answer: {answer}")
        print(f"\nWarmServe is up in {time.monotonic() - progress.t0:.1f} s.\n"
              f"  OpenAI API:  {cluster.gateway_url}/v1   (model '{DEMO_MODEL}', API key {api_key})\n"
              f"  metrics:     {cluster.gateway_url}/metrics and each service's (Prometheus targets: "
              f"{state_dir / PROMETHEUS_TARGETS}; warmserve top shows the cluster live)\n"
              f"  NATS:        {without_user(cluster.operator_nats_url)}   "
              f"(operator credentials in {state_dir / CLUSTER_FILE})\n"
              f"  logs:        {state_dir / 'logs'}\n"
              f"Try: warmserve chat 'hello'   |   warmserve workers   |   Ctrl-C stops everything.", flush=True)
        if exit_after_smoke:
            return 0
        while True:
            failing = cluster.restart_dead(time.monotonic())
            if failing:
                print(f"\n{failing} keeps exiting ({MAX_RESTARTS} times in {RESTART_WINDOW_S:.0f} s); stopping. "
                      f"Its log ends with:\n{tail(cluster.log(failing))}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except StartError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping WarmServe ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans
        cluster.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("stopped.", flush=True)
