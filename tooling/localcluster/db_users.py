"""The local cluster's database users: one login per service that uses Postgres (placement, orchestrator,
forecaster), each in its role from migration 0005, with a password generated once and kept in the state
folder (mode 600, like the NATS users'). The gateway and the workers get no database URL at all."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from shared.db.roles import SERVICES, ensure_login

# service module (services/<module>) -> its database role
ROLE_OF = {"placement": "placement", "prewarm_orchestrator": "orchestrator", "forecaster": "forecaster"}


def load_or_create_passwords(path: Path) -> dict[str, str]:
    """Each service's password, kept in ``path``; missing or unreadable ones are generated (and kept)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    known = data if isinstance(data, dict) else {}
    passwords = {s: known[s] if isinstance(known.get(s), str) and known[s] else secrets.token_urlsafe(24)
                 for s in SERVICES}
    if passwords != known:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(passwords, f)
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    return passwords


def service_urls(owner_url: str, path: Path) -> dict[str, str]:
    """Create or refresh each service's login in the (migrated) database of ``owner_url``; returns the URL
    each service connects with, by database role."""
    return {service: ensure_login(owner_url, service, password)
            for service, password in load_or_create_passwords(path).items()}
