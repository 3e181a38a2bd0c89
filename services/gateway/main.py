"""Gateway process: uvicorn serving the app (uvicorn handles SIGINT/SIGTERM gracefully)."""

from __future__ import annotations

import uvicorn

from services.gateway.app import create_app
from shared.settings import GatewaySettings, load_settings
from shared.telemetry import configure_logging, setup_tracing


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level)
    setup_tracing("gateway", settings.otlp_endpoint)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
