"""The multi-node test bed: three "nodes" (network namespaces, tests/multinode/netns.py) running a NATS
cluster of three, two replicas of each control-plane service, two gateways and three sim workers.

    node   address     runs
    n0     10.77.0.11  nats-0, placement/orchestrator/forecaster replica a (started first: they lead), gateway a
    n1     10.77.0.12  nats-1, placement/orchestrator/forecaster replica b (standbys), gateway b, worker w1
    n2     10.77.0.13  nats-2, workers w2 and w3
    client 10.77.0.10  the test's own clients (the test thread moves there: ``netns.inside``)

Every service lists all three NATS servers, streams and buckets have 3 replicas, and each process connects as
its own NATS user. Postgres is the session's embedded server, reached over its Unix socket (a file, which
network namespaces do not separate): the bed partitions NATS and the services, not the database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.subjects import SERVICE_USERS
from tests.multinode.netns import Network, Node
from tooling.localcluster.db_users import ROLE_OF, service_urls
from tooling.localcluster.nats_cluster import NatsCluster
from tooling.localcluster.processes import spawn, tail

LEASE_S = 3.0
HEARTBEAT_TIMEOUT_S = 3.0
# below the load's client timeout (30 s, conftest.Load): a request queued through a failover must end with the
# gateway's clear 503 before the client gives up (the default, 60 s, is for cold loads of large models)
QUEUE_WAIT_S = 20.0
GATEWAY_PORT = 8080
WORKERS = {"w1": "n1", "w2": "n2", "w3": "n2"}
CONTROL = ("placement", "prewarm_orchestrator", "forecaster")
ROLES = {"placement": "placement", "prewarm_orchestrator": "orchestrator", "forecaster": "forecaster"}


@dataclass
class Proc:
    name: str
    node: str
    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = None
    started_at: list[float] = field(default_factory=list)  # wall-clock times of each start

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Bed:
    root: Path
    database_url: str  # the owner's
    net: Network = field(default_factory=Network)
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self):
        self.nodes = {name: self.net.add(name) for name in ("client", "n0", "n1", "n2")}
        servers = [self.nodes[n] for n in ("n0", "n1", "n2")]
        self.nats = NatsCluster(self.root / "nats", n=3, hosts=[n.ip for n in servers],
                                prefixes=[n.prefix() for n in servers], workers=tuple(WORKERS))
        self.db_urls = service_urls(self.database_url, self.root / "db-users.json")

    # ---- processes ---------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def gateway_url(self, node: str) -> str:
        return f"http://{self.nodes[node].ip}:{GATEWAY_PORT}"

    def _env(self, service: str, node: str, worker_id: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("WARMSERVE_") and k not in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
        nats_url = (self.nats.worker_urls(worker_id) if worker_id else self.nats.urls(SERVICE_USERS[service]))
        env.update({
            "WARMSERVE_NATS_URL": nats_url, "WARMSERVE_NATS_REPLICAS": "3",
            "WARMSERVE_LEADER_LEASE_S": str(LEASE_S), "WARMSERVE_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
            "WARMSERVE_QUEUE_WAIT_S": str(QUEUE_WAIT_S),
            "WARMSERVE_HEARTBEAT_INTERVAL_S": "0.5", "WARMSERVE_LOG_LEVEL": "INFO", "WARMSERVE_WINDOW_S": "10",
            "WARMSERVE_FORECAST_METHODS": "naive", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "NO_PROXY": "*",
        })
        if service in ROLE_OF:
            env["WARMSERVE_DATABASE_URL"] = self.db_urls[ROLE_OF[service]]
            env["WARMSERVE_REPLICA_ID"] = f"{node}-{ROLES[service]}"
        if service == "gateway":
            env.update({"WARMSERVE_HOST": self.nodes[node].ip, "WARMSERVE_PORT": str(GATEWAY_PORT),
                        "WARMSERVE_GATEWAY_ID": f"gw-{node}"})
        if worker_id:
            env.update({"WARMSERVE_WORKER_ID": worker_id, "WARMSERVE_ENGINE": "sim", "WARMSERVE_NODE": node,
                        "WARMSERVE_DEVICE": f"cpu:{worker_id[1:]}", "WARMSERVE_MEMORY_BUDGET_BYTES": str(2 * 1024**3),
                        "WARMSERVE_KV_CACHE_BYTES": str(256 * 1024**2)})
        return env

    def add(self, name: str, node: str, service: str, worker_id: str | None = None) -> Proc:
        args = [*self.nodes[node].prefix(), sys.executable, "-m", f"services.{service}"]
        proc = Proc(name, node, args, self._env(service, node, worker_id), self.root / "logs" / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start(self, name: str) -> None:
        p = self.procs[name]
        p.started_at.append(time.time())  # a worker started again holds nothing (as after a reboot)
        p.popen = spawn(p.args, p.log, p.env)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.alive():
            p.popen.kill()
            p.popen.wait(10)

    def log_text(self, name: str) -> str:
        p = self.procs[name]
        return p.log.read_text(errors="replace") if p.log.exists() else ""

    def on(self, node: str) -> list[str]:
        return [n for n, p in self.procs.items() if p.node == node]

    # ---- the whole bed -------------------------------------------------------------------------------

    def start_all(self) -> None:
        """NATS first, then the a-replicas (so they lead), then everything else."""
        self.nats.start()
        for svc in CONTROL:
            self.add(f"{ROLES[svc]}-a", "n0", svc)
            self.add(f"{ROLES[svc]}-b", "n1", svc)
        self.add("gateway-a", "n0", "gateway")
        self.add("gateway-b", "n1", "gateway")
        for wid, node in WORKERS.items():
            self.add(wid, node, "gpu_worker", wid)
        for svc in CONTROL:
            self.start(f"{ROLES[svc]}-a")
        self.wait_for_log([f"{r}-a" for r in ROLES.values()], "leads (epoch", timeout_s=90)
        for name in self.procs:
            if not self.procs[name].alive():
                self.start(name)
        self.wait_ready(timeout_s=120)

    def wait_ready(self, timeout_s: float) -> None:
        """Until both gateways answer /readyz (the calling thread must be inside the client node)."""
        deadline = time.monotonic() + timeout_s
        for node, name in (("n0", "gateway-a"), ("n1", "gateway-b")):
            while True:
                try:
                    with urllib.request.urlopen(f"{self.gateway_url(node)}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass  # not listening yet: asked again below
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} not ready:\n{tail(self.procs[name].log, 20)}")
                time.sleep(0.3)

    def wait_for_log(self, names: list[str], text: str, timeout_s: float, since: dict[str, int] | None = None) -> None:
        """Until each of ``names`` has logged ``text`` (after offset ``since[name]`` of its log, if given)."""
        def logged(n: str) -> bool:
            return text in self.log_text(n)[(since or {}).get(n, 0):]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(logged(n) for n in names):
                return
            dead = [n for n in names if not self.procs[n].alive()]
            if dead:
                raise RuntimeError(f"{dead[0]} exited:\n{tail(self.procs[dead[0]].log, 30)}")
            time.sleep(0.2)
        missing = [n for n in names if not logged(n)]
        raise AssertionError(f"{missing} did not log {text!r} within {timeout_s:g} s:\n"
                             + "\n".join(f"--- {n}\n{tail(self.procs[n].log, 15)}" for n in missing))

    def log_sizes(self) -> dict[str, int]:
        return {n: len(self.log_text(n)) for n in self.procs}

    def kill_node(self, node: str) -> None:
        """A node dies: its link goes, then every process on it (NATS included) is killed."""
        self.net.cut(node)
        for name in self.on(node):
            self.kill(name)
        for i, s in enumerate(self.nats.servers):
            if s.host == self.nodes[node].ip:
                self.nats.kill(i)

    def revive_node(self, node: str) -> None:
        """The node comes back: link up, its NATS server and its processes restarted."""
        self.net.heal(node)
        for i, s in enumerate(self.nats.servers):
            if s.host == self.nodes[node].ip:
                self.nats.start(i)
        for name in self.on(node):
            if not self.procs[name].alive():
                self.start(name)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.alive():
                p.popen.terminate()
        for p in self.procs.values():
            if p.popen is not None:
                try:
                    p.popen.wait(15)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait(5)
        self.nats.stop()
        self.net.remove()
