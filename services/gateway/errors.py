"""Errors in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("warmserve.gateway")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         429: "rate_limit_error", 503: "service_unavailable", 504: "timeout", 500: "server_error"}
# codes for the errors Starlette raises itself (unknown path, wrong method, unparsable body)
HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}

# worker error codes -> HTTP status
WORKER_CODES = {"context_length_exceeded": 400, "bad_request": 400, "not_active": 503, "timeout": 504,
                "no_responders": 503, "aborted": 503, "engine_dead": 503}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

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
    """An error a worker reported; ``prompt_param`` (messages or prompt) names what was too long."""
    status = WORKER_CODES.get(code, 500)
    headers = {"Retry-After": "1"} if status == 503 else None
    param = prompt_param if code == "context_length_exceeded" else None
    return ApiError(status, message, code=code, param=param, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('msg')}", None
    if err.get("type") == "extra_forbidden":
        return f"unsupported parameter: {param}", param
    if err.get("type") == "missing" and not loc:
        return "request body is required", None
    return f"{param or 'body'}: {str(err.get('msg')).removeprefix('Value error, ')}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        code = "invalid_json" if exc.errors()[0].get("type") == "json_invalid" else "invalid_request"
        return ApiError(400, message, code=code, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
            message = "request body could not be parsed as JSON (nested too deeply, or not JSON)"
        return ApiError(exc.status_code, message, code=HTTP_CODES.get(exc.status_code, "http_error"),
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {exc.__class__.__name__}", code="internal").response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError):
        return ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json").response()
