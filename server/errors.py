"""The OpenAI error envelope and the exception handlers that always produce it. Engine errors are
mapped here by their type alone (engine/errors.py): the field and the code come with them."""
from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.errors import EngineDead, QueueFull, RequestRejected
from server.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}

_TAGS = {"body", "str", "int", "float", "bool"}
RETRY_AFTER_S = "1"


class APIError(Exception):
    """An error answered with `status` and the envelope {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers


class _ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so a message quoting invalid Unicode (a lone surrogate) still renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    info = ErrorInfo(message=message, type=_TYPES.get(status, "server_error"), param=param, code=code)
    return _ASCIIJSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def error_event(exc: APIError) -> bytes:
    """The envelope as one SSE event, for errors after a stream has started."""
    info = ErrorInfo(message=exc.message, type=_TYPES.get(exc.status, "server_error"), param=exc.param, code=exc.code)
    return f"data: {json.dumps(ErrorResponse(error=info).model_dump())}\n\n".encode()


def engine_error(exc: RequestRejected | EngineDead) -> APIError:
    """The HTTP answer to an engine error: 429 with Retry-After for QueueFull, 503 for EngineDead, and
    400 for every InvalidRequest, with the field and code the error carries."""
    if isinstance(exc, EngineDead):
        return APIError(503, f"engine unavailable: {exc}", "service_unavailable")
    if isinstance(exc, QueueFull):
        return APIError(429, f"server busy: {exc}", exc.code, exc.param, {"Retry-After": RETRY_AFTER_S})
    return APIError(400, str(exc), exc.code, exc.param)


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """The first error, preferring a validator's own message (within a union, pydantic lists every branch)."""
    errors = exc.errors() or [{"loc": (), "msg": "invalid request"}]
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON body: {first.get('msg')}", "invalid_json")
    # drop "body" and the union branch tags in pydantic's locations (str, list[int], function-after[...], Model)
    loc = [str(p) for p in first.get("loc", ()) if re.fullmatch(r"[a-z_][a-z0-9_]*|\d+", str(p)) and p not in _TAGS]
    where = ".".join(loc)
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    return error_response(400, message, "invalid_value", loc[0] if loc else None)


def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)


def _engine_error(request: Request, exc: RequestRejected | EngineDead) -> JSONResponse:
    return _api_error(request, engine_error(exc))


def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), code, headers=exc.headers)


def _unexpected(_: Request, __: Exception) -> JSONResponse:
    """Starlette re-raises the exception after this response, so the server still logs it."""
    return error_response(500, "internal server error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the envelope: validation -> 400, engine errors by type, HTTP errors keep
    their status, bugs -> 500."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestRejected, _engine_error)
    app.add_exception_handler(EngineDead, _engine_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
