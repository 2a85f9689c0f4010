"""One exception for every refusal, rendered in the error shape of the API that was called.

/sdapi/... answers as AUTOMATIC1111 does: {"error": type, "detail": message, "body": "", "errors": message}.
Everything else answers as the OpenAI API does: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from http import HTTPStatus

A1111_PREFIX = "/sdapi/"


class ApiError(Exception):
    """A request the server refuses or cannot serve; `message` names the field (`param`) and the fix."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"


def invalid(param: str, message: str) -> ApiError:
    """422 naming the field: "width: must be a multiple of 8"."""
    return ApiError(422, f"{param}: {message}", param=param, code="invalid_value")


def error_body(path: str, error: ApiError) -> dict:
    if path.startswith(A1111_PREFIX):
        name = HTTPStatus(error.status).phrase.replace(" ", "") if error.status in HTTPStatus._value2member_map_ else ""
        return {"error": name or "HTTPException", "detail": error.message, "body": "", "errors": error.message}
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
