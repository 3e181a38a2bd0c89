"""NATS users for a cluster: one user per service and one per worker, each allowed only the subjects it uses.

``PERMISSIONS`` (user -> publish / subscribe allow and deny lists) is generated from the subject, stream
and bucket table in ``shared/subjects.py``, which says for every subject who publishes and who subscribes
and for every bucket who writes and who reads; ``authorization_block`` renders it into a nats-server
``authorization`` section. The local cluster (``warmserve up``) writes it with generated passwords kept
in its state folder; ``infra/nats/nats.conf`` (docker compose) is the same block with ``$ENV`` password
references (regenerate it with ``python -m tooling.localcluster.nats_auth > infra/nats/nats.conf``; a test
keeps the two equal).

The rules, in short (docs/architecture.md has the table):

- Core subjects are exact: only the orchestrator publishes worker commands, only the gateway publishes
  inference, cancel and scale requests, placement, the forecaster and the gateway (``warmserve.admin.gateway.*``)
  subscribe to admin subjects, and only ``operator`` (everything) publishes admin requests.
- Workers: each worker ``<id>`` has its own user ``worker-<id>`` (``users_for``), allowed only its own
  subjects (``{worker}`` = its id), its own key in a bucket keyed by worker, and replies into inboxes
  addressed to it (``shared.bus.reply_inbox``), where no service user may publish. Not nats-server's
  ``allow_responses``: a config reload (adding a worker) resets it and would cut every stream in flight.
- Replies: every service subscribes to its own inbox only (``_INBOX.<user>.>``: ``shared.bus.connect``
  takes the inbox prefix from the user in the URL), so no service reads another's replies (an admin
  reply can hold a new API key). A responder may publish into the inboxes of the users that ask it.
- JetStream and KV go through API subjects: each service may create and read the streams and buckets
  every service ensures at start (``shared.bus.ensure_all``), create consumers on the streams it reads,
  run its own durable consumer, and write (``$KV.<bucket>.>``, a worker ``$KV.<bucket>.<id>``) only the
  buckets it owns. Deleting or
  purging streams, or updating them (placement alone may update a stream whose configuration changed),
  is left to ``operator``.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from shared.bus import INBOX_PREFIX, inbox_prefix_for, worker_inbox
from shared.subjects import (
    ADMIN, BUCKETS, OPERATOR, PLACEMENT, SERVICE_USERS, STREAMS, SUBJECTS, USERS, WORKER, WORKER_USER_PREFIX,
    SLUG_RE, BucketSpec, Subject, check_token, worker_user,
)

ADMIN_SUBJECTS = ADMIN.pattern.split("{", 1)[0] + ">"  # warmserve.admin.> (forecaster verbs included)
JS_API = "$JS.API"


# ---- building blocks ---------------------------------------------------------------------------------

def kv_stream(bucket: BucketSpec) -> str:
    return f"KV_{bucket.name}"


def stream_of(subject: Subject) -> str:
    """The JetStream stream that stores ``subject``."""
    for spec in STREAMS:
        if subject.wildcard in spec.subjects or subject.pattern in spec.subjects:
            return spec.name
    raise ValueError(f"{subject.pattern} is not stored in any stream")


def inbox(user: str) -> str:
    """The user's reply inboxes (``shared.bus.connect`` uses this prefix for that user)."""
    return f"{inbox_prefix_for(user)}.>"


def worker_inbox_of(asker: str, worker_id: str) -> str:
    """The inboxes of ``asker``'s requests to worker ``worker_id`` (``shared.bus.reply_inbox``)."""
    return f"{worker_inbox(inbox_prefix_for(asker), worker_id)}.>"


ANY_WORKER_INBOX = worker_inbox(f"{INBOX_PREFIX}.*", ">")  # _INBOX.*.worker.>: where workers alone answer


