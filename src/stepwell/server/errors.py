"""One JSON error body for every failure: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepwell.app import AppError
from stepwell.engine.scheduler import SchedulerClosed
from stepwell.store.base import ConcurrentChange, InvalidName, StoreError

log = logging.getLogger("stepwell.server")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    500: "internal",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """An HTTP error with a stable ``code`` and a message meant for people."""

    def __init__(self, status: int, message: str, *, code: str | None = None, details: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers=headers)
        self.code = code or _CODES.get(status, "error")
        self.details = details


def error_response(status: int, message: str, *, code: str | None = None, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": message,
                      "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def not_found(what: str) -> ApiError:
    return ApiError(404, what)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the JSON error body."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if not isinstance(exc, ApiError) and exc.status_code == 404:
            message = f"no such endpoint ({message}); see /docs for the API"
        return error_response(
            exc.status_code, message, code=getattr(exc, "code", None),
            details=getattr(exc, "details", None), headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        broken = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if broken is not None:  # as the routes that read their body themselves say it
            loc = broken.get("loc", ())
            at = f" (at character {loc[1]})" if len(loc) > 1 else ""
            reason = (broken.get("ctx") or {}).get("error") or broken.get("msg")
            return error_response(400, f"the body is not JSON: {reason}{at}")
        problems = [
            {"where": ".".join(str(p) for p in err.get("loc", ())), "problem": err.get("msg")}
            for err in exc.errors()
        ]
        first = problems[0] if problems else {"where": "request", "problem": "invalid"}
        return error_response(
            422, f"invalid request: {first['where']}: {first['problem']}", details=problems
        )

    @app.exception_handler(AppError)
    async def _app_error(_request: Request, exc: AppError) -> JSONResponse:
        # a lookup the app cannot answer (no such step...): not a problem of its file,
        # so without the file, line and key the message would carry for the CLI
        return error_response(404, exc.problem + (f" ({exc.hint})" if exc.hint else ""))

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, exc: StoreError) -> JSONResponse:
        if isinstance(exc, ConcurrentChange):  # nothing was written: the same request may retry
            return error_response(503, str(exc), code="busy", headers={"Retry-After": "1"})
        if isinstance(exc, InvalidName):
            return error_response(422, str(exc))
        return error_response(409, str(exc), code="store_conflict")

    @app.exception_handler(SchedulerClosed)
    async def _closed(_request: Request, exc: SchedulerClosed) -> JSONResponse:
        return error_response(503, str(exc), code="shutting_down")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the details (paths, internals) go to the server's log, not to the client
        incident = secrets.token_hex(4)
        log.exception("unexpected error %s in %s %s", incident, request.method, request.url.path)
        return error_response(
            500, f"internal error {incident} ({type(exc).__name__}); the server's log has the details"
        )
