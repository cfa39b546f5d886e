"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the ingress can name becomes an `APIError` with the right status; pydantic
validation errors become 400s whose `param` is the offending field's path.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from raysvc.serve.schema import ErrorInfo, ErrorResponse

_FIELD_PREFIX = re.compile(r"^(?:Value error, )?([A-Za-z_][\w.\[\]]*): ")


class APIError(Exception):
    """`retry_after` (seconds) becomes a Retry-After header: 429 and 503 say when to retry."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # pydantic names union members (`str`, `list[int]`, ...) in the path: skip them
            if out and (part in ("str", "int", "float", "bool", "function-after")
                        or "[" in part or part.startswith(("list", "dict", "json-or-python"))):
                continue
            out += f".{part}" if out else part
    return out


def from_validation_error(e: ValidationError) -> APIError:
    """The first error of `e`, as a 400 naming its field."""
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return bad_request(f"invalid JSON body: {err['msg']}", code="invalid_json")
    if err["type"] in ("model_type", "model_attributes_type") and not err["loc"]:
        return bad_request("the request body must be a JSON object", code="invalid_type")
    param = _path(tuple(err["loc"])) or None
    msg = err["msg"]
    m = _FIELD_PREFIX.match(msg)
    if m:
        param = param or m.group(1)
        msg = msg[m.end():]
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "missing":
        msg = "field required"
    elif err["type"] == "extra_forbidden":
        msg = "unrecognized request argument"
    return bad_request(f"{param}: {msg}" if param else msg, param=param,
                       code=err["type"] if err["type"] != "value_error" else None)
