"""Kubernetes Secrets for infra/k8s: a random password for every NATS user, the NATS routes and Postgres.

The manifests hold no secret and no default: they reference these Secrets (secretKeyRef, or a mounted
Secret), and pods that lack one do not start. This script prints them as YAML for ``kubectl apply -f -``
(docs/deploy.md, Kubernetes). Passwords are kept in a state folder (mode 600; default ``.warmserve/k8s``),
so running it again, for example after adding a GPU node, keeps every password and only adds the new
workers' users. Reuses the local cluster's NATS users (``NatsUsers``) and ``warmserve compose-secrets``'s
env file; the NATS authorization block is the one ``tooling/localcluster/nats_auth.py`` renders for
docker compose, with the passwords in it (hence a Secret, not a ConfigMap).

    python infra/k8s/make_secrets.py --nodes gpu-a.example.com:8 gpu-b.example.com:4 | kubectl apply -n warmserve -f -
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages

import yaml  # noqa: E402

from shared.subjects import worker_user  # noqa: E402
from tooling.cli.compose_secrets import ensure_env_file  # noqa: E402
from tooling.localcluster.nats_auth import NatsUsers, authorization_block  # noqa: E402

_spec = importlib.util.spec_from_file_location("worker_entrypoint", HERE / "base" / "worker_entrypoint.py")
_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_entry)
worker_id = _entry.worker_id  # the same function the worker containers run

NATS_STATEFULSET = "nats"  # base/nats.yaml: StatefulSet and headless Service of this name, 3 servers
NATS_SERVERS = 3
ROUTE_PORT = 6222
ROUTE_USER = "route"
PG_OWNER = "warmserve"  # base/postgres.yaml: the database and its owner

# Every Secret the manifests reference, and its keys (tests/unit/test_k8s_manifests.py checks both ways);
# warmserve-nats-workers has one key per worker id instead.
SERVICE_NATS_USERS = ("gateway", "forecaster", "placement", "orchestrator", "operator")
DB_SERVICES = ("placement", "orchestrator", "forecaster")
SECRETS = {
    "warmserve-nats": SERVICE_NATS_USERS,
    "warmserve-nats-auth": ("auth.conf", "cluster.conf"),
    "warmserve-db": DB_SERVICES,
    "warmserve-pg-owner": ("username", "password"),
}
WORKER_SECRET = "warmserve-nats-workers"
ENV_NAMES = ["WARMSERVE_POSTGRES_PASSWORD", "WARMSERVE_NATS_ROUTE_PASSWORD",
             *(f"WARMSERVE_DB_{s.upper()}_PASSWORD" for s in DB_SERVICES)]


def node_workers(specs: list[str]) -> list[str]:
    """``NODE[:GPUS]`` (GPUS default 1) -> the worker ids of those nodes' GPU slots."""
    out = []
    for spec in specs:
        node, _, gpus = spec.partition(":")
        count = int(gpus or 1)
        if not node or count < 1:
            raise SystemExit(f"error: bad node {spec!r}: NODE or NODE:GPUS (GPUS >= 1)")
        out += [worker_id(node, slot) for slot in range(count)]
    if len(set(out)) != len(out):
        raise SystemExit("error: a node is listed twice")
    return out


def route_urls(password: str) -> list[str]:
    return [f"nats://{ROUTE_USER}:{password}@{NATS_STATEFULSET}-{i}.{NATS_STATEFULSET}:{ROUTE_PORT}"
            for i in range(NATS_SERVERS)]


def cluster_conf(password: str) -> str:
    """Included in the ``cluster`` block of base/nats.conf: the routes' own user, and the routes with it."""
    routes = "\n".join(f"  {json.dumps(u)}" for u in route_urls(password))
    return (f"authorization {{ user: {json.dumps(ROUTE_USER)}, password: {json.dumps(password)} }}\n"
            f"routes: [\n{routes}\n]\n")


def _secret(name: str, data: dict[str, str], namespace: str | None, kind: str = "Opaque") -> dict:
    meta = {"name": name, "labels": {"app.kubernetes.io/part-of": "warmserve"}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": kind, "stringData": data}


def render(state_dir: Path, nodes: list[str], *, prune: bool = False, namespace: str | None = None) -> list[dict]:
    """The Secrets, with passwords from (or new in) ``state_dir``."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    users = NatsUsers.load_or_create(state_dir / "nats-users.json", node_workers(nodes), keep_workers=not prune)
    env_file = state_dir / "secrets.env"
    ensure_env_file(env_file, ENV_NAMES)
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")
    workers = users.workers
    return [
        _secret("warmserve-nats", {u: users.password(u) for u in SERVICE_NATS_USERS}, namespace),
        _secret(WORKER_SECRET, {w: users.password(worker_user(w)) for w in workers}, namespace),
        _secret("warmserve-nats-auth", {"auth.conf": authorization_block(users.passwords),
                                        "cluster.conf": cluster_conf(env["WARMSERVE_NATS_ROUTE_PASSWORD"])},
                namespace),
        _secret("warmserve-db", {s: env[f"WARMSERVE_DB_{s.upper()}_PASSWORD"] for s in DB_SERVICES}, namespace),
        _secret("warmserve-pg-owner", {"username": PG_OWNER, "password": env["WARMSERVE_POSTGRES_PASSWORD"]},
                namespace, kind="kubernetes.io/basic-auth"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", nargs="*", default=[], metavar="NODE[:GPUS]",
                   help="GPU nodes (kubectl get nodes) and their GPU count: one worker user per GPU")
    p.add_argument("--prune", action="store_true", help="drop the workers of nodes not listed (default: keep them)")
    p.add_argument("--state-dir", type=Path, default=ROOT / ".warmserve" / "k8s",
                   help="where the passwords are kept (mode 600; default .warmserve/k8s)")
    p.add_argument("--namespace", help="set metadata.namespace (default: none, kubectl apply -n decides)")
    a = p.parse_args(argv)
    docs = render(a.state_dir, a.nodes, prune=a.prune, namespace=a.namespace)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    workers = docs[1]["stringData"]
    print(f"{len(workers)} worker user(s): {', '.join(workers) or 'none'}; passwords kept in {a.state_dir}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
