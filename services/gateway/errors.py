"""Errors in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.api_types import ParamError

log = logging.getLogger("warmserve.gateway")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         429: "rate_limit_error", 503: "service_unavailable", 504: "timeout", 500: "server_error"}
# codes for the errors Starlette raises itself (unknown path, wrong method, unparsable body)
HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}

# What a client is told when a worker or the bus fails: a stable status and sentence per code. The worker's
# own words (they may name workers, instances, paths, exception text) go to the log and the request's span only.
WORKER_ERRORS: dict[str, tuple[int, str]] = {
    "context_length_exceeded": (400, "The prompt plus max_tokens exceeds the model's context length; shorten the "
                                     "prompt or lower max_tokens"),
    "bad_request": (400, "The model server refused the request as invalid"),
    "not_active": (503, "The model's instance stopped serving before the request started; retry the request"),
    "aborted": (503, "The model's instance stopped serving; retry the request"),
    "engine_dead": (503, "The model's inference engine failed; retry the request"),
    "overloaded": (503, "The model's instances are busy; retry the request"),
    "no_responders": (503, "No instance of the model answered; retry the request"),
    "responder_lost": (504, "The worker serving the request stopped; retry the request"),
    "timeout": (504, "The worker serving the request stopped answering in time; retry the request"),
    "invalid_request": (400, "The model server refused the request as invalid"),
    "unsupported": (400, "The model server cannot serve this request"),
    "no_chat_template": (400, "The model has no chat template; send the prompt to /v1/completions"),
    "tool_parser_unavailable": (500, "The model's tool-call parser could not be loaded; an operator must correct "
                                     "the model's tool parser (warmserve model update --tool-parser)"),
}
# Refusals of the request's own parameters (vLLM's validation: "top_p must be in (0, 1], got 2.0"): the client
# needs the engine's words to correct its request, as vLLM's server gives them, so they are passed on (cut to
# CLIENT_DETAIL_CHARS), with the parameter vLLM names as ``param``.
CLIENT_VISIBLE = frozenset({"invalid_request", "unsupported"})
CLIENT_DETAIL_CHARS = 500
_PARAM = re.compile(r"parameter=([A-Za-z_][A-Za-z0-9_.]*)")
INTERNAL = (500, "internal", "The request failed inside the service; retry it, and report it if it persists")


class ApiError(Exception):
    """An error for the client. ``detail`` is what the client is not told (which worker, what failed inside):
    the request's log line and trace carry it."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, detail: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.detail = detail

    @property
    def type(self) -> str:
        return TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _AsciiJSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _AsciiJSONResponse(JSONResponse):
    """Errors may quote what the client sent (a parameter's name): escaped to ASCII, a lone surrogate in
    it cannot break the response (Starlette's UTF-8 rendering would fail on it with a 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def from_worker(code: str, message: str, prompt_param: str | None = None) -> ApiError:
    """An error a worker (or the bus on its way) reported, as the client sees it: the stable sentence of its
    code (``internal`` for a code not in the table), the worker's ``message`` kept as the detail.
    ``prompt_param`` (messages or prompt) names what was too long."""
    if code in WORKER_ERRORS:
        (status, text), client_code = WORKER_ERRORS[code], code
    else:
        status, client_code, text = INTERNAL
    headers = {"Retry-After": "1"} if status == 503 else None
    param = prompt_param if code == "context_length_exceeded" else None
    if code in CLIENT_VISIBLE and message.strip():
        text = message.strip()[:CLIENT_DETAIL_CHARS]
        named = _PARAM.search(message)
        param = named.group(1) if named else None
    return ApiError(status, text, code=client_code, param=param, headers=headers, detail=f"{code}: {message}")


def from_bus(exc: Exception) -> ApiError:
    """The worker stopped answering (``BusError`` responder_lost or timeout): a 504 with the stable sentence of
    its code; the subject, and with it the worker, only in the detail."""
    code = getattr(exc, "code", "timeout")
    text = WORKER_ERRORS.get(code, WORKER_ERRORS["timeout"])[1]
    return ApiError(504, text, code=code if code in WORKER_ERRORS else "timeout", detail=f"{code}: {exc}")


def internal(detail: str) -> ApiError:
    """A failure inside the gateway: the client gets the stable 500, ``detail`` goes to the log and trace."""
    status, code, text = INTERNAL
    return ApiError(status, text, code=code, detail=detail)


def record(span: trace.Span, err: ApiError) -> None:
    """Put what the client was not told on the request's span (a no-op for a span that is not recording)."""
    span.set_attribute("error.type", err.code or str(err.status))
    if err.detail:
        span.add_event("warmserve.error", {"code": err.code or "", "detail": err.detail})


_RESPONSE_HEADERS = "_warmserve_response_headers"


def quote_in_response(exc: BaseException, headers: dict[str, str]) -> None:
    """Headers the 500 answering an unexpected ``exc`` carries (the request's id): set where it is raised
    through, read by ``install``'s handler."""
    try:
        setattr(exc, _RESPONSE_HEADERS, {**getattr(exc, _RESPONSE_HEADERS, {}), **headers})
    except AttributeError:  # an exception that takes no attributes: answered without them
        pass


# pydantic names a union's member in an error's location (``stop.str``, ``tool_choice.literal['none',...]``,
# ``content.function-after[...]``): not a parameter, so left out of ``param``
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z]\w*)$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """The message, ``param`` and code of a request's first validation error. A ``ParamError`` raised by a
    validator adds its path below the validator's location, and its own code."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _UNION_MEMBER.match(str(p))]
    cause = (err.get("ctx") or {}).get("error")
    code = "invalid_request"
    if isinstance(cause, ParamError):
        loc, code = loc + list(cause.path), cause.code
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('msg')}", None, "invalid_json"
    if err.get("type") == "missing" and not loc:
        return "request body is required", None, code
    return f"{param or 'body'}: {str(err.get('msg')).removeprefix('Value error, ')}", param, code


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return ApiError(400, message, code=code, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
            message = "request body could not be parsed as JSON (nested too deeply, or not JSON)"
        return ApiError(exc.status_code, message, code=HTTP_CODES.get(exc.status_code, "http_error"),
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)  # the detail, traceback too
        err = internal(repr(exc))
        record(trace.get_current_span(), err)
        err.headers = dict(getattr(exc, _RESPONSE_HEADERS, {}))
        return err.response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError):
        return ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json").response()
