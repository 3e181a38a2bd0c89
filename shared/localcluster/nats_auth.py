"""NATS users for a cluster: operator credentials for the admin subjects, service credentials for the rest.

Two users, so that admin commands need operator credentials: ``operator`` may do anything; ``service``
(every WarmServe service) may do anything but publish on ``warmserve.admin.>`` (it may subscribe there:
placement and the forecaster answer admin requests). Finer per-service permissions are a further step.
The same rules are in ``infra/nats/nats.conf`` for docker compose.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

ADMIN_SUBJECTS = "warmserve.admin.>"


@dataclass(frozen=True)
class NatsUsers:
    operator_password: str
    service_password: str

    @classmethod
    def load_or_create(cls, path: Path) -> NatsUsers:
        """Passwords kept in ``path`` (mode 600), created on first use: a restarted cluster keeps them."""
        try:
            data = json.loads(path.read_text())
            return cls(data["operator_password"], data["service_password"])
        except (OSError, ValueError, KeyError):
            users = cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"operator_password": users.operator_password,
                                        "service_password": users.service_password}))
            os.chmod(path, 0o600)
            return users


def authorization_block(operator_password: str, service_password: str) -> str:
    """The ``authorization`` section of a nats-server config (values may be ``$ENV_VAR`` references)."""
    def value(v: str) -> str:
        return v if v.startswith("$") else json.dumps(v)

    return (
        "authorization {\n"
        "  users = [\n"
        f"    {{user: operator, password: {value(operator_password)}, "
        "permissions: {publish: \">\", subscribe: \">\"}}\n"
        f"    {{user: service, password: {value(service_password)}, "
        f"permissions: {{publish: {{allow: \">\", deny: [\"{ADMIN_SUBJECTS}\"]}}, subscribe: \">\"}}}}\n"
        "  ]\n"
        "}\n"
    )


def server_config(port: int, store_dir: Path, users: NatsUsers, host: str = "127.0.0.1") -> str:
    return (f"host: {json.dumps(host)}\nport: {port}\n"
            f"jetstream {{ store_dir: {json.dumps(str(store_dir))} }}\n"
            + authorization_block(users.operator_password, users.service_password))


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
