"""`APIError` and the exception handlers: every refusal leaves in the `{"error": {message, type, param, code}}`
envelope (`ErrorResponse`) with its HTTP status — the handlers' own, a request body that fails its model,
Starlette's unknown path and wrong method, a body FastAPI cannot parse, and an unexpected exception (500).

The workers' own failures are plain exceptions (server/request.py), answered here: `PipelineFailed` is 503
`worker_failed` with Retry-After; `KVCacheTooSmall` (a prompt and max_tokens beyond the whole KV bound) is 400
`kv_cache_exceeded`.

`type` follows OpenAI: `invalid_request_error` for what the client can fix in the request (400, 404, 405, 408,
413), `authentication_error` (401), `rate_limit_error` (429), `service_unavailable` (503), `timeout_error`
(504), `server_error` (500). `code` is machine-readable; `param` names the request field at fault.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request

from sida.server.request import KVCacheTooSmall, PipelineFailed
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


def invalid(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> APIError:
    """A request the client can fix (`invalid_request_error`)."""
    return APIError(status, message, "invalid_request_error", param, code)


def unavailable(message: str, code: str | None = None) -> APIError:
    """This process cannot answer now (`service_unavailable`, 503); the client may retry after a second."""
    return APIError(503, message, "service_unavailable", code=code, headers={"Retry-After": "1"})


async def api_error_handler(request: Request, err: APIError) -> JSONResponse:
    """An `APIError` raised in a handler, as its envelope."""
    return envelope(err)


async def kv_cache_too_small_handler(request: Request, err: KVCacheTooSmall) -> JSONResponse:
    """A completion that could never fit the continuous batch's KV bound: 400, the client must ask for less."""
    return envelope(invalid(str(err), "max_tokens", "kv_cache_exceeded"))


async def pipeline_failed_handler(request: Request, err: PipelineFailed) -> JSONResponse:
    """A worker stopped before the request was answered: 503, and a restart is due."""
    return envelope(unavailable(str(err), "worker_failed"))


def _code_of(pydantic_type: str) -> str:
    """OpenAI's code for a field pydantic refused: missing, of the wrong type, or a value out of range."""
    if pydantic_type == "missing":
        return "missing_required_parameter"
    if pydantic_type.endswith(("_type", "_parsing")):
        return "invalid_type"
    return "invalid_value"


async def validation_error_handler(request: Request, err: RequestValidationError) -> JSONResponse:
    """A request body that fails its model: 400 (not FastAPI's 422), naming the first field at fault."""
    first = err.errors()[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return envelope(invalid(f"request body is not valid JSON: {detail}", code="invalid_json"))
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    if not loc:  # the body itself: empty, not an object, or not sent as application/json
        return envelope(
            invalid("request body must be a JSON object sent as content-type application/json", code="invalid_body")
        )
    param = loc[0]
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    return envelope(invalid(f"{param}: {msg}", param, _code_of(kind)))


async def http_error_handler(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own refusals: no route for the path (404), a method the route does not take
    (405, with its `Allow` header), a body that cannot be decoded as JSON (400: invalid UTF-8, nested too deep)."""
    method, path = request.method, request.url.path
    if err.status_code == 404:
        e = invalid(f"no endpoint {method} {path}", code="not_found", status=404)
    elif err.status_code == 405:
        e = invalid(f"{path} does not take {method}", code="method_not_allowed", status=405)
    elif err.status_code == 400:
        cause = err.__cause__  # what the JSON decoder raised
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else err.detail
        e = invalid(f"request body is not valid JSON: {detail}", code="invalid_json")
    else:
        kind = "server_error" if err.status_code >= 500 else "invalid_request_error"
        e = APIError(err.status_code, str(err.detail), kind)
    e.headers = err.headers
    return envelope(e)


async def server_error_handler(request: Request, err: Exception) -> JSONResponse:
    """Anything a handler did not expect (a failed batch, a bug): 500 in the envelope; the traceback is logged
    by the server."""
    return envelope(APIError(500, "the server failed while processing the request", "server_error"))


def add_exception_handlers(app: FastAPI) -> None:
    """Answer every refusal with the envelope."""
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(PipelineFailed, pipeline_failed_handler)
    app.add_exception_handler(KVCacheTooSmall, kv_cache_too_small_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, server_error_handler)
