"""What a durable consumer does with a message its handler failed on: retry it, or give up on it.

A failure is one of three kinds (``classify``):

- **transient**: the database or NATS is unreachable, or the database is not ready for the row (not
  migrated, no privilege): nothing is wrong with the message, and an operator's fix of the database makes it
  land. Retried without limit, every ``TRANSIENT_DELAY_S``: no history is lost while Postgres is down.
- **poison**: the row can never be stored as it is (a value too long for its column, a constraint it breaks:
  SQLSTATE classes 22 and 23), or the message does not decode. Retrying cannot help, so it goes to the
  dead-letter stream at once.
- **unknown**: anything else (a bug, a surprise). Retried with exponential backoff, and given up on after
  ``max_deliver`` deliveries.

The limit is kept here, not as the consumer's ``max_deliver`` on the server: the server cannot tell a
Postgres outage from a poison message, and a message past its limit there is silently never delivered again.
Giving up publishes a ``DeadLetter`` (the original payload, the error, the consumer, stream and delivery
count) to ``warmserve.deadletter.<service>``, counts it in ``warmserve:dead_letters_total`` and terminates
the message; if that publish fails, the message is redelivered instead, so nothing is dropped. A payload that
would not fit in a dead letter under NATS's max_payload (less ``HEADROOM`` for headers) is cut to fit and
flagged; should the dead letter still be too large, the message is terminated with an error logged: a
message that can never be dead-lettered would otherwise be redelivered forever.
"""

from __future__ import annotations

import base64
import enum
import logging
import time

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import exc as sa

from shared.messages import DeadLetter, ErrorInfo
from shared.metrics import DEAD_LETTERS
from shared.subjects import DEAD_LETTER, SLUG_RE, SUBJECTS
from shared.telemetry import inject_headers

log = logging.getLogger(__name__)

MAX_DELIVER = 5  # deliveries of a message failing for an unknown reason before it is given up on
TRANSIENT_DELAY_S = 2.0  # between retries while a dependency is away
MAX_BACKOFF_S = 30.0
_POISON_SQLSTATE = ("22", "23")  # data exception, integrity constraint violation
HEADROOM = 16 * 1024  # kept free under max_payload for a dead letter's headers (message id, trace context)
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # nats-server's default, when the connection does not say


class Fault(str, enum.Enum):
    TRANSIENT = "transient"
    POISON = "poison"
    UNKNOWN = "unknown"


def classify(exc: BaseException) -> Fault:
    """Whether retrying ``exc``'s message can help (see the module docstring)."""
    if isinstance(exc, sa.DBAPIError):
        state = str(getattr(exc.orig, "sqlstate", None) or "")
        if isinstance(exc, (sa.DataError, sa.IntegrityError)) or state[:2] in _POISON_SQLSTATE:
            return Fault.POISON
        if exc.connection_invalidated or isinstance(exc, (sa.OperationalError, sa.InterfaceError)) \
                or state[:2] == "42":  # connection, resources, operator intervention; schema, privileges
            return Fault.TRANSIENT
        return Fault.UNKNOWN
    if isinstance(exc, (sa.DisconnectionError, sa.TimeoutError, nats.errors.Error, OSError, TimeoutError)):
        return Fault.TRANSIENT  # (OSError covers refused connections and asyncio timeouts)
    return Fault.UNKNOWN


def retry_delay(fault: Fault, delivered: int) -> float:
    """How long the server waits before delivering the message again."""
    if fault is Fault.TRANSIENT:
        return TRANSIENT_DELAY_S
    return min(2.0 ** max(delivered - 1, 0), MAX_BACKOFF_S)


def service_of(durable: str) -> str:
    """The NATS user that runs ``durable`` (the subject table's durables), else the durable's own name."""
    for s in SUBJECTS:
        for owner, name in s.durables:
            if name == durable:
                return owner
    return durable if SLUG_RE.match(durable) else "unknown"


