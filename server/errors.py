"""`APIError` and the exception handlers: every error leaves in the `{"error": {message, type, param, code}}`
envelope (`ErrorResponse`) with its HTTP status."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import Request

from sida.server.schemas import error_body


class APIError(Exception):
    """An error a handler or the middleware answers with: status, envelope fields and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers


def envelope(err: APIError) -> JSONResponse:
    """The response for `err`."""
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), err.status, headers=err.headers)


async def api_error_handler(request: Request, err: APIError) -> JSONResponse:
    """An `APIError` raised in a handler, as its envelope."""
    return envelope(err)


async def validation_error_handler(request: Request, err: RequestValidationError) -> JSONResponse:
    """A request body that fails its model: 400 (not FastAPI's 422), naming the first field at fault."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    param = loc[0] if loc else None
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        msg, param = "request body is not valid JSON", None
    return envelope(APIError(400, f"{param + ': ' if param else ''}{msg}", "invalid_request_error", param))


def add_exception_handlers(app: FastAPI) -> None:
    """Answer `APIError` and request-validation errors with the envelope."""
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
