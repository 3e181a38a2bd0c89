"""Malformed and unauthorized NATS messages to a running cluster: clear error replies (or nothing, where
the server refuses them), no crash, no state change. (Oversized messages never reach a service: the
server refuses anything beyond its max_payload, and clients enforce the limit it advertises.)"""

import asyncio
import json

import nats
import pytest

from shared import bus
from tests.chaos.conftest import cli, service_process, workers

pytestmark = pytest.mark.chaos

GARBAGE = [b"\xff\xfe\x00garbage", b"{not json", b"[]", b'{"args": 5}', b'{"kind": "explode", "model": "x"}',
           json.dumps({"args": {"slug": "Bad Slug!", "path": "/x"}}).encode(), b""]


async def replies(url: str, subject: str, payloads: list[bytes]) -> list[dict | None]:
    nc = await bus.connect(url, "chaos-bad-messages", deadline_s=10)
    out = []
    try:
        for data in payloads:
            try:
                out.append(json.loads((await nc.request(subject, data, timeout=5)).data))
            except nats.errors.TimeoutError:
                out.append(None)
    finally:
        await nc.close()
    return out


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