def _ensure_all() -> list[str]:
    """What ``shared.bus.ensure_all`` asks: find, create (idempotent) and read every stream and bucket."""
    names = [s.name for s in STREAMS] + [kv_stream(b) for b in BUCKETS]
    return ([f"{JS_API}.STREAM.NAMES"]
            + [f"{JS_API}.STREAM.{verb}.{name}" for name in names for verb in ("CREATE", "INFO")])


def _read_stream(stream: str) -> list[str]:
    """Ephemeral ordered consumers on ``stream`` (KV watches, ``js.subscribe(ordered_consumer=True)``):
    create them, read their info (a KV watch does), and answer their flow control."""
    return [f"{JS_API}.CONSUMER.CREATE.{stream}", f"{JS_API}.CONSUMER.INFO.{stream}.*", f"$JS.FC.{stream}.>"]


def _read_kv(bucket: BucketSpec) -> list[str]:
    """Watch a bucket (KvMirror) and get single keys (direct or stream message get)."""
    stream = kv_stream(bucket)
    return _read_stream(stream) + [f"{JS_API}.DIRECT.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}.>",
                                   f"{JS_API}.STREAM.MSG.GET.{stream}"]


def _write_kv(bucket: BucketSpec, key: str = ">") -> list[str]:
    """Put, delete and purge keys of a bucket, or one key (KV writes are publishes on ``$KV.<bucket>.<key>``)."""
    return [f"$KV.{bucket.name}.{key}"]


def _durable(subject: Subject, name: str) -> list[str]:
    """Run the durable pull consumer ``name`` on the stream of ``subject`` (``shared.bus.consume``):
    (re)create it, read its info, fetch, and acknowledge."""
    stream = stream_of(subject)
    return [f"{JS_API}.CONSUMER.CREATE.{stream}.{name}", f"{JS_API}.CONSUMER.CREATE.{stream}.{name}.>",
            f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.{name}", f"{JS_API}.CONSUMER.INFO.{stream}.{name}",
            f"{JS_API}.CONSUMER.DELETE.{stream}.{name}", f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{name}",
            f"$JS.ACK.{stream}.{name}.>"]


def _perms(publish: list[str], subscribe: list[str], publish_deny: list[str] | None = None) -> dict:
    out: dict = {"publish": {"allow": list(dict.fromkeys(publish))},
                 "subscribe": {"allow": list(dict.fromkeys(subscribe))}}
    if publish_deny:
        out["publish"]["deny"] = list(publish_deny)
    return out


# ---- the table ---------------------------------------------------------------------------------------

# explicit for every service user: only operator publishes admin requests, and only a worker answers into
# inboxes addressed to it (``_INBOX.<asker>.worker.<id>.<unique>``, shared.bus.reply_inbox)
NOT_ADMIN = [ADMIN_SUBJECTS]
EXTRA_PUBLISH = {  # beyond the table: placement may update a stream whose configuration changed
    PLACEMENT: [f"{JS_API}.STREAM.UPDATE.{s.name}" for s in STREAMS],
}


def _name(subject: Subject, worker_id: str | None = None) -> str:
    """The subject's pattern: every identifier ``*``, but a worker's own id in place of ``{worker}``."""
    if not subject.tokens:
        return subject.pattern
    return subject.pattern.format(**{t: worker_id if t == "worker" and worker_id else "*" for t in subject.tokens})


