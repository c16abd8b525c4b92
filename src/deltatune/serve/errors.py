"""The one error type a client sees (OpenAI's error body) and the rule that keeps server paths out of it."""

from __future__ import annotations

import os
import re
import threading

from fastapi.responses import JSONResponse

_MAX_MESSAGE = 600
_ROOTS: dict[str, str] = {}  # absolute folder -> the name clients see instead
_ROOTS_LOCK = threading.Lock()
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:/[^\s'\"/:,;()\[\]]+)+/?")


def hide_root(path: str, shown_as: str) -> None:
    """Show `path` (and everything under it) to clients as `shown_as`."""
    with _ROOTS_LOCK:
        for p in {os.path.abspath(path), os.path.realpath(path)}:
            _ROOTS[p] = shown_as


def redact(text: str) -> str:
    """`text` with no absolute server path in it: a known folder becomes its public name, any other absolute
    path its last component; lone surrogates are escaped and the text shortened."""
    with _ROOTS_LOCK:
        roots = sorted(_ROOTS.items(), key=lambda kv: -len(kv[0]))
    for root, shown in roots:
        text = text.replace(root, shown)
    text = _ABS_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/")) or "/", text)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


class ApiError(Exception):
    """A refused request: an HTTP status and OpenAI's error body `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": redact(self.message),
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def overloaded() -> ApiError:
    return ApiError(503, "the server is busy; retry later", "overloaded", type_="server_error")


def shutting_down() -> ApiError:
    return ApiError(
        503, "the server is shutting down; retry on another instance", "shutting_down", type_="server_error"
    )
