"""HTTP/1.1 over a unix socket, with the standard library: the control channel of Cloud
Hypervisor (``--api-socket``) and Firecracker (``--api-sock``).

One connection per call: both VMMs serve a handful of calls per VM lifetime, and a fresh
connection never inherits a half-read response from a call that timed out.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any

__all__ = ["UnixHTTPConnection", "ApiResponse", "call"]


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` with ``connect`` replaced: the host name only fills the Host header."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body) if self.body.strip() else None

    @property
    def message(self) -> str:
        """The VMM's own words for an error: Firecracker's ``fault_message``, else the text."""
        try:
            data = self.json()
        except ValueError:
            data = None
        fault = data.get("fault_message") if isinstance(data, dict) else None
        if isinstance(fault, str):
            return fault
        return self.body.decode(errors="replace").strip()[:500]


def call(socket_path: str, method: str, path: str, body: Any = None, *,
         timeout: float = 10.0) -> ApiResponse:
    """One request; ``body`` (if not None) is sent as JSON. Raises OSError (including
    TimeoutError) when the socket does not answer; HTTP errors are returned, not raised."""
    conn = UnixHTTPConnection(socket_path, timeout)
    try:
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return ApiResponse(resp.status, resp.read())
    except http.client.HTTPException as exc:  # a VMM that died mid-answer
        raise ConnectionError(f"{method} {path}: {exc!r}") from exc
    finally:
        conn.close()