def permissions_of(user: str, worker_id: str | None = None) -> dict:
    """A service user's permissions, from who publishes and subscribes what in ``shared/subjects.py``;
    for the worker role, those of the one worker ``worker_id`` (its own subjects, inbox and key)."""
    me = worker_user(worker_id) if user == WORKER else user  # the worker's own user and inbox
    publish = [_name(s, worker_id) for s in SUBJECTS if user in s.publishers]
    subscribe = [_name(s, worker_id) for s in SUBJECTS if user in s.subscribers]
    for s in SUBJECTS:  # a responder answers into the inboxes of whoever asks it (a worker: addressed to it)
        if s.reply is not None and user in s.subscribers:
            publish += [worker_inbox_of(p, worker_id) if user == WORKER else inbox(p) for p in s.publishers]
    publish += _ensure_all()
    for s in SUBJECTS:
        publish += [p for owner, name in s.durables if owner == user for p in _durable(s, name)]
        if user in s.readers:
            publish += _read_stream(stream_of(s))
    publish += [p for b in BUCKETS if user in b.readers for p in _read_kv(b)]
    publish += [p for b in BUCKETS if user in b.writers
                for p in _write_kv(b, worker_id if b.keyed_by_worker and worker_id
                                   else user if b.keyed_by_writer else ">")]
    publish += EXTRA_PUBLISH.get(user, [])
    deny = NOT_ADMIN + ([] if user == WORKER else [ANY_WORKER_INBOX])
    return _perms(publish, subscribe + [inbox(me)], deny)


def worker_permissions(worker_id: str) -> dict:
    """The permissions of worker ``worker_id``'s own user."""
    return permissions_of(WORKER, check_token(worker_id, "worker id"))


# the service users and operator; each worker's user is added for the workers a cluster has (users_for)
PERMISSIONS: dict[str, dict] = {**{u: permissions_of(u) for u in USERS if u not in (OPERATOR, WORKER)},
                                OPERATOR: _perms([">"], [">"])}


def users_for(workers: Iterable[str]) -> dict[str, dict]:
    """Every user of a cluster whose workers are ``workers`` (ids) with its permissions."""
    return {**PERMISSIONS, **{worker_user(w): worker_permissions(w) for w in workers}}

WHY = {
    "gateway": "sends inference (streamed replies), cancel and scale requests and demand samples; mirrors the "
               "catalog, workers and API keys buckets; writes no bucket; answers the gateway's admin verbs "
               "(replies into the operator's inbox)",
    "forecaster": "reads demand through its durable consumer, publishes forecasts, mirrors the catalog; answers "
                  "the forecaster's admin verbs (replies into the operator's inbox)",
    "placement": "reads forecasts, publishes plans and stores them in Postgres from its durable consumer; the only writer of the catalog, API keys, operator (drains, "
                 "pins) and placement buckets; answers admin verbs (replies into the operator's inbox); may update "
                 "a stream whose configuration changed",
    "orchestrator": "the only sender of worker commands; answers gateways' scale requests; reads worker events "
                    "through its durable consumer, demand and forecasts through ordered ones; mirrors workers, plan, "
                    "catalog and operator holds",
    WORKER: "worker {id}: serves its own inference and commands (replies only into inboxes addressed to it), "
            "publishes its own events and its own key in the workers bucket (which only workers write)",
    OPERATOR: "admin requests and anything else an operator needs (the CLI, warmserve up, tests)",
}


# ---- passwords and rendering -------------------------------------------------------------------------

