"""Build OpenAI error envelopes as values; the router turns them into HTTP responses."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from server.protocol import ErrorInfo, ErrorResponse

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


def make_error(
    message: str, status: int = 400, *, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    err_type = _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
    if code is None:
        code = HTTPStatus(status).phrase.lower().replace(" ", "_") if status in HTTPStatus._value2member_map_ else None
    return ErrorResponse(
        error=ErrorInfo(message=message, type=err_type, param=param, code=code),
        status_code=status,
    )


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return make_error(message, 400, param=param, code=code or "invalid_value")


def engine_unavailable(message: str = "the engine is not ready") -> ErrorResponse:
    return make_error(message, 503, code="engine_unavailable")


_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param_from_loc(loc: Iterable[Any]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    parts: list[str] = []
    for item in loc:
        if item in ("body", "query", "path", "header"):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and (item in _UNION_MEMBER_NAMES or "[" in item or item.startswith("function-")):
            continue  # pydantic's names for union members and validators, not fields
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def param_name(loc: Iterable[Any]) -> str | None:
    return _param_from_loc(loc)


def from_validation_errors(errors: list[dict[str, Any]]) -> ErrorResponse:
    """FastAPI/pydantic validation errors -> one 400 envelope naming the first bad field."""
    if not errors:
        return invalid_request("invalid request")
    first = errors[0]
    param = _param_from_loc(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return invalid_request(f"request body is not valid JSON: {first.get('msg')}", None, "invalid_json")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = f"missing required parameter: {param}"
    elif param:
        msg = f"{param}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return invalid_request(msg, param, "missing_required_parameter" if first.get("type") == "missing" else None)


def overloaded(message: str, retry_after_s: int) -> ErrorResponse:
    error = make_error(message, 429, code="server_overloaded")
    error.headers["Retry-After"] = str(retry_after_s)
    return error
