"""NATS helpers: connect with reconnect, typed request-reply, streamed replies, JetStream, KV.

Every request and publish carries the current trace context in its headers (a reply does not: its
requester is in the trace already).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shared import deadletter
from shared.messages import BusMessage
from shared.settings import NatsSettings
from shared.subjects import BUCKETS, STREAMS, BucketSpec, responder_worker
from shared.telemetry import inject_headers

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BusMessage)
T = TypeVar("T")
STATUS_HEADER = "Status"
INBOX_PREFIX = "_INBOX"
# A server that vanishes without closing the connection (its node died, or a partition) is noticed only by
# unanswered pings: nats-py's defaults (120 s, 2 outstanding) kept a standby on a dead server for minutes.
# With these a client moves to another server of the cluster within about 4 to 6 s.
PING_INTERVAL_S = 2
MAX_OUTSTANDING_PINGS = 2
_USER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # \Z, not $ (which also matches before a final newline)


def inbox_prefix_for(user: str | None) -> str:
    """Reply inboxes of a NATS user: ``_INBOX.<user>``, so the server can let each user subscribe to its
    own replies only (tooling/localcluster/nats_auth.py). Without a (plain) user name: ``_INBOX``."""
    return f"{INBOX_PREFIX}.{user}" if user and _USER_RE.fullmatch(user) else INBOX_PREFIX


def worker_inbox(prefix: str, worker_id: str) -> str:
    """Where a request to one worker wants its replies: under the asker's inbox prefix, addressed to the
    worker (``_INBOX.<asker>.worker.<id>``). A worker's NATS user may publish only there, no service but
    workers may publish there (tooling/localcluster/nats_auth.py)."""
    return f"{prefix}.worker.{worker_id}"


def reply_inbox(nc: NATS, subject: str) -> str:
    """A private inbox for one request on ``subject``, addressed to the worker that answers it if one does."""
    inbox = nc.new_inbox()
    worker_id = responder_worker(subject)
    if worker_id is None:
        return inbox
    prefix, _, unique = inbox.rpartition(".")
    return f"{worker_inbox(prefix, worker_id)}.{unique}"


def _url_user(url: str) -> str | None:
    """The user of ``user:password@`` in the first server URL that has one (never a bare token: a
    ``token@`` URL's secret must not end up in subjects)."""
    from urllib.parse import unquote, urlsplit

    for part in url.split(","):
        try:
            parts = urlsplit(part.strip())
        except ValueError:
            continue
        if parts.username and parts.password is not None:
            return unquote(parts.username)
    return None


class BusError(RuntimeError):
    """A bus operation failed in a way the caller should report (code names the kind)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def tls_context(url: str, settings: NatsSettings | None = None) -> ssl.SSLContext | None:
    """The client's TLS context for ``url``, or None for plain text. TLS is on when a CA or client
    certificate is set (``WARMSERVE_NATS_TLS_*``, read from the environment unless ``settings`` is given)
    or a server URL says ``tls://``. The server's certificate is always verified: against that CA only
    when one is set, else against the system's."""
    if settings is None:
        try:
            settings = NatsSettings()
        except ValidationError as exc:
            problems = "; ".join((f"WARMSERVE_{'.'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "")
                                 + e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise BusError("nats_tls_config", f"invalid NATS TLS settings: {problems}") from None
    wants_tls = any(part.strip().lower().startswith("tls://") for part in url.split(","))
    if settings.nats_tls_ca is None and settings.nats_tls_cert is None and not wants_tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None)
        if settings.nats_tls_cert is not None:
            ctx.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
    except ssl.SSLError as exc:  # not PEM, or a key that does not match its certificate
        raise BusError("nats_tls_config", f"cannot load the NATS TLS CA or client certificate: {exc}") from None
    return ctx


def message_size(payload: bytes, headers: dict[str, str] | None) -> int:
    """The bytes nats-server counts against its max_payload: the payload and the headers' block. nats-py
    checks the payload alone; the server refuses the whole and closes the publisher's connection."""
    if headers is None:
        return len(payload)
    lines = sum(len(k.strip().encode()) + len(v.strip().encode()) + 4 for k, v in headers.items() if k.strip())
    return len(payload) + len(b"NATS/1.0\r\n\r\n") + lines


def check_size(nc: NATS, subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
    """BusError('too_large') for a message the server would refuse (and drop this connection with it)."""
    size = message_size(payload, headers)
    if size > nc.max_payload:
        raise BusError("too_large", f"a {size}-byte message to {subject} is more than NATS's max_payload "
                                    f"({nc.max_payload} bytes)")


async def connect(url: str, name: str, *, deadline_s: float = 30.0, tls: NatsSettings | None = None) -> NATS:
    """Connect, retrying until ``deadline_s`` (services may start before NATS); reconnect forever after.

    With TLS (``tls_context``) the client starts the handshake before the server says anything
    (handshake first): a server or a man in the middle that offers plain text gets no credentials."""

    holder: dict[str, NATS] = {}
    ssl_ctx = tls_context(url, tls)

    async def _disconnected():
        nc = holder.get("nc")
        if nc is not None and not (nc.is_closed or nc.is_draining):  # not our own shutdown
            log.warning("%s: disconnected from NATS", name)

    async def _reconnected():
        log.info("%s: reconnected to NATS", name)

    refused: asyncio.Future = asyncio.get_running_loop().create_future()

    async def _error(exc: Exception):
        text = str(exc).lower()
        if "authorization violation" in text and "nc" not in holder and not refused.done():
            refused.set_result(BusError(  # wrong or missing credentials: retrying will not help
                "nats_unauthorized", f"NATS at {redact(url)} refused {name}'s credentials ({exc}): "
                                     "check the user and password in the URL"))
        elif (isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError)
              and "nc" not in holder and not refused.done()):  # a TLS mismatch is configuration, not a wait
            refused.set_result(BusError(
                "nats_tls", f"TLS to NATS at {redact(url)} failed for {name} ({exc}): the server must require TLS "
                            "with a certificate for the host in the URL, signed by WARMSERVE_NATS_TLS_CA (else a "
                            "system CA); a server that verifies clients needs WARMSERVE_NATS_TLS_CERT and _KEY"))
        elif "permissions violation" in text:  # a publish this user may not make: say so
            log.warning("%s: NATS refused: %s", name, exc)
        else:
            log.debug("%s: NATS error: %r", name, exc)
        if "nc" not in holder:
            last_error[:] = [exc]

    last_error: list[Exception] = []
    servers = [s.strip() for s in url.split(",") if s.strip()]
    inbox_prefix = inbox_prefix_for(_url_user(url))
    give_up = time.monotonic() + deadline_s
    delay = 0.1
    while True:
        attempt = asyncio.ensure_future(nats.connect(
            servers=servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            connect_timeout=2, ping_interval=PING_INTERVAL_S, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            disconnected_cb=_disconnected, reconnected_cb=_reconnected,
            error_cb=_error, inbox_prefix=inbox_prefix, tls=ssl_ctx, tls_handshake_first=ssl_ctx is not None,
        ))
        # nats.connect retries on its own (max_reconnect_attempts=-1) and would never give up: the deadline is ours
        await asyncio.wait([attempt, refused], timeout=max(0.0, give_up - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
        if not attempt.done() and not refused.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
            why = f"{last_error[0]!r}" if last_error else "no answer"
            raise BusError("nats_unreachable", f"cannot reach NATS at {redact(url)}"
                                               f"{' over TLS' if ssl_ctx else ''} within {deadline_s:g} s: {why}")
        if refused.done() and not attempt.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
            raise refused.result()
        try:
            holder["nc"] = attempt.result()
            return holder["nc"]
        except (nats.errors.NoServersError, OSError, asyncio.TimeoutError) as exc:
            if time.monotonic() >= give_up:
                raise BusError("nats_unreachable", f"cannot reach NATS at {redact(url)}: {exc}") from exc
            log.info("%s: waiting for NATS at %s", name, redact(url))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def redact(url: str) -> str:
    """Server URLs without the user and password, for logs and errors."""
    return ",".join(re.sub(r"//[^@/]*@", "//", part) for part in url.split(","))


async def close(nc: NATS, timeout_s: float = 2.0) -> None:
    """Flush what is pending and close. (``drain`` can wait its full 30 s timeout on a pull
    subscription whose fetch was cancelled, which stalls every shutdown.)"""
    if nc.is_closed:
        return
    try:
        await nc.flush(timeout=timeout_s)
    except Exception:  # disconnected or slow: close anyway
        pass
    try:
        await asyncio.wait_for(nc.close(), timeout_s)
    except Exception as exc:  # a stuck close must not stall shutdown
        log.warning("NATS close did not finish cleanly within %.1f s: %r", timeout_s, exc)


async def request(nc: NATS, subject: str, msg: BusMessage, reply_type: type[M], timeout: float, *,
                  resend_on_reconnect: bool = False) -> M:
    """Typed request-reply. Raises BusError('no_responders' | 'timeout').

    ``resend_on_reconnect``: a request or its reply that was on the wire when the connection dropped is
    lost, and waiting would last the whole ``timeout``; the same message is sent again after every
    reconnect instead. Only for requests the responder runs once per message id (worker commands)."""
    if resend_on_reconnect or responder_worker(subject) is not None:  # the latter: an addressed inbox
        return await _request_resending(nc, subject, msg, reply_type, timeout, resend=resend_on_reconnect)
    try:
        resp = await nc.request(subject, msg.encode(), timeout=timeout, headers=inject_headers())
    except nats.errors.NoRespondersError:
        raise BusError("no_responders", f"nobody is listening on {subject}") from None
    except nats.errors.TimeoutError:
        raise BusError("timeout", f"no reply on {subject} within {timeout:.1f} s") from None
    return reply_type.decode(resp.data)


async def _request_resending(nc: NATS, subject: str, msg: BusMessage, reply_type: type[M], timeout: float,
                             poll_s: float = 0.25, resend: bool = True) -> M:
    inbox = reply_inbox(nc, subject)
    sub = await nc.subscribe(inbox)  # restored on reconnect before anything this client sends next
    payload, headers = msg.encode(), inject_headers()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        await nc.publish(subject, payload, reply=inbox, headers=headers)
        seen = nc.stats["reconnects"]
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise BusError("timeout", f"no reply on {subject} within {timeout:.1f} s")
            try:
                reply = await sub.next_msg(timeout=min(poll_s, left))
            except nats.errors.TimeoutError:
                if resend and nc.stats["reconnects"] != seen:
                    seen = nc.stats["reconnects"]
                    log.info("reconnected while waiting on %s: sending the request again", subject)
                    await nc.publish(subject, payload, reply=inbox, headers=headers)
                continue
            if reply.headers and reply.headers.get(STATUS_HEADER) == "503":
                raise BusError("no_responders", f"nobody is listening on {subject}")
            return reply_type.decode(reply.data)
    finally:
        with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
            await sub.unsubscribe()


async def request_stream(
    nc: NATS, subject: str, msg: BusMessage, chunk_type: type[M], *,
    first_timeout: float, idle_timeout: float, is_last: Callable[[M], bool],
    alive: Callable[[float], bool | Awaitable[bool]] | None = None, check_every_s: float = 0.5,
) -> AsyncIterator[M]:
    """Send ``msg`` with a private inbox and yield the replies until ``is_last`` says so.

    The inbox is subscribed before publishing, so no chunk can be missed. Raises
    BusError('no_responders') if nobody serves ``subject``, BusError('responder_lost') as soon as
    ``alive(silent_s)`` (a function or a coroutine function, given how long the stream has been silent) turns
    false (asked every ``check_every_s`` while waiting, never while replies flow), BusError('timeout')
    when the responder goes silent for longer than the current timeout, and BusError('too_large'), before
    sending anything, for a message larger than the server's max_payload.

    Replies are taken from the subscription's own queue, without a task per reply (``next_msg`` makes two
    tasks and a uuid for every message).
    """
    payload, headers = msg.encode(), inject_headers()
    check_size(nc, subject, payload, headers)
    inbox = reply_inbox(nc, subject)
    sub = await nc.subscribe(inbox)
    receive = _receiver(sub)
    try:
        await nc.publish(subject, payload, reply=inbox, headers=headers)
        timeout = first_timeout
        while True:
            reply = await receive(timeout, alive, check_every_s, subject)
            if reply.headers and reply.headers.get(STATUS_HEADER) == "503":
                raise BusError("no_responders", f"nobody is listening on {subject}")
            chunk = chunk_type.decode(reply.data)
            yield chunk
            if is_last(chunk):
                return
            timeout = idle_timeout
    finally:
        try:
            await sub.unsubscribe()
        except nats.errors.ConnectionClosedError:
            pass


def _receiver(sub) -> Callable[..., Awaitable[Msg]]:
    """``receive(timeout, alive, check_every_s, subject)``: the subscription's next message, BusError
    'responder_lost' or 'timeout' as ``request_stream`` says. Reads nats-py's queue of a subscription without
    a callback directly (a message already there is taken without waiting); any other subscription (a
    stand-in in tests) through ``next_msg``."""
    queue: asyncio.Queue | None = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue) or not hasattr(sub, "_pending_size") or not hasattr(sub, "_conn"):
        return functools.partial(_receive_polling, sub)

    async def receive(timeout: float, alive, check_every_s: float, subject: str) -> Msg:
        if not queue.empty():
            reply = queue.get_nowait()
        else:
            waited = 0.0
            while True:
                step = min(check_every_s, timeout - waited)
                try:  # a message put just as the timeout strikes stays queued for the next call
                    async with asyncio.timeout(max(step, 0.001)):
                        reply = await queue.get()
                    break
                except TimeoutError:
                    waited += step
                    if sub._conn.is_closed:  # as next_msg says it
                        raise nats.errors.ConnectionClosedError from None
                    try:
                        await _check_silence(waited, timeout, alive, subject)
                    except BusError:
                        if queue.empty():
                            raise
                        # a reply came while alive() asked (a last chunk sent just before the worker said
                        # it was done with the request): the stream was not lost
                        reply = queue.get_nowait()
                        break
        sub._pending_size -= len(reply.data)  # nats-py counts it against the slow-consumer limit until taken
        queue.task_done()  # as next_msg does: a drain of the subscription waits on the queue's join()
        return reply

    return receive


async def _receive_polling(sub, timeout: float, alive, check_every_s: float, subject: str) -> Msg:
    waited = 0.0
    while True:
        step = min(check_every_s, timeout - waited) if alive is not None else timeout
        try:
            return await sub.next_msg(timeout=max(step, 0.001))
        except nats.errors.TimeoutError:
            waited += step
            await _check_silence(waited, timeout, alive, subject)


async def _check_silence(waited: float, timeout: float, alive: Callable[[float], bool | Awaitable[bool]] | None,
                         subject: str) -> None:
    if alive is not None:
        answer = alive(waited)
        if inspect.isawaitable(answer):
            answer = await answer
        if not answer:
            raise BusError("responder_lost", f"the worker behind {subject} is gone") from None
    if waited >= timeout:
        raise BusError("timeout", f"{subject} went silent for {timeout:.1f} s") from None


async def reply(nc: NATS, msg: Msg, answer: BusMessage, reply_to: str = "") -> None:
    """Answer a request (no-op for fire-and-forget messages without a reply subject); ``reply_to`` asks
    for an answer to the answer (a worker's probe whether its requester still listens).

    Answers carry no trace context: the requester has it already, and every chunk of a streamed answer
    paid for the header block (injected here, framed, then parsed by the server and the requester)."""
    if msg.reply:
        await nc.publish(msg.reply, answer.encode(), reply=reply_to)


def replicas_setting() -> int:
    """``WARMSERVE_NATS_REPLICAS``: copies of each stream and bucket (1 on one server, 3 in a cluster)."""
    try:
        return NatsSettings().nats_replicas
    except ValidationError as exc:
        raise BusError("nats_config", f"invalid NATS settings: {exc.errors()[0]['msg']}") from None


async def ensure_streams(js: JetStreamContext, replicas: int | None = None) -> None:
    """Create or update every stream in the subject table (idempotent, safe to race), with ``replicas``
    copies each (default: ``WARMSERVE_NATS_REPLICAS``).

    A stream that exists with another configuration is updated; a service whose NATS user may not
    update streams (only placement may) logs that and uses the stream as it is."""
    replicas = replicas or replicas_setting()
    for spec in STREAMS:
        config = StreamConfig(name=spec.name, subjects=list(spec.subjects), max_age=spec.max_age_s,
                              description=spec.doc, num_replicas=replicas)
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            try:
                await js.update_stream(config)
            except (nats.errors.TimeoutError, nats.js.errors.APIError) as exc:
                log.warning("stream %s differs from this version's configuration and was not updated (%s); "
                            "using it as it is", spec.name, exc.__class__.__name__)


async def js_publish(js: JetStreamContext, subject: str, msg: BusMessage, msg_id: str) -> None:
    """Publish to JetStream with a message id, so a retried publish is stored once."""
    headers = inject_headers({"Nats-Msg-Id": msg_id})
    await js.publish(subject, msg.encode(), headers=headers)


async def consume(js: JetStreamContext, subject: str, durable: str, message_type: type[M],
                  handle: Callable[[M, Msg], Awaitable[None]], *, batch: int = 64, max_ack_pending: int = 10_000,
                  start_s: float | None = None, caught_up: asyncio.Event | None = None,
                  max_deliver: int = deadletter.MAX_DELIVER) -> None:
    """Process a durable pull consumer forever. ``handle`` acknowledges each message it has processed and
    raises when it could not: a transient failure (Postgres or NATS away) is redelivered without limit,
    and a message that can never be processed (its data cannot be stored, it does not decode, or it failed
    ``max_deliver`` times otherwise) goes to the dead-letter stream with the error (shared/deadletter.py).

    With ``start_s`` the durable is recreated to deliver from that time on (the caller knows, from its
    own stored state, where it stopped). ``caught_up`` is set once nothing is pending any more.
    """
    while True:  # NATS restarting (or not up yet): keep trying, a consumer that never starts loses history
        try:
            if start_s is not None:
                sub = await _pull_from(js, subject, durable, start_s, max_ack_pending)
            else:
                sub = await js.pull_subscribe(subject, durable=durable,
                                              config=ConsumerConfig(max_ack_pending=max_ack_pending))
            break
        except Exception as exc:
            log.warning("%s: could not start the consumer (%s); retrying", durable, exc)
            await asyncio.sleep(1.0)
    while True:
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except nats.errors.TimeoutError:
            msgs = []
        except Exception as exc:  # NATS restarting: keep trying
            log.warning("%s: fetch failed (%s); retrying", durable, str(exc).splitlines()[0] if str(exc) else exc)
            await asyncio.sleep(1.0)
            continue
        for msg in msgs:
            try:
                try:
                    decoded = message_type.decode(msg.data)
                except ValueError as exc:
                    await deadletter.give_up(js, msg, durable, "malformed", exc)
                    continue
                try:
                    await handle(decoded, msg)
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    await deadletter.failed(js, msg, durable, exc, max_deliver)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a nak or term lost with the connection: the message comes back anyway
                log.warning("%s: message left for redelivery (%s)", durable, exc)
        if caught_up is not None and not caught_up.is_set() and not msgs:
            try:
                if (await sub.consumer_info()).num_pending == 0:
                    caught_up.set()
            except Exception as exc:
                log.warning("%s: consumer info failed (%s)", durable, exc)


async def _pull_from(js: JetStreamContext, subject: str, durable: str, start_s: float, max_ack_pending: int):
    """(Re)create ``durable`` on the stream holding ``subject`` so it delivers from ``start_s`` on."""
    from datetime import timezone

    stream = await js.find_stream_name_by_subject(subject)
    try:
        await js.delete_consumer(stream, durable)
    except nats.js.errors.NotFoundError:
        pass
    start = datetime.fromtimestamp(max(start_s, 0.0), tz=timezone.utc).isoformat().replace("+00:00", "Z")
    await js.add_consumer(stream, ConsumerConfig(
        durable_name=durable, filter_subject=subject, deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=start, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=max_ack_pending))
    return await js.pull_subscribe_bind(durable=durable, stream=stream)


async def ensure_bucket(js: JetStreamContext, spec: BucketSpec, replicas: int | None = None) -> KeyValue:
    """The bucket, created with ``replicas`` copies (default: ``WARMSERVE_NATS_REPLICAS``) if it is missing."""
    try:
        return await js.key_value(spec.name)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(bucket=spec.name, history=1, ttl=spec.ttl_s, description=spec.doc,
                                         replicas=replicas or replicas_setting())


async def ensure_all(js: JetStreamContext, replicas: int | None = None,
                     deadline_s: float = 60.0) -> dict[str, KeyValue]:
    """Streams and buckets every service expects; returns the buckets by name, asking again while JetStream
    does not answer (``when_jetstream_answers``)."""
    replicas = replicas or replicas_setting()

    async def ensure() -> dict[str, KeyValue]:
        await ensure_streams(js, replicas)
        return {spec.name: await ensure_bucket(js, spec, replicas) for spec in BUCKETS}
    return await when_jetstream_answers(ensure, deadline_s)


async def when_jetstream_answers(op: Callable[[], Awaitable[T]], deadline_s: float = 60.0) -> T:
    """``op()``, asked again each second while JetStream does not answer (a cluster still electing its leaders,
    or a server that just restarted: its stream API times out or says unavailable) until ``deadline_s``;
    then ``BusError('jetstream_unavailable')``."""
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            return await op()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            if time.monotonic() > give_up:
                raise BusError("jetstream_unavailable", f"JetStream did not answer within {deadline_s:g} s "
                                                        f"({exc.__class__.__name__}): is a majority of the NATS "
                                                        "cluster up?") from exc
            log.warning("JetStream is not answering yet (%s); asking again", exc.__class__.__name__)
            await asyncio.sleep(1.0)
