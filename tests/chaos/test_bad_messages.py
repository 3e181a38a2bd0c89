"""Malformed, oversized and unauthorized NATS messages to a running cluster: clear error replies (or
nothing, where the server refuses them), no crash, no state change. Messages beyond the server's
max_payload never reach a service: the server refuses them and drops the connection that sent them."""

import asyncio
import json
from urllib.parse import urlsplit

import nats
import pytest

from shared import bus
from tests.chaos.conftest import cli, service_process, workers
from tests.helpers import request_raw

pytestmark = pytest.mark.chaos

GARBAGE = [b"\xff\xfe\x00garbage", b"{not json", b"[]", b'{"args": 5}', b'{"kind": "explode", "model": "x"}',
           json.dumps({"args": {"slug": "Bad Slug!", "path": "/x"}}).encode(), b"",
           # big, but within max_payload (1 MiB): parsed and refused like any other bad request
           json.dumps({"args": {"slug": "x" * 900_000, "path": "/x"}, "kind": "prewarm", "model": "y" * 900_000}
                      ).encode()[:1_000_000], json.dumps({"args": {"rates": [0.0] * 150_000}}).encode()]
MAX_PAYLOAD = 1024 * 1024  # nats-server's default, which the local cluster and infra/ keep


async def replies(url: str, subject: str, payloads: list[bytes]) -> list[dict | None]:
    nc = await bus.connect(url, "chaos-bad-messages", deadline_s=10)
    out = []
    try:
        for data in payloads:
            try:
                out.append(json.loads((await request_raw(nc, subject, data, timeout=5)).data))
            except nats.errors.TimeoutError:
                out.append(None)
    finally:
        await nc.close()
    return out


async def raw_oversized_publish(url: str, subject: str) -> bytes:
    """Publish one message beyond max_payload over a raw connection (nats-py refuses to send one):
    what the server answers before it drops the connection."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        await reader.readline()  # INFO
        connect = {"user": parts.username, "pass": parts.password, "verbose": False, "pedantic": False}
        writer.write(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"PONG")
        # the size is in the PUB line: the server refuses it there, before reading the payload
        writer.write(f"PUB {subject} {MAX_PAYLOAD + 1}\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # to the server's close
    finally:
        writer.close()


def snapshot(env) -> tuple:
    models = json.loads(cli(env, "model", "list", "--json").stdout)
    return sorted(m["slug"] for m in models), workers(env)


def test_malformed_and_oversized_admin_and_worker_messages_get_errors_and_change_nothing(cluster):
    env, url, up = cluster["env"], cluster["nats_url"], cluster["up"]
    before = snapshot(env)
    pids = {name: service_process(up, name).pid for name in ("placement", "forecaster", "gateway")}
    worker_pid = service_process(up, "gpu_worker", "worker-0").pid
    for subject in ("warmserve.admin.model-register", "warmserve.admin.forecast.import"):
        for reply in asyncio.run(replies(url, subject, GARBAGE)):
            assert reply is not None and reply["ok"] is False, reply
            assert reply["error"]["code"] and reply["error"]["message"], reply
    commander = service_process(up, "prewarm_orchestrator").environ()["WARMSERVE_NATS_URL"]  # who may command workers
    for reply in asyncio.run(replies(commander, "warmserve.worker.worker-0.cmd", GARBAGE)):
        assert reply is not None and reply["ok"] is False and reply["error"]["code"], reply
    answer = asyncio.run(raw_oversized_publish(url, "warmserve.admin.model-register"))
    assert b"-ERR 'Maximum Payload Violation'" in answer, answer
    assert snapshot(env) == before
    assert {name: service_process(up, name).pid for name in pids} == pids  # nothing crashed (or restarted)
    assert service_process(up, "gpu_worker", "worker-0").pid == worker_pid
    assert cluster["client"].models.list().data  # still serving


def test_service_credentials_cannot_send_admin_or_worker_commands(cluster):
    """The gateway's NATS user: an admin request or a worker command sent with it goes nowhere."""
    env, up = cluster["env"], cluster["up"]
    gateway_url = service_process(up, "gateway").environ()["WARMSERVE_NATS_URL"]
    before = snapshot(env)
    remove = json.dumps({"args": {"slug": "tiny-llama"}}).encode()
    evict = json.dumps({"kind": "evict", "model": "tiny-llama", "command_id": "chaos-evict"}).encode()
    log = cluster["state"] / "logs" / "nats-server.log"
    seen = log.read_text()
    assert asyncio.run(replies(gateway_url, "warmserve.admin.model-remove", [remove])) == [None]
    assert asyncio.run(replies(gateway_url, "warmserve.worker.worker-0.cmd", [evict])) == [None]
    assert snapshot(env) == before
    refused = log.read_text()[len(seen):]  # the server refused both, rather than nobody answering
    for subject in ("warmserve.admin.model-remove", "warmserve.worker.worker-0.cmd"):
        assert any("user:gateway" in line and "Publish Violation" in line and subject in line
                   for line in refused.splitlines()), refused
