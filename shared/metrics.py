"""Prometheus metrics of the control-plane services (placement, orchestrator, forecaster).

The gateway has its own registry and serves it on its HTTP port (``services/gateway/metrics.py``); these
services have no HTTP server, so ``serve`` starts one on ``WARMSERVE_METRICS_PORT`` when that is set.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

DEAD_LETTERS = Counter(
    "warmserve_dead_letters", "Messages a durable consumer gave up on and moved to WARMSERVE_DEADLETTER "
    "(alert on any increase: history is missing until an operator publishes them again)",
    ["service", "stream"], registry=REGISTRY)

SKIPPED_ROWS = Gauge(
    "warmserve_sync_skipped_rows", "Rows of a Postgres table (models, api_keys) placement's last sync could not "
    "publish to the gateways (alert on any above 0: the log names each row and why)", ["table"], registry=REGISTRY)


def serve(host: str, port: int) -> None:
    """Serve ``REGISTRY`` as ``/metrics`` on ``host:port`` in a background thread (0: not at all)."""
    if not port:
        return
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:  # taken, or an address this host does not have
        raise SystemExit(f"cannot serve metrics on {host}:{port} (WARMSERVE_METRICS_HOST/PORT): {exc}") from None
    log.info("metrics on http://%s:%d/metrics", host, port)
