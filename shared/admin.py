"""The admin protocol: every operator verb with its typed arguments, one dispatcher for the services that
answer them, and one client for everyone who asks (the CLI, ``warmserve up``, the load tests, the tests).

A verb is a request on ``warmserve.admin.<verb>`` (placement answers), ``warmserve.admin.forecast.<verb>``
(the forecaster answers) or ``warmserve.admin.gateway.<verb>`` (every gateway process answers: ``ask_all``
gathers their answers) carrying an ``AdminRequest`` whose ``args`` are validated against the verb's model on
both ends: the client refuses bad arguments before sending, the service again on receipt (a client may be
anything that speaks NATS). The reply is an ``AdminReply``: ``ok`` with a result, or an error with a code
(``bad_request``, ``not_found``, ``conflict``, ``unknown_verb``, ``internal``, ...).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared import bus
from shared.messages import AdminReply, AdminRequest, ErrorInfo, ModelStatus
from shared.subjects import ADMIN, FORECAST_ADMIN, GATEWAY_ADMIN, Subject, check_token

# identifiers that end up in NATS subjects and KV keys: validated once, here
Slug = Annotated[str, AfterValidator(lambda v: check_token(v, "model slug"))]
WorkerId = Annotated[str, AfterValidator(lambda v: check_token(v, "worker id"))]

# vLLM's tool-parser names are short identifiers ("hermes", "llama3_json", "granite-20b-fc"). Only the shape is
# checked: neither the CLI nor placement imports vLLM, so an unknown name is reported by the worker, on the
# first request with tool_choice "auto" for that model. \Z, not $ (which also matches before a final newline).
TOOL_PARSER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")


def check_tool_parser(value: str) -> str:
    if not isinstance(value, str) or not TOOL_PARSER_RE.match(value):
        raise ValueError(f"invalid tool parser {value!r}: a vLLM tool parser's name (e.g. hermes, llama3_json), "
                         "1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit")
    return value


ToolParser = Annotated[str, AfterValidator(check_tool_parser)]


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoArgs(Args):
    """A verb that takes no arguments (any given are refused)."""


class RegisterArgs(Args):
    slug: Slug
    path: str
    parameter_bytes: int | None = Field(None, gt=0)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    max_context_tokens: int | None = Field(None, ge=16)
    status: ModelStatus = ModelStatus.ACTIVE
    tool_parser: ToolParser | None = Field(
        None, description="vLLM's tool-call parser for tool_choice \"auto\"; left out, a registered model keeps "
                          "its own, null clears it")


class UpdateArgs(Args):
    """``model-update``: set or clear a registered model's tool parser without registering it again."""

    slug: Slug
    tool_parser: ToolParser | None = Field(description="vLLM's tool-call parser for tool_choice \"auto\"; null: none")


class SlugArgs(Args):
    slug: str


class PinArgs(Args):
    slug: Slug
    copies: int = Field(1, ge=1, le=64)
    reason: str = Field("", max_length=200)


class UnpinArgs(Args):
    slug: Slug


class WorkerArgs(Args):
    worker_id: WorkerId
    reason: str = Field("", max_length=200)


class KeyArgs(Args):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    rate_limit_rps: float | None = Field(None, gt=0)
    max_concurrency: int | None = Field(None, ge=1, le=100_000)


class KeyNameArgs(Args):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")


class HistoryArgs(Args):
    limit: int = Field(10, ge=1, le=100)


