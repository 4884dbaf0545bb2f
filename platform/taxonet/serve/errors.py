"""The API's error contract: every failure is JSON ``{"error": {"code": ..., "message": ...}}`` with a fitting status.

Bad input is always a 4xx: 400 undecodable/corrupt image or malformed multipart, 401 missing/wrong token, 404/405
unknown route or method, 408 body not sent in time, 413 too large (bytes or pixels), 415 unsupported media type,
422 invalid parameters. 5xx is reserved for the service itself: 500 a fault, 503 a model that is not reachable or a
replica at its concurrency limit (with ``Retry-After``), 504 a model that did not answer in time.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from taxonet.data.transforms import ImageDecodeError

log = logging.getLogger(__name__)

#: ImageDecodeError.code → (HTTP status, API error code)
DECODE_ERRORS = {
    "corrupt": (400, "corrupt_image"),
    "unsupported": (415, "unsupported_image"),
    "too_large": (413, "image_too_large"),
}
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_request", 500: "internal_error", 503: "unavailable",
                 504: "timeout"}


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    @classmethod
    def from_decode(cls, exc: ImageDecodeError, where: str = "") -> "ApiError":
        status, code = DECODE_ERRORS.get(exc.code, (400, "corrupt_image"))
        return cls(status, code, f"{where}{exc.message}")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    """Body of every error answer."""

    error: ErrorDetail


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer FastAPI's/Starlette's own errors (404, 405, 422, uncaught exceptions) in the same JSON shape."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", problems or "invalid request")

    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("taxonet: unhandled error", exc_info=exc)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the replica log")

    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Corrupt or undecodable image, empty body, malformed multipart, no or too many files"),
        (401, "A token is configured and the Authorization header is missing or wrong"),
        (408, "The request body did not arrive within body_timeout_s"),
        (413, "Body, file, image pixel count or the request's summed pixel count over the configured limit"),
        (415, "Content type or image format not accepted (send image/jpeg, image/png or image/webp)"),
        (503, "The model deployment is not reachable, or this replica is at max_concurrent_requests "
              "(Retry-After says when to retry)"),
        (504, "The model deployment did not answer within classifier_timeout_s"),
    )
}
