"""Prometheus metrics of the prewarm orchestrator (on ``WARMSERVE_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter

from shared.messages import CommandKind
from shared.metrics import REGISTRY

COMMANDS = Counter("warmserve:orchestrator_commands", "Commands sent to workers, by kind and result (ok, or the "
                   "error code: worker_lost, timeout, no_memory, ...)", ["kind", "result"], registry=REGISTRY)
RETRIES = Counter("warmserve:orchestrator_command_retries", "Failed commands, each tried again (by the "
                  "orchestrator after a back-off, or by the gateway that asked for the scale-up)", ["kind"], registry=REGISTRY)
DECISIONS = Counter("warmserve:autoscaler_decisions", "Instances added (scale_up, with how: warm, prewarm_hit or "
                    "cold), handed over (handover: a lightly used instance's device given to a queued model) and "
                    "removed (scale_down)", ["model", "decision", "outcome"], registry=REGISTRY)


def decision(kind: CommandKind, reason: str, scale_up: bool, replace_active: bool) -> str | None:
    """What an orchestrator command means for the autoscaler's counts (None: not a scaling decision)."""
    if scale_up:
        return "handover" if replace_active else "scale_up"
    if kind is CommandKind.DEACTIVATE and reason.startswith("autoscaler"):
        return "scale_down"
    return None
