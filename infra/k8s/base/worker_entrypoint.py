"""Entrypoint of a GPU worker container in Kubernetes: derives the worker's id from the node name, adds the
worker's own NATS credentials to the server URLs, and runs ``warmserve service gpu-worker``.

Why: a DaemonSet pod spec is the same on every node, but each worker needs a unique id (``[a-z0-9-]``,
1-64 characters: it is a NATS subject token, so no dots) and its own NATS user ``worker-<id>``. Node names
are DNS names and often hold dots, so the id is the node name sanitized, plus the container's GPU slot:
``<node>-gpu<slot>``. A name that had to change (dots, upper case, too long) also gets 8 hex digits of its
SHA-256, so two nodes whose names sanitize alike (``a.b`` and ``a-b``) never share an id.
``infra/k8s/secrets.py`` imports ``worker_id`` from this file, so the passwords it makes match.

Environment: NODE_NAME (downward API ``spec.nodeName``), WARMSERVE_GPU_SLOT (the container's slot, 0..N-1),
WARMSERVE_NATS_URL (the servers, without credentials), NATS_WORKER_AUTH_DIR (a folder holding one
file per worker id with that worker's password: the ``warmserve-nats-workers`` Secret).

``worker_entrypoint.py probe`` is the container's liveness and readiness check: the worker serves no HTTP,
so the probe passes while the worker process (PID 1 of its container) holds an established connection to
a NATS server; one cut off from NATS longer than the probe's failure window is restarted.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

MAX_ID = 64  # shared.subjects.SLUG_RE
_NOT_ALLOWED = re.compile(r"[^a-z0-9-]+")


def worker_id(node: str, slot: int) -> str:
    """The id of the worker in GPU slot ``slot`` of node ``node``: ``<sanitized node>-gpu<slot>``."""
    if slot < 0:
        raise ValueError(f"GPU slot {slot} is negative")
    suffix = f"-gpu{slot}"
    base = _NOT_ALLOWED.sub("-", node.lower()).strip("-")
    base = re.sub("-{2,}", "-", base)
    changed = base != node
    if changed or len(base) + len(suffix) > MAX_ID:
        digest = hashlib.sha256(node.encode()).hexdigest()[:8]
        room = MAX_ID - len(suffix) - len(digest) - 1
        base = f"{base[:room].rstrip('-')}-{digest}".lstrip("-")
    return base + suffix


def with_credentials(urls: str, user: str, password: str) -> str:
    """Each comma-separated ``nats://host:port`` with ``user:password@`` in it."""
    out = []
    for url in (u.strip() for u in urls.split(",") if u.strip()):
        parts = urlsplit(url)
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}" + (
            f":{parts.port}" if parts.port else "")
        out.append(urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)))
    return ",".join(out)


def connected_to_nats(pid: int = 1, port: int = 4222, proc: Path = Path("/proc")) -> bool:
    """Whether process ``pid`` has an ESTABLISHED TCP connection to ``port``. Its own sockets only: the
    containers of a pod share a network namespace, so /proc/net/tcp alone would count the other workers'."""
    sockets = set()
    for fd in (proc / str(pid) / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / str(pid) / "net" / table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in sockets:
                return True
    return False


def main() -> None:
    if sys.argv[1:] == ["probe"]:
        sys.exit(0 if connected_to_nats() else "worker_entrypoint probe: the worker holds no connection to NATS")
    node = os.environ.get("NODE_NAME", "")
    if not node:
        sys.exit("worker_entrypoint: NODE_NAME is unset (the pod spec passes spec.nodeName through the downward API)")
    wid = worker_id(node, int(os.environ.get("WARMSERVE_GPU_SLOT", "0")))
    secrets = Path(os.environ.get("NATS_WORKER_AUTH_DIR", "/etc/warmserve/nats-workers"))
    try:
        password = (secrets / wid).read_text().strip()
    except FileNotFoundError:
        sys.exit(f"worker_entrypoint: no NATS password for worker {wid} (node {node}) in {secrets}: add the node "
                 "to the secrets (python infra/k8s/secrets.py --nodes ...), apply them and restart NATS "
                 "(docs/deploy.md, Kubernetes)")
    os.environ.update(WARMSERVE_WORKER_ID=wid, WARMSERVE_NODE=node,
                      WARMSERVE_NATS_URL=with_credentials(os.environ["WARMSERVE_NATS_URL"], f"worker-{wid}", password))
    print(f"worker_entrypoint: node {node} slot {os.environ.get('WARMSERVE_GPU_SLOT', '0')} -> worker {wid}", flush=True)
    os.execvp("warmserve", ["warmserve", "service", "gpu-worker"])


if __name__ == "__main__":
    main()
