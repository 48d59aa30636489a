"""A blocking, one-shot ``exec`` for the command line: the same calls as the asyncio client
(:mod:`vmforge.agent.client`), over a plain socket.

`vmforge exec VM -- true` is judged by the whole process, and importing asyncio (with the
modules it pulls in) costs a command about 35 ms, more than the round trip to the guest. This
module sends the session ``hello`` and one streaming ``exec`` on a blocking socket and reads the
replies (RS json LF records, as :mod:`vmforge.agent.protocol` frames them), taking the channel
lock first as the client does. It handles only what it is sure of: a unix-socket or hybrid
vsock endpoint whose channel is free and which accepts at once. Otherwise :func:`exec_once`
returns None *before sending anything*, and the caller uses the asyncio client (which queues
for a busy channel, retries a full backlog and explains).
"""

from __future__ import annotations

import base64
import json
import os
import socket

from ..errors import AgentError, AgentTimeout, RemoteError

TYPE_CHECKING = False  # not typing's: `vmforge exec` must not import it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["exec_once", "Outcome"]

RS, LF = b"\x1e", b"\n"
_HINT = "the VM may have stopped or be rebooting: `vmforge ls`, `vmforge console NAME`"


class Outcome:
    """What the guest reported for the command (the fields of ``ExecResult`` the CLI uses)."""

    __slots__ = ("exit_code", "signal", "timed_out")

    def __init__(self, exit_code: int | None, signal: int | None, timed_out: bool) -> None:
        self.exit_code, self.signal, self.timed_out = exit_code, signal, timed_out


def _records(buf: bytearray) -> list[dict[str, Any]]:
    """Complete records at the front of ``buf`` (removed from it). A record is RS, compact
    JSON, LF; bytes before a record's RS are skipped, as the framing's decoder skips them."""
    out: list[dict[str, Any]] = []
    while True:
        end = buf.find(LF)
        if end < 0:
            return out
        record = bytes(buf[:end])
        del buf[:end + 1]
        start = record.rfind(RS)
        if start < 0:
            continue
        try:
            msg = json.loads(record[start + 1:])
        except ValueError:
            continue
        if isinstance(msg, dict):
            out.append(msg)


def _connect(endpoint: str) -> tuple[socket.socket, Any] | None:
    """A connected socket (and the channel lock it holds), or None: not for this path."""
    from .channel import ChannelLock
    port = None
    path = endpoint
    if endpoint.startswith("vsock:"):
        return None
    if endpoint.startswith("hvsock:"):
        path, _, tail = endpoint[len("hvsock:"):].rpartition(":")
        try:
            port = int(tail)
        except ValueError:
            return None
    lock = None
    if port is None:  # virtio-serial: one host connection at a time, across processes
        lock = ChannelLock(path)
        try:
            if not lock.try_acquire():
                lock.release()
                return None  # busy: the asyncio client queues and says so
        except OSError:
            lock.release()
            return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)  # a full listen backlog fails at once (EAGAIN) instead of hanging
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        if lock is not None:
            lock.release()
        return None
    sock.setblocking(True)
    if port is not None:
        try:
            sock.settimeout(2.0)
            sock.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n") and len(line) < 256:
                chunk = sock.recv(1)
                if not chunk:
                    break
                line += chunk
            sock.settimeout(None)
        except OSError:
            sock.close()
            return None
        if not line.startswith(b"OK"):
            sock.close()
            return None
    return sock, lock


def exec_once(endpoint: str, argv: list[str], *, shell: bool = False,
              env: dict[str, str] | None = None, cwd: str | None = None,
              stdin: bytes | None = None, timeout: float | None = None,
              on_output: Callable[[str, bytes], None]) -> Outcome | None:
    """Run ``argv`` in the guest, streaming its output to ``on_output(stream, bytes)``; None
    when this endpoint is not for the quick path (nothing was sent then)."""
    conn = _connect(endpoint)
    if conn is None:
        return None
    sock, lock = conn
    try:
        args: dict[str, Any] = {"argv": argv, "shell": shell, "env": env, "cwd": cwd,
                                "timeout": timeout, "stream": True}
        if stdin is not None:
            args["stdin"] = base64.b64encode(stdin).decode()
        ids = int.from_bytes(os.urandom(3), "big") + 1
        hello, call = ids, ids + 1
        frame = b"".join(RS + json.dumps(m, separators=(",", ":")).encode() + LF for m in (
            {"id": hello, "call": "hello", "args": {}},
            {"id": call, "call": "exec", "args": args}))
        try:
            sock.sendall(frame)
        except OSError as exc:
            raise AgentError(f"the agent connection was lost sending exec: {exc.strerror}",
                             hint=_HINT) from None
        sock.settimeout(None if timeout is None else timeout + 30)
        buf = bytearray()
        while True:
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                raise AgentTimeout(f"exec {argv[0] if argv else ''} got no answer in "
                                   f"{timeout:g}s", hint="is the guest overloaded or hung? "
                                   "`vmforge console NAME`") from None
            except OSError as exc:
                raise AgentError(f"the agent connection was lost: {exc.strerror}",
                                 hint=_HINT) from None
            if not data:
                raise AgentError("the agent connection was closed", hint=_HINT)
            buf += data
            for msg in _records(buf):
                mid = msg.get("id")
                if mid not in (hello, call):
                    continue  # a hello event, or a reply meant for an earlier connection
                if "stream" in msg:
                    if mid == call:
                        on_output(str(msg["stream"]), base64.b64decode(msg.get("data", "")))
                    continue
                if "error" in msg:
                    err = msg["error"] or {}
                    raise RemoteError(str(err.get("message")), kind=str(err.get("kind")))
                if mid == call:
                    res = msg.get("result") or {}
                    return Outcome(res.get("exit_code"), res.get("signal"),
                                   bool(res.get("timed_out")))
    finally:
        sock.close()
        if lock is not None:
            lock.release()