@dataclass(frozen=True)
class NatsUsers:
    """Each user's password."""

    passwords: dict[str, str]

    def password(self, user: str) -> str:
        return self.passwords[user]

    def url(self, base: str, user: str) -> str:
        return with_user(base, user, self.passwords[user])

    def worker_url(self, base: str, worker_id: str) -> str:
        return self.url(base, worker_user(worker_id))

    @property
    def workers(self) -> tuple[str, ...]:
        """The ids of the workers that have a user."""
        return workers_of(self.passwords)

    @classmethod
    def load_or_create(cls, path: Path, workers: Iterable[str] = (), *, keep_workers: bool = False) -> NatsUsers:
        """Passwords kept in ``path`` (mode 600), created on first use: a restarted cluster keeps them.
        The service users, operator, and one user per worker in ``workers`` (and, with ``keep_workers``, the
        workers the file already has); other users the file holds (other workers, the shared worker user of
        older versions) are dropped. A file from an older version is rewritten with the missing users added;
        an operator password it holds is kept."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        known = data.get("users") if isinstance(data.get("users"), dict) else {}
        if isinstance(data.get("operator_password"), str):  # the two-user file (operator, service)
            known = {OPERATOR: data["operator_password"], **known}
        kept = [w for w in workers_of(known) if SLUG_RE.fullmatch(w)] if keep_workers else []
        workers = [*kept, *workers]
        wanted = [u for u in USERS if u != WORKER] + [worker_user(w) for w in dict.fromkeys(workers)]
        passwords = {u: known[u] if isinstance(known.get(u), str) and known[u] else secrets.token_urlsafe(24)
                     for u in wanted}
        if passwords != known or set(data) != {"users"}:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"users": passwords}, f)
            os.replace(tmp, path)
        os.chmod(path, 0o600)
        return cls(passwords)


def workers_of(users: Iterable[str]) -> tuple[str, ...]:
    """The worker ids among NATS user names (``worker-<id>``; no service user starts so)."""
    return tuple(u[len(WORKER_USER_PREFIX):] for u in users if u.startswith(WORKER_USER_PREFIX))


def env_password(user: str) -> str:
    """The environment reference docker compose's nats.conf uses for ``user``'s password
    (``worker-0``'s: ``$WARMSERVE_NATS_WORKER_WORKER_0_PASSWORD``)."""
    return f"$WARMSERVE_NATS_{user.upper().replace('-', '_')}_PASSWORD"


def authorization_block(passwords: dict[str, str]) -> str:
    """The ``authorization`` section of a nats-server config: the service users, operator and the workers
    named in ``passwords`` (``worker-<id>``) with each user's password (a value starting with ``$`` is an
    environment reference)."""
    users = users_for(workers_of(passwords))
    missing, unknown = set(users) - set(passwords), set(passwords) - set(users)
    if missing or unknown:
        raise ValueError(f"no password for NATS user(s) {sorted(missing)}" if missing
                         else f"unknown NATS user(s) {sorted(unknown)}")

    def value(v: str) -> str:
        return v if v.startswith("$") else json.dumps(v)

    def subjects(items: list[str], indent: str) -> list[str]:
        if len(items) <= 2:
            return ["[" + ", ".join(json.dumps(s) for s in items) + "]"]
        return ["["] + [f"{indent}  {json.dumps(s)}" for s in items] + [f"{indent}]"]

    lines = ["authorization {", "  users = ["]
    for user, perms in users.items():
        why = WHY[user] if user in WHY else WHY[WORKER].format(id=user[len(WORKER_USER_PREFIX):])
        lines.append(f"    # {user}: {why}")
        lines.append(f"    {{user: {json.dumps(user)}, password: {value(passwords[user])}, permissions: {{")
        for direction in ("publish", "subscribe"):
            lines.append(f"      {direction}: {{")
            for kind in ("allow", "deny"):
                if perms[direction].get(kind):
                    body = subjects(perms[direction][kind], "        ")
                    lines.append(f"        {kind}: {body[0]}")
                    lines.extend(body[1:])
            lines.append("      }")
        lines.append("    }}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ServerTls:
    """nats-server's TLS for clients: its certificate and key, and a CA when it also verifies clients'
    certificates (then every client needs one: ``WARMSERVE_NATS_TLS_CERT``)."""

    cert_file: str
    key_file: str
    ca_file: str | None = None


# Clients that start TLS at once (``shared.bus.connect`` does) get it at once; others (the nats CLI) get the
# plain INFO after this long and must then upgrade: TLS is required either way.
HANDSHAKE_FIRST_FALLBACK = "300ms"


def tls_block(tls: ServerTls) -> str:
    """A nats-server ``tls`` section: TLS required on the client port."""
    lines = ["tls {", f"  cert_file: {json.dumps(tls.cert_file)}", f"  key_file: {json.dumps(tls.key_file)}"]
    if tls.ca_file:
        lines += [f"  ca_file: {json.dumps(tls.ca_file)}", "  verify: true"]
    lines += [f"  handshake_first: {json.dumps(HANDSHAKE_FIRST_FALLBACK)}", "  timeout: 2", "}"]
    return "\n".join(lines) + "\n"


def server_config(port: int, store_dir: Path, users: NatsUsers, host: str = "127.0.0.1",
                  tls: ServerTls | None = None, pid_file: Path | None = None) -> str:
    return (f"host: {json.dumps(host)}\nport: {port}\n"
            + (f"pid_file: {json.dumps(str(pid_file))}\n" if pid_file else "")  # to reload when a worker joins
            + f"jetstream {{ store_dir: {json.dumps(str(store_dir))} }}\n"
            + (tls_block(tls) if tls else "")
            + authorization_block(users.passwords))


PID_FILE = "nats-server.pid"
COMPOSE_WORKERS = ("worker-0",)  # the workers docker-compose.yml runs


def compose_config(workers: Iterable[str] = COMPOSE_WORKERS) -> str:
    """``infra/nats/nats.conf``: the same users and rules, one user per worker in ``workers``, passwords
    from the environment."""
    workers = tuple(workers)
    return (
        "# nats-server for docker compose: JetStream, monitoring, and the WarmServe users.\n"
        "# One user per service, each allowed only the subjects it uses; operator may publish admin requests;\n"
        f"# one user per worker (worker-<id>), allowed only its own subjects and key: {', '.join(workers)}.\n"
        "# Passwords come from the environment (docker-compose.yml passes them; change them).\n"
        "# Generated by `python -m tooling.localcluster.nats_auth` from tooling/localcluster/nats_auth.py\n"
        "# (a test keeps the two equal); for other workers: `... nats_auth --workers worker-0 worker-1`.\n"
        "port: 4222\n"
        "http_port: 8222\n"
        'jetstream { store_dir: "/data" }\n'
        + authorization_block({u: env_password(u) for u in users_for(workers)}))


# Where infra/compose.tls.yml mounts the certificates (WARMSERVE_NATS_TLS_DIR) in the nats container.
COMPOSE_TLS = ServerTls(cert_file="/etc/nats/tls/server-cert.pem", key_file="/etc/nats/tls/server-key.pem")


def compose_tls_config() -> str:
    """``infra/nats/nats-tls.conf``: ``nats.conf`` with TLS required (infra/compose.tls.yml switches to it)."""
    return (
        "# nats-server for docker compose with TLS (docker compose -f docker-compose.yml -f infra/compose.tls.yml):\n"
        "# everything in nats.conf, and TLS required on the client port with the certificate from\n"
        "# WARMSERVE_NATS_TLS_DIR. Generated by `python -m tooling.localcluster.nats_auth tls` (a test keeps the two equal).\n"
        "include ./nats.conf\n"
        + tls_block(COMPOSE_TLS))


def with_user(url: str, user: str, password: str) -> str:
    """``nats://host:port`` with credentials in it (passwords are URL-quoted)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def without_user(url: str) -> str:
    """A URL safe to print."""
    parts = urlsplit(url)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


__all__ = ["ADMIN_SUBJECTS", "ANY_WORKER_INBOX", "COMPOSE_WORKERS", "INBOX_PREFIX", "NatsUsers", "OPERATOR",
           "PERMISSIONS", "SERVICE_USERS", "USERS", "WHY", "users_for", "worker_inbox_of", "worker_permissions",
           "worker_user", "workers_of",
           "ServerTls", "authorization_block", "compose_config", "compose_tls_config", "env_password", "inbox",
           "server_config", "tls_block", "with_user", "without_user"]

if __name__ == "__main__":
    if sys.argv[1:2] == ["--workers"]:
        sys.stdout.write(compose_config(check_token(w, "worker id") for w in sys.argv[2:]))
    else:
        sys.stdout.write(compose_tls_config() if sys.argv[1:] == ["tls"] else compose_config())
