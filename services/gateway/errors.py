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

# worker error codes -> HTTP status
WORKER_CODES = {"context_length_exceeded": 400, "bad_request": 400, "not_active": 503, "timeout": 504,
                "no_responders": 503, "aborted": 503}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_worker(code: str, message: str) -> ApiError:
    status = WORKER_CODES.get(code, 500)
    headers = {"Retry-After": "1"} if status == 503 else None
    return ApiError(status, message, code=code, headers=headers)


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
    return f"{param or 'body'}: {err.get('msg')}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return ApiError(400, message, code="invalid_request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), code=None).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {exc.__class__.__name__}", code="internal").response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError):
        return ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json").response()
