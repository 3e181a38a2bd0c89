"""Where the CLI finds the cluster (environment, else what ``warmserve up`` wrote) and its one admin request
helper; the subcommand modules import it, never ``main`` (which imports them)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _cluster_file() -> dict:
    """What a running ``warmserve up`` wrote about itself (URLs), if anything."""
    state = Path(os.environ.get("WARMSERVE_STATE_DIR", ".warmserve"))
    try:
        return json.loads((state / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}


def _nats_url() -> str:
    """Operator credentials first: admin subjects refuse service users."""
    return (os.environ.get("WARMSERVE_OPERATOR_NATS_URL") or os.environ.get("WARMSERVE_NATS_URL")
            or _cluster_file().get("nats_url") or "nats://127.0.0.1:4222")


def _database_url() -> str:
    return (os.environ.get("WARMSERVE_DATABASE_URL") or _cluster_file().get("database_url")
            or "postgresql://postgres@127.0.0.1:5432/warmserve")


def _gateway_url() -> str:
    return os.environ.get("WARMSERVE_GATEWAY_URL") or _cluster_file().get("gateway_url") or "http://127.0.0.1:8080"


async def _admin(verb: str, args: dict, forecaster: bool = False, timeout: float = 15) -> object:
    """An admin request (placement's verbs, or the forecaster's); errors exit with the reply's code."""
    from shared import bus
    from shared.admin import AdminClient, AdminError

    nc = await bus.connect(_nats_url(), "warmserve-cli", deadline_s=5)
    try:
        return await AdminClient(nc).call(verb, args, forecaster=forecaster, timeout=timeout)
    except AdminError as exc:
        raise SystemExit(f"error ({exc.code}): {exc}") from None
    finally:
        await nc.close()
