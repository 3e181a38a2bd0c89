"""``warmserve deadletters``: the messages services' durable consumers gave up on, with why.

They are read from the ``WARMSERVE_DEADLETTER`` stream with an ordered consumer, which leaves nothing behind;
each keeps its original payload, so an operator can fix it and publish it again on its subject.
"""

from __future__ import annotations

import asyncio
import json
import time


async def read(nats_url: str, service: str | None = None, limit: int = 50) -> list[dict]:
    """The newest ``limit`` dead letters (of one service, or all), oldest first, with their stream sequence."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from shared import bus
    from shared.messages import DeadLetter
    from shared.subjects import DEAD_LETTER

    nc = await bus.connect(nats_url, "warmserve-cli", deadline_s=5)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info("WARMSERVE_DEADLETTER")
        except Exception:  # never created: no service has run this version yet
            return []
        last = info.state.last_seq
        if not info.state.messages:
            return []
        subject = DEAD_LETTER.format(service=service) if service else DEAD_LETTER.wildcard
        start = max(last - limit + 1, info.state.first_seq)  # (fewer when other services' letters are among them)
        sub = await js.subscribe(subject, ordered_consumer=True, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=info.state.first_seq if service else start))
        out: list[dict] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except Exception:
                    break
                try:
                    letter = DeadLetter.decode(msg.data).model_dump()
                except ValueError:
                    letter = {"undecodable": msg.data[:200].decode(errors="replace")}
                out.append({"seq": msg.metadata.sequence.stream, **letter})
                if msg.metadata.sequence.stream >= last:
                    break
        finally:
            await sub.unsubscribe()
        return out[-limit:]
    finally:
        await nc.close()


def cmd_deadletters(a) -> int:
    from tooling.cli.client import _nats_url

    letters = asyncio.run(read(_nats_url(), a.service, a.limit))
    if a.json:
        print(json.dumps(letters, indent=2))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    for d in letters:
        if "undecodable" in d:
            print(f"#{d['seq']}: undecodable dead letter {d['undecodable']!r}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d["failed_at_s"]))
        print(f"#{d['seq']} {when} {d['service']}/{d['consumer']}: {d['stream']} #{d['stream_seq']} on {d['subject']}, "
              f"{d['delivered']} deliver{'y' if d['delivered'] == 1 else 'ies'}; {d['error']['code']}: "
              f"{d['error']['message']}")
        payload = d["payload"] if not d["payload_base64"] else f"(base64) {d['payload']}"
        if d.get("payload_truncated"):
            payload = f"(first part of {d['payload_bytes']} bytes) {payload}"
        print(f"    {payload[:300]}{'...' if len(payload) > 300 else ''}")
    return 0


def add_parser(sub) -> None:
    dl = sub.add_parser("deadletters", help="messages services gave up on (they cannot be stored), with the error")
    dl.add_argument("--service", choices=("placement", "orchestrator", "forecaster"),
                    help="only this service's")
    dl.add_argument("--limit", type=int, default=50, help="the newest this many")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=cmd_deadletters)
