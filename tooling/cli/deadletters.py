"""``warmserve deadletters``: the messages services' durable consumers gave up on, with why.

They are read from the ``WARMSERVE_DEADLETTER`` stream with an ordered consumer, which leaves nothing behind;
each keeps its original payload, so an operator can fix it and publish it again on its subject.
"""

from __future__ import annotations

import asyncio
import json
import time


async def read(nats_url: str, service: str | None = None, limit: int = 50, counts: dict | None = None) -> list[dict]:
    """The newest ``limit`` dead letters (of one service, or all), oldest first, with their stream sequence.
    Reads from about the ``limit``-th newest of them, not the stream's whole history, and stops at the last
    one for its subject (the consumer's ``num_pending`` reaching 0), not at the stream's last message, which
    may be another service's. ``counts["read"]``: how many letters it read."""
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
        if not info.state.messages or limit < 1:
            return []
        subject = DEAD_LETTER.format(service=service) if service else DEAD_LETTER.wildcard
        first, last = info.state.first_seq, info.state.last_seq
        span = limit  # widened until it holds ``limit`` of this subject's letters (or reaches the first)
        while True:
            start = max(last - span + 1, first)
            pending = await _pending_from(js, subject, start)
            if start == first or pending >= limit:
                break
            span *= 2
        if not pending:
            return []
        out: list[dict] = []
        sub = await _ordered(js, subject, start)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=5.0)
                except Exception:  # none left (a stream emptied meanwhile)
                    break
                try:
                    letter = DeadLetter.decode(msg.data).model_dump()
                except ValueError:
                    letter = {"undecodable": msg.data[:200].decode(errors="replace")}
                out.append({"seq": msg.metadata.sequence.stream, **letter})
                if not msg.metadata.num_pending:  # the last one of this subject
                    break
        finally:
            await sub.unsubscribe()
        if counts is not None:
            counts["read"] = len(out)
        return out[-limit:]
    finally:
        await nc.close()


async def _ordered(js, subject: str, start: int):
    from nats.js.api import ConsumerConfig, DeliverPolicy

    return await js.subscribe(subject, ordered_consumer=True, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start))


async def _pending_from(js, subject: str, start: int) -> int:
    """How many letters of ``subject`` the stream holds from sequence ``start`` on (one message read)."""
    sub = await _ordered(js, subject, start)
    try:
        msg = await sub.next_msg(timeout=5.0)
        return msg.metadata.num_pending + 1
    except Exception:  # none
        return 0
    finally:
        await sub.unsubscribe()


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
    from shared.subjects import DEAD_LETTER

    dl = sub.add_parser("deadletters", help="messages services gave up on (they cannot be stored), with the error")
    dl.add_argument("--service", choices=sorted(DEAD_LETTER.publishers),
                    help="only this service's")
    dl.add_argument("--limit", type=int, default=50, help="the newest this many")
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=cmd_deadletters)
