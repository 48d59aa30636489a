"""vmforge's exception tree as HTTP: one JSON shape, the right status, never a 500 for an
error vmforge raised on purpose.

Body: ``{"error": "SpecError", "message": "...", "field": "spec.disks[0].backing_file",
"hint": "...", "status": 422}``.
"""

from __future__ import annotations

from typing import Any

from ..errors import (
    AgentBusy,
    AgentError,
    AgentTimeout,
    BuildError,
    ChecksumError,
    CommandError,
    HostError,
    ImageError,
    InvalidState,
    LaunchError,
    ProvisionError,
    RemoteError,
    SpecError,
    VmError,
    VmExists,
    VmforgeError,
    VmNotFound,
)

__all__ = ["status_for", "error_body", "ApiError"]


class ApiError(VmforgeError):
    """An error the API itself raises, with its status (404 for an unknown job, ...)."""

    def __init__(self, status: int, message: str, *, field: str | None = None,
                 hint: str | None = None, kind: str = "ApiError") -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.field = field
        self.kind = kind


def status_for(exc: BaseException) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, SpecError):
        return 422
    if isinstance(exc, VmNotFound):
        return 404
    if isinstance(exc, VmExists | InvalidState):
        return 409
    if isinstance(exc, HostError):
        return 503
    if isinstance(exc, LaunchError):
        return 502
    if isinstance(exc, AgentBusy):
        return 503
    if isinstance(exc, AgentTimeout):
        return 504
    if isinstance(exc, RemoteError):
        return {"FileNotFoundError": 404, "PermissionError": 403,
                "IsADirectoryError": 422, "NotADirectoryError": 422}.get(exc.kind, 422)
    if isinstance(exc, AgentError):
        return 502
    if isinstance(exc, ChecksumError):
        return 422
    if isinstance(exc, ImageError):
        msg = exc.message
        if "no image" in msg or "not found" in msg or msg.startswith("no snapshot") or \
                msg.endswith("not a snapshot"):
            return 404
        if "in use" in msg:
            return 409
        return 422
    if isinstance(exc, BuildError | CommandError):
        return 502
    if isinstance(exc, ProvisionError):
        return 422
    if isinstance(exc, VmError):
        return 409
    if isinstance(exc, VmforgeError):
        return 503 if type(exc).__name__ == "StateError" else 400
    return 500


def error_body(exc: BaseException, status: int | None = None) -> dict[str, Any]:
    status = status or status_for(exc)
    if isinstance(exc, VmforgeError):
        kind = exc.kind if isinstance(exc, ApiError) else type(exc).__name__
        body: dict[str, Any] = {"error": kind, "message": exc.message, "status": status,
                                "field": getattr(exc, "field", None), "hint": exc.hint}
        if isinstance(exc, LaunchError) and exc.console_tail:
            body["console_tail"] = exc.console_tail[-4000:]
        return body
    return {"error": "InternalError", "message": f"internal error: {type(exc).__name__}",
            "status": status, "field": None, "hint": "see the daemon's log"}
