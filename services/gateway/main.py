"""Gateway process: uvicorn serving the app, with a shutdown that ends requests clearly.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits ``shutdown_grace_s`` for the
requests in flight; the gateway is told first, so it stops being ready at once and, just before the
grace is over, ends what is still running with a 503 or an error event instead of a cut connection.
"""

from __future__ import annotations

import uvicorn

from services.gateway.app import Gateway, create_app
from shared.settings import GatewaySettings, load_settings
from shared.telemetry import configure_logging, setup_tracing


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway):
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets=None) -> None:
        self.gateway.begin_drain()
        await super().shutdown(sockets)


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(settings.log_level)
    setup_tracing("gateway", settings.otlp_endpoint)
    app = create_app(settings)
    DrainingServer(server_config(app, settings), app.state.gateway).run()


def server_config(app, settings: GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                          timeout_graceful_shutdown=settings.shutdown_grace_s,
                          timeout_keep_alive=settings.keep_alive_s)


if __name__ == "__main__":
    main()
