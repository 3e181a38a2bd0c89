"""The gateway keeps idle connections open longer than clients' pools do, so the client always closes an
idle connection first. When the server closes first, a request the client sends on that connection at the
same moment is answered with a reset (seen in CI as openai.APIConnectionError mid-test)."""

import httpx
import openai

from services.gateway.main import server_config
from shared.settings import GatewaySettings


def client_pool_expiry_s() -> float:
    """How long the official openai client keeps an idle connection in its pool."""
    client = openai.OpenAI(base_url="http://127.0.0.1:1/v1", api_key="x")
    pool = client._client._transport._pool
    return pool._keepalive_expiry if pool._keepalive_expiry is not None else httpx.Limits().keepalive_expiry


def test_the_gateway_outlasts_the_openai_clients_idle_connections():
    config = server_config(app=None, settings=GatewaySettings())
    assert config.timeout_keep_alive > client_pool_expiry_s()
    assert config.timeout_keep_alive >= 60  # and a load balancer's usual idle timeout


def test_the_keep_alive_is_the_operators_setting():
    assert server_config(app=None, settings=GatewaySettings(keep_alive_s=90)).timeout_keep_alive == 90
