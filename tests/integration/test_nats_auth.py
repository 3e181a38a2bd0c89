"""Admin subjects need operator credentials: the local cluster's nats-server users, on a real server."""

import asyncio
import subprocess

import nats
import pytest

from shared import bus
from shared.localcluster.infra import nats_server_binary
from shared.localcluster.nats_auth import NatsUsers, server_config, with_user, without_user
from shared.localcluster.processes import free_port, wait_port

pytestmark = pytest.mark.integration


@pytest.fixture
def secured(tmp_path):
    users = NatsUsers.load_or_create(tmp_path / "users.json")
    assert NatsUsers.load_or_create(tmp_path / "users.json") == users  # kept across restarts
    assert oct((tmp_path / "users.json").stat().st_mode & 0o777) == "0o600"
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(server_config(port, tmp_path / "js", users))
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert wait_port(port, 10.0, proc=proc)
    base = f"nats://127.0.0.1:{port}"
    yield base, users
    proc.terminate()
    proc.wait(10)


async def test_only_operators_publish_admin_requests(secured):
    base, users = secured
    operator = await bus.connect(with_user(base, "operator", users.operator_password), "op")
    service = await bus.connect(with_user(base, "service", users.service_password), "svc")
    try:
        seen = []

        async def answer(msg):  # a service (placement) answers admin requests
            seen.append(msg.subject)
            await msg.respond(b"ok")

        await service.subscribe("warmserve.admin.*", cb=answer)
        await service.flush()
        reply = await operator.request("warmserve.admin.model-list", b"{}", timeout=5)
        assert reply.data == b"ok"
        with pytest.raises(nats.errors.TimeoutError):  # the server drops a service's admin request
            await service.request("warmserve.admin.model-remove", b"{}", timeout=1)
        assert seen == ["warmserve.admin.model-list"]
        # everything else services do still works for them, JetStream included
        js = service.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        assert (await js.publish("t.x", b"1")).seq == 1
    finally:
        await operator.close()
        await service.close()


async def test_unknown_or_missing_credentials_are_refused_at_once(secured):
    base, users = secured
    for url in (base, with_user(base, "service", "wrong")):
        with pytest.raises(bus.BusError) as exc_info:
            await asyncio.wait_for(bus.connect(url, "intruder", deadline_s=30), 10)  # no 30 s of retries
        assert exc_info.value.code == "nats_unauthorized" and "wrong" not in str(exc_info.value)


def test_credentials_never_appear_in_printed_urls():
    url = with_user("nats://127.0.0.1:4222", "operator", "s3cr/t")
    assert url == "nats://operator:s3cr%2Ft@127.0.0.1:4222"
    assert without_user(url) == bus.redact(url) == "nats://127.0.0.1:4222"


def test_compose_nats_config_has_the_same_users_and_rules():
    from pathlib import Path

    from shared.localcluster.nats_auth import authorization_block

    conf = (Path(__file__).parents[2] / "infra" / "nats" / "nats.conf").read_text()
    assert authorization_block("$WARMSERVE_NATS_OPERATOR_PASSWORD", "$WARMSERVE_NATS_SERVICE_PASSWORD") in conf