def letter(msg: Msg, durable: str, code: str, exc: BaseException, now_s: float,
           max_bytes: int | None = None) -> DeadLetter:
    """The dead letter of ``msg``; with ``max_bytes``, its payload cut (and flagged) until it encodes to at
    most that many bytes (JSON escapes can make a payload several times its size)."""
    meta = msg.metadata
    data = msg.data
    try:
        text_payload: str | None = data.decode()
    except UnicodeDecodeError:
        text_payload = None
    text = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"

    def make(keep: int) -> DeadLetter:  # keep: characters of text, or bytes before base64
        if text_payload is not None:
            payload, whole = text_payload[:keep], keep >= len(text_payload)
        else:
            payload, whole = base64.b64encode(data[:keep]).decode(), keep >= len(data)
        return DeadLetter(service=service_of(durable), consumer=durable, stream=meta.stream, subject=msg.subject,
                          stream_seq=meta.sequence.stream, delivered=meta.num_delivered,
                          error=ErrorInfo(code=code, message=text[:1000]), failed_at_s=now_s, payload=payload,
                          payload_base64=text_payload is None, payload_truncated=not whole, payload_bytes=len(data))

    whole = make(len(text_payload) if text_payload is not None else len(data))
    if max_bytes is None or len(whole.encode()) <= max_bytes:
        return whole
    lo, hi = 0, len(text_payload) if text_payload is not None else len(data)  # the longest prefix that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(make(mid).encode()) <= max_bytes else (lo, mid)
    return make(lo)


async def give_up(js: JetStreamContext, msg: Msg, durable: str, code: str, exc: BaseException,
                  max_payload: int | None = None) -> bool:
    """Move ``msg`` to the dead-letter stream and terminate it; False (and the message redelivered later)
    if the dead letter could not be stored, or (terminated, logged) if it can never fit in a NATS message.
    ``max_payload``: the server's (by default, what the connection was told)."""
    if max_payload is None:  # nats-py keeps the connection on the context, privately
        max_payload = getattr(getattr(js, "_nc", None), "max_payload", None) or DEFAULT_MAX_PAYLOAD
    dead = letter(msg, durable, code, exc, time.time(), max_bytes=max(max_payload - HEADROOM, 0))
    try:
        # one dead letter per stored message, however often a give-up is retried
        headers = inject_headers({"Nats-Msg-Id": f"{dead.stream}:{dead.stream_seq}:{durable}"})
        await js.publish(DEAD_LETTER.format(service=dead.service), dead.encode(), headers=headers)
    except nats.errors.MaxPayloadError as publish_exc:  # retrying cannot make it fit
        log.error("%s: gave up on %s #%d from %s (%s: %s) but its dead letter is too large to store (%s); "
                  "terminated without one, the original stays in %s until it ages out", durable, dead.stream,
                  dead.stream_seq, dead.subject, code, dead.error.message, publish_exc, dead.stream)
        await msg.term()
        return False
    except Exception as publish_exc:
        log.warning("%s: could not store the dead letter of %s #%d (%s); it will be redelivered", durable,
                    dead.stream, dead.stream_seq, publish_exc)
        await msg.nak(delay=TRANSIENT_DELAY_S)
        return False
    DEAD_LETTERS.labels(dead.service, dead.stream).inc()
    log.error("%s: gave up on %s #%d from %s after %d deliveries (%s: %s); moved to %s", durable, dead.stream,
              dead.stream_seq, dead.subject, dead.delivered, code, dead.error.message,
              DEAD_LETTER.format(service=dead.service))
    await msg.term()
    return True


async def failed(js: JetStreamContext, msg: Msg, durable: str, exc: BaseException, max_deliver: int) -> None:
    """The handler raised ``exc`` on ``msg``: redeliver it later, or give up on it."""
    delivered = msg.metadata.num_delivered
    fault = classify(exc)
    if fault is Fault.POISON:
        await give_up(js, msg, durable, "unstorable", exc)
    elif fault is Fault.UNKNOWN and delivered >= max_deliver:
        await give_up(js, msg, durable, "retries_exhausted", exc)
    else:
        delay = retry_delay(fault, delivered)
        log.warning("%s: could not process %s #%d (%s: %s); retrying in %.0f s (delivery %d%s)", durable,
                    msg.metadata.stream, msg.metadata.sequence.stream, exc.__class__.__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "", delay, delivered,
                    "" if fault is Fault.TRANSIENT else f" of {max_deliver}")
        await msg.nak(delay=delay)