class ImportArgs(Args):
    """``warmserve forecast import``: one model's windows from a trace, oldest first, from the trace's t=0."""

    model: str
    window_s: float = Field(gt=0)
    windows: list[tuple[float, float, int]] = Field(min_length=1, max_length=14 * 288)  # (avg, peak, arrivals)
    source: str = Field("trace", max_length=200)
    align: Literal["time-of-day", "end"] = Field(
        "time-of-day", description="time-of-day: rotate a whole-day trace to keep each window's time of day; "
                                   "end: keep the order, the last window just before the current one")

    @field_validator("windows")
    @classmethod
    def _finite(cls, v: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
        if any(not (math.isfinite(a) and math.isfinite(p)) or a < 0 or p < 0 or n < 0 for a, p, n in v):
            raise ValueError("window values must be finite and non-negative")
        return v


class RequestIdArgs(Args):
    """``request``: one request by the id the gateway returned (the body's ``id``, the ``x-request-id`` header)."""

    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")


@dataclass(frozen=True)
class Verb:
    name: str
    args: type[Args]
    subject: Subject
    doc: str


def _verbs(subject: Subject, *verbs: tuple[str, type[Args], str]) -> dict[str, Verb]:
    return {name: Verb(name, args, subject, doc) for name, args, doc in verbs}


PLACEMENT_VERBS = _verbs(
    ADMIN,
    ("model-register", RegisterArgs, "add or update a catalog model (sizes read from its folder if not given)"),
    ("model-update", UpdateArgs, "change a catalog model's tool parser"),
    ("model-list", NoArgs, "the catalog"),
    ("model-remove", SlugArgs, "remove a model from the catalog"),
    ("worker-list", NoArgs, "live workers and what each holds"),
    ("worker-drain", WorkerArgs, "no new work on a worker; its instances drain, its copies are evicted"),
    ("worker-undrain", WorkerArgs, "put a drained worker back"),
    ("prewarm-pin", PinArgs, "keep N prewarmed copies of a model whatever its forecast"),
    ("prewarm-unpin", UnpinArgs, "release a pin"),
    ("hold-list", NoArgs, "operators' drains and pins"),
    ("placement-show", NoArgs, "the plan in force with its newest inputs and scores"),
    ("placement-history", HistoryArgs, "recent plans"),
    ("key-create", KeyArgs, "a new API key (shown once)"),
    ("key-list", NoArgs, "API keys (never the keys themselves)"),
    ("key-disable", KeyNameArgs, "refuse a key"),
    ("key-enable", KeyNameArgs, "accept a disabled key again"),
)
FORECASTER_VERBS = _verbs(
    FORECAST_ADMIN,
    ("status", NoArgs, "per-model forecasts, methods, errors and the forecaster's rounds"),
    ("reload", NoArgs, "rebuild every forecaster from stored history"),
    ("import", ImportArgs, "seed a model's history from a trace"),
)
GATEWAY_VERBS = _verbs(
    GATEWAY_ADMIN,
    ("request", RequestIdArgs, "one recent request's spans, from the gateway's bounded buffer"),
)
VERBS: dict[tuple[str, str], Verb] = {(v.subject.pattern, v.name): v for v in (
    *PLACEMENT_VERBS.values(), *FORECASTER_VERBS.values(), *GATEWAY_VERBS.values())}


class AdminError(Exception):
    """An admin verb failed; ``code`` says how (the reply's error code)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _error(code: str, message: str) -> AdminReply:
    return AdminReply(ok=False, error=ErrorInfo(code=code, message=message))


def _validation_message(verb: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{verb}: {where + ': ' if where else ''}{err['msg']}"


Handler = Callable[[Any], Awaitable[Any]]


class Dispatcher:
    """Answers the verbs of one subject: decode, validate the arguments, call the handler, map errors to codes.
    Every request gets an answer, whatever goes wrong."""

    def __init__(self, verbs: dict[str, Verb], handlers: dict[str, Handler]):
        missing = set(verbs) ^ set(handlers)
        if missing:
            raise ValueError(f"verbs and handlers differ: {sorted(missing)}")
        self.verbs = verbs
        self.handlers = handlers

    async def handle(self, verb: str, data: bytes) -> AdminReply:
        spec = self.verbs.get(verb)
        if spec is None:
            return _error("unknown_verb", f"unknown admin verb {verb!r}; known: {', '.join(sorted(self.verbs))}")
        try:
            req = AdminRequest.decode(data) if data else AdminRequest()
            args = spec.args.model_validate(req.args)
            return AdminReply(ok=True, result=await self.handlers[verb](args))
        except ValidationError as exc:
            return _error("bad_request", _validation_message(verb, exc))
        except ValueError as exc:
            return _error("bad_request", f"{verb}: {exc}")
        except AdminError as exc:
            return _error(exc.code, str(exc))
        except Exception as exc:  # Postgres away, unreadable folder...: answer, never leave the caller waiting
            return _error("internal", f"{verb} failed: {str(exc).splitlines()[0] if str(exc) else repr(exc)}")

    async def on_message(self, nc, msg) -> None:
        """A NATS callback body: the verb is the subject's last token."""
        await bus.reply(nc, msg, await self.handle(msg.subject.rsplit(".", 1)[-1], msg.data))


class AdminClient:
    """Asks admin verbs over a NATS connection: arguments are checked before they are sent, an error reply
    raises ``AdminError``."""

    def __init__(self, nc):
        self.nc = nc

    async def call(self, verb: str, args: Args | dict | None = None, *, forecaster: bool = False,
                   timeout: float = 15.0) -> Any:
        subject = FORECAST_ADMIN if forecaster else ADMIN
        spec = VERBS.get((subject.pattern, verb))
        if spec is None:
            known = FORECASTER_VERBS if forecaster else PLACEMENT_VERBS
            raise AdminError("unknown_verb", f"unknown admin verb {verb!r}; known: {', '.join(sorted(known))}")
        try:
            typed = args if isinstance(args, spec.args) else spec.args.model_validate(args or {})
        except ValidationError as exc:
            raise AdminError("bad_request", _validation_message(verb, exc)) from None
        reply = await bus.request(self.nc, subject.format(verb=verb),
                                  AdminRequest(args=typed.model_dump(mode="json", exclude_unset=True)),
                                  AdminReply, timeout=timeout)
        if not reply.ok:
            raise AdminError(reply.error.code if reply.error else "failed",
                             reply.error.message if reply.error else f"{verb} failed")
        return reply.result

    async def ask_all(self, verb: str, args: Args | dict | None = None, *, timeout: float = 3.0, settle_s: float = 0.5,
                      enough: Callable[[AdminReply], bool] = lambda r: False) -> list[AdminReply]:
        """A gateway verb, asked of every gateway process at once (they subscribe without a queue group, so
        each answers): their replies, gathered until one is ``enough``, until ``settle_s`` after the first
        reply (gateways on one NATS answer within milliseconds of each other), or until ``timeout``. No
        gateway listening: an empty list."""
        from nats.errors import TimeoutError as NatsTimeout

        from shared.telemetry import inject_headers

        spec = GATEWAY_VERBS.get(verb)
        if spec is None:
            raise AdminError("unknown_verb", f"unknown admin verb {verb!r}; known: {', '.join(sorted(GATEWAY_VERBS))}")
        try:
            typed = args if isinstance(args, spec.args) else spec.args.model_validate(args or {})
        except ValidationError as exc:
            raise AdminError("bad_request", _validation_message(verb, exc)) from None
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        replies: list[AdminReply] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.nc.publish(GATEWAY_ADMIN.format(verb=verb),
                                  AdminRequest(args=typed.model_dump(mode="json", exclude_unset=True)).encode(),
                                  reply=inbox, headers=inject_headers())
            while (left := deadline - loop.time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except NatsTimeout:
                    break
                if msg.headers and msg.headers.get(bus.STATUS_HEADER) == "503":  # nobody subscribes
                    break
                try:
                    reply = AdminReply.decode(msg.data)
                except ValueError:
                    continue
                replies.append(reply)
                if enough(reply):
                    break
                if len(replies) == 1:  # the others, if any, are close behind
                    deadline = min(deadline, loop.time() + settle_s)
        finally:
            await sub.unsubscribe()
        return replies
