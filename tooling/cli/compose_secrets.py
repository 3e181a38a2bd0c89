"""``warmserve compose-secrets``: the ``.env`` that docker compose needs, with a random value for every
secret docker-compose.yml requires (``${NAME:?...}``; the file has no defaults, so compose refuses to start
without them). Written once with mode 600; values already there are kept, so running it again after the
compose file gains a secret adds only that one."""

from __future__ import annotations

import os
import re
import secrets
import string
from pathlib import Path

# ${NAME:?message} or ${NAME?message}: compose stops with the message when NAME is unset (or empty, with ':')
REQUIRED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?[^}]*\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")
_ALPHABET = string.ascii_letters + string.digits


def required_secrets(compose_text: str) -> list[str]:
    """The secrets a compose file requires, in order of first use."""
    return list(dict.fromkeys(n for n in REQUIRED.findall(compose_text) if SECRET_NAME.search(n)))


def new_secret(length: int = 32) -> str:
    """Letters and digits (about 190 bits), starting with a letter: safe unquoted in a URL, in .env and as a
    nats-server ``$VARIABLE`` (which would read a leading digit as a number)."""
    return secrets.choice(string.ascii_letters) + "".join(secrets.choice(_ALPHABET) for _ in range(length - 1))


def _values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            values[m.group(1)] = m.group(2).strip().strip("'\"")
    return values


def ensure_env_file(path: Path, names: list[str]) -> list[str]:
    """Add a random value for each of ``names`` that ``path`` lacks (or holds empty) and make the file mode
    600; returns the names added. Other lines, comments and values are kept as they are."""
    text = path.read_text() if path.exists() else ""
    have = _values(text)
    missing = [n for n in names if not have.get(n)]
    if missing:
        kept = [line for line in text.splitlines() if not ((m := _LINE.match(line)) and m.group(1) in missing)]
        if not text:
            kept = ["# docker compose secrets (warmserve compose-secrets): keep this file private, never commit it"]
        body = "\n".join(kept + [f"{n}={new_secret()}" for n in missing]) + "\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    if path.exists():
        os.chmod(path, 0o600)
    return missing


def cmd_compose_secrets(a) -> int:
    compose = Path(a.compose)
    if not compose.is_file():
        raise SystemExit(f"error: no compose file at {compose} (run this in the project folder, or pass --compose)")
    names = required_secrets(compose.read_text())
    env_file = Path(a.env_file) if a.env_file else compose.parent / ".env"
    added = ensure_env_file(env_file, names)
    if added:
        print(f"{env_file}: added {len(added)} secret(s) (mode 600): {', '.join(added)}")
    else:
        print(f"{env_file}: all {len(names)} secrets were already set (mode 600)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compose-secrets", help="write .env for docker compose: a random password for every NATS "
                                               "user and Postgres (mode 600; existing values are kept)")
    p.add_argument("--compose", default="docker-compose.yml", help="the compose file (default ./docker-compose.yml)")
    p.add_argument("--env-file", help="where to write (default: .env beside the compose file, where compose reads it)")
    p.set_defaults(func=cmd_compose_secrets)
