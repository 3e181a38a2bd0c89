"""A NATS cluster with JetStream made of several nats-server processes: on one host (loopback ports) or one
per network namespace (the multi-node test bed, tests/multinode).

Every server has the cluster's users (``nats_auth``), its own JetStream store and a route to every other
server, authenticated with a generated route password. With 3 servers, streams and buckets created with
``WARMSERVE_NATS_REPLICAS=3`` stay available while any one server is down (JetStream needs a majority).
Clients list every server (``urls``) and fail over between them.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tooling.localcluster.infra import nats_server_binary
from tooling.localcluster.nats_auth import OPERATOR, NatsUsers, authorization_block
from tooling.localcluster.processes import free_port, spawn, tail, wait_port

CLUSTER_NAME = "warmserve"
ROUTE_USER = "route"


@dataclass(frozen=True)
class ServerAddress:
    """Where one server of the cluster listens: clients, routes, monitoring (its /healthz says when its
    JetStream has caught up with the cluster)."""

    name: str
    host: str
    client_port: int
    cluster_port: int
    http_port: int


def cluster_config(me: ServerAddress, servers: Sequence[ServerAddress], store_dir: Path, users: NatsUsers,
                   route_password: str) -> str:
    """nats-server configuration of ``me`` in a cluster of ``servers`` (``me`` among them)."""
    routes = [f"nats-route://{ROUTE_USER}:{route_password}@{s.host}:{s.cluster_port}" for s in servers if s != me]
    return (f"server_name: {json.dumps(me.name)}\n"
            f"host: {json.dumps(me.host)}\nport: {me.client_port}\n"
            f"http: {json.dumps(f'{me.host}:{me.http_port}')}\n"
            f"jetstream {{ store_dir: {json.dumps(str(store_dir))} }}\n"
            "cluster {\n"
            f"  name: {CLUSTER_NAME}\n"
            f"  host: {json.dumps(me.host)}\n  port: {me.cluster_port}\n"
            f"  authorization {{ user: {ROUTE_USER}, password: {json.dumps(route_password)} }}\n"
            f"  routes: [{', '.join(json.dumps(r) for r in routes)}]\n"
            "}\n"
            + authorization_block(users.passwords))


@dataclass
class NatsCluster:
    """``n`` nats-servers in one cluster. ``hosts[i]`` is server i's address (default: all on 127.0.0.1, with
    ports of their own) and ``prefixes[i]`` the command that runs it there (``ip netns exec <ns>``)."""

    root: Path
    n: int = 3
    hosts: Sequence[str] | None = None
    prefixes: Sequence[Sequence[str]] | None = None
    workers: Sequence[str] = ()
    servers: list[ServerAddress] = field(init=False)
    procs: list[subprocess.Popen | None] = field(init=False)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        hosts = list(self.hosts or ["127.0.0.1"] * self.n)
        same_host = len(set(hosts)) == 1
        ports = (lambda: free_port()) if same_host else (lambda: None)
        self.servers = [ServerAddress(f"nats-{i}", hosts[i], ports() or 4222, ports() or 6222, ports() or 8222)
                        for i in range(self.n)]
        self.users = NatsUsers.load_or_create(self.root / "users.json", self.workers)
        secret = self.root / "route-password"
        if not secret.exists():
            secret.write_text(secrets.token_urlsafe(24))
            secret.chmod(0o600)
        self.route_password = secret.read_text()
        self.procs = [None] * self.n

    def urls(self, user: str = OPERATOR, only: Sequence[int] | None = None) -> str:
        """Every server's URL with ``user``'s credentials, comma-separated (WARMSERVE_NATS_URL)."""
        picked = [self.servers[i] for i in (only if only is not None else range(self.n))]
        return ",".join(self.users.url(f"nats://{s.host}:{s.client_port}", user) for s in picked)

    def worker_urls(self, worker_id: str) -> str:
        return ",".join(self.users.worker_url(f"nats://{s.host}:{s.client_port}", worker_id) for s in self.servers)

    def log(self, i: int) -> Path:
        return self.root / f"{self.servers[i].name}.log"

    def start(self, i: int | None = None, timeout_s: float = 30.0) -> None:
        """Start server ``i`` (default: all), then wait until each started one reports JetStream healthy."""
        which = range(self.n) if i is None else [i]
        for k in which:
            s = self.servers[k]
            conf = self.root / f"{s.name}.conf"
            conf.write_text(cluster_config(s, self.servers, self.root / s.name, self.users, self.route_password))
            prefix = list(self.prefixes[k]) if self.prefixes else []
            self.procs[k] = spawn([*prefix, nats_server_binary(), "-c", str(conf)], self.log(k))
        for k in which:
            self.wait_healthy(k, timeout_s)

    def wait_healthy(self, i: int, timeout_s: float = 30.0) -> None:
        """Until server ``i``'s monitoring says its JetStream is up and current with the cluster."""
        s = self.servers[i]
        if not wait_port(s.client_port, timeout_s, host=s.host, proc=self.procs[i]):
            raise RuntimeError(f"{s.name} did not start:\n{tail(self.log(i))}")
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{s.host}:{s.http_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception as exc:  # 503 while JetStream has no leader or catches up
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"{s.name}'s JetStream did not become healthy ({last}):\n{tail(self.log(i))}")

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` (a crash: no lame-duck mode, no goodbye to the routes)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self.procs[i] = None

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for k, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self.procs[k] = None
