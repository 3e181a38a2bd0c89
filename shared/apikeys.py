"""API keys: generated once, stored and compared only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "ws-"


def new_key() -> str:
    return PREFIX + secrets.token_hex(24)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
