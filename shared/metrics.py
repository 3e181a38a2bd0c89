"""Prometheus metrics and health of the control-plane services (placement, orchestrator, forecaster).

The gateway has its own registry and serves it on its HTTP port (``services/gateway/metrics.py``); these
services have no HTTP server, so ``serve`` starts one on ``WARMSERVE_METRICS_PORT`` when that is set, with
``/metrics``, ``/healthz`` (the process answers) and ``/readyz`` (it can read its leader lease in NATS, as
leader or standby: a standby is ready to take over). A probe gets JSON naming the role and the leader.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

DEAD_LETTERS = Counter(
    "warmserve:dead_letters", "Messages a durable consumer gave up on and moved to WARMSERVE_DEADLETTER "
    "(alert on any increase: history is missing until an operator publishes them again)",
    ["service", "stream"], registry=REGISTRY)

SKIPPED_ROWS = Gauge(
    "warmserve:sync_skipped_rows", "Rows of a Postgres table (models, api_keys) placement's last sync could not "
    "publish to the gateways (alert on any above 0: the log names each row and why)", ["table"], registry=REGISTRY)


LEADER = Gauge("warmserve:leader", "1 while this replica leads its control-plane role, 0 while it stands by",
               ["role"], registry=REGISTRY)


def health_app(ready: Callable[[], tuple[bool, dict]]):
    """A WSGI app: ``/metrics`` from ``REGISTRY``; ``/healthz`` always 200 while the process serves;
    ``/readyz`` 200 or 503 with ``ready()``'s details as JSON.

    ``/metrics`` is always Prometheus's text format, whatever the scraper accepts: prometheus_client writes
    OpenMetrics with the names' colons escaped to underscores, and Prometheus asks for OpenMetrics first, so
    ``warmserve:leader`` was stored as ``warmserve_leader`` and no dashboard query found it."""

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, detail = (True, {}) if path == "/healthz" else ready()
            body = json.dumps({"ok": ok, **detail}).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"/metrics, /healthz or /readyz\n"]
        body = generate_latest(REGISTRY)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]
    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes every few seconds: no log line each
        return


def serve(host: str, port: int, ready: Callable[[], tuple[bool, dict]] | None = None) -> WSGIServer | None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a background thread (0: not at all)."""
    if not port:
        return None
    try:
        server = make_server(host, port, health_app(ready or (lambda: (True, {}))), handler_class=_QuietHandler,
                             server_class=ThreadingWSGIServer)
    except OSError as exc:  # taken, or an address this host does not have
        raise SystemExit(f"cannot serve metrics on {host}:{port} (WARMSERVE_METRICS_HOST/PORT): {exc}") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", host, port)
    return server
