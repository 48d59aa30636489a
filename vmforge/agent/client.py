"""Host side of the agent protocol: an asyncio client with overlapping calls and streaming.

Endpoints (``AgentClient(endpoint)``):

- a unix socket path: QEMU's virtio-serial chardev or libvirt's channel;
- ``vsock:CID:PORT``: AF_VSOCK, where the host has vhost-vsock;
- ``hvsock:PATH:PORT`` (or a path with ``hybrid_port=``): Firecracker / Cloud Hypervisor hybrid
  vsock, a unix socket that takes ``CONNECT <port>`` and then carries one vsock stream.

A virtio-serial channel carries **one host connection at a time**: QEMU's chardev accepts one
client and leaves the rest in a listen backlog of one, so concurrent clients (50 parallel
``vmforge exec``) used to be reset. Calls of one client overlap (every call has an id), but
separate processes cannot share a connection, so clients of a plain unix-socket endpoint queue
on an exclusive ``flock`` of ``<socket>.lock`` held from ``connect`` to ``close``: the kernel
drops it when its holder dies, the free case costs one system call (no sleep), and the wait is
bounded (``queue_timeout``, default 60 s, or ``$VMFORGE_AGENT_QUEUE_TIMEOUT``) before an
"agent busy" error. vsock and hybrid vsock give every client its own stream: never serialised.

Interactive execs (``start_exec``): the command's stdin is streamed while it runs, optionally on a
pseudo-terminal in the guest (``tty=True``: window size, resizes, the user's login shell). Input
is flow-controlled: at most ``INPUT_WINDOW`` chunks of ``INPUT_CHUNK`` bytes are unanswered, and
the guest answers a chunk once the process has been given it. :mod:`vmforge.agent.terminal`
attaches a local terminal to such a session.

Readiness is a hello from the *current* boot: the guest reports its kernel ``boot_id``, and a
client that asked for a reboot (or a caller passing ``not_boot=``) ignores hellos of the boot it
left. Under virtio-serial the host socket survives a guest reboot, so the hello of the session
that asked for the reboot would otherwise count as readiness.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import itertools
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AgentError, AgentTimeout, RemoteError, SpecError
from .channel import QUEUE_TIMEOUT_ENV, ChannelLock
from .protocol import Decoder, encode

__all__ = ["AgentClient", "ExecResult", "ExecSession", "ChannelLock", "connect", "parse_vsock",
           "parse_hvsock", "queue_timeout_from_env", "CHUNK", "DEFAULT_QUEUE_TIMEOUT",
           "QUEUE_TIMEOUT_ENV"]

log = logging.getLogger("vmforge.agent")

CHUNK = 512 * 1024
WINDOW = 8
INPUT_CHUNK = 64 * 1024
INPUT_WINDOW = 8
DEFAULT_QUEUE_TIMEOUT = 60.0
_HINT_RUNNING = "is the VM running? `vmforge ls`"

StreamFn = Callable[[str, bytes], Awaitable[None] | None]
QueuedFn = Callable[[str], None]


@dataclass
class ExecResult:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration: float
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class _Call:
    future: asyncio.Future[Any]
    on_stream: StreamFn | None = None
    chunks: list[tuple[str, bytes]] = field(default_factory=list)


class ExecSession:
    """A command running in the guest with its stdin streamed from here (``start_exec``).

    ``write`` and ``close_stdin`` feed its stdin (on a terminal: what the user types; there,
    end of file is the terminal's EOF character), ``resize`` changes the terminal's window,
    ``signal`` signals it, and ``wait`` returns its :class:`ExecResult` once it has exited and
    all of its output has been delivered to ``on_output``.
    """

    def __init__(self, client: AgentClient, mid: int, pending: _Call, what: str,
                 timeout: float | None, tty: bool) -> None:
        self._client = client
        self.id = mid
        self._pending = pending
        self._what = what
        self._timeout = timeout
        self.tty = tty
        self.stdin_open = True
        self._inflight: list[tuple[int, _Call]] = []

    @property
    def done(self) -> bool:
        return self._pending.future.done()

    async def write(self, data: bytes) -> None:
        """Give the command these bytes; waits while ``INPUT_WINDOW`` chunks are unanswered.
        Bytes for a command that has exited or closed its stdin are dropped."""
        for i in range(0, len(data), INPUT_CHUNK):
            await self._input({"data": base64.b64encode(data[i:i + INPUT_CHUNK]).decode()})

    async def close_stdin(self) -> None:
        await self._input({"eof": True})
        while self._inflight:
            await self._ack(*self._inflight.pop(0))

    async def _input(self, args: dict[str, Any]) -> None:
        if self.done or not self.stdin_open:
            return
        self._inflight.append(await self._client._send("input", {"exec": self.id, **args},
                                                        None))
        while len(self._inflight) >= INPUT_WINDOW:
            await self._ack(*self._inflight.pop(0))

    async def _ack(self, mid: int, pending: _Call) -> None:
        try:
            res = await self._client._result(mid, pending, None, "input")
        except RemoteError as exc:
            if exc.kind != "NoSession":
                raise
            self.stdin_open = False  # it has exited: what was typed after that is moot
            return
        if isinstance(res, dict) and res.get("open") is False:
            self.stdin_open = False

    async def _control(self, call: str, args: dict[str, Any]) -> None:
        if self.done:
            return
        try:
            await self._client.call(call, {"exec": self.id, **args}, timeout=30)
        except RemoteError as exc:
            if exc.kind != "NoSession":
                raise

    async def resize(self, rows: int, cols: int) -> None:
        """The terminal's new window size (the guest's kernel sends SIGWINCH)."""
        await self._control("resize", {"rows": rows, "cols": cols})

    async def signal(self, signum: int) -> None:
        """Signal the command (on a terminal: its foreground process group)."""
        await self._control("signal", {"signum": int(signum)})

    async def wait(self) -> ExecResult:
        wait = None if self._timeout is None else self._timeout + 30
        try:
            res = await self._client._result(self.id, self._pending, wait, self._what)
        finally:
            for mid, _call in self._inflight:  # answers still to come are not awaited
                self._client._pending.pop(mid, None)
            self._inflight.clear()
        out = b"".join(d for s, d in self._pending.chunks if s == "stdout")
        err = b"".join(d for s, d in self._pending.chunks if s == "stderr")
        return ExecResult(res["exit_code"], res["signal"], res["timed_out"], res["duration"],
                          out, err)


def queue_timeout_from_env(default: float = DEFAULT_QUEUE_TIMEOUT) -> float:
    """``$VMFORGE_AGENT_QUEUE_TIMEOUT`` in seconds (0 = do not wait), else ``default``."""
    raw = os.environ.get(QUEUE_TIMEOUT_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise SpecError(f"{raw!r} is not a number of seconds", field=QUEUE_TIMEOUT_ENV,
                        hint=f"e.g. {QUEUE_TIMEOUT_ENV}=120; 0 fails at once when busy")
    return value


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _connection_lost(what: str, exc: BaseException) -> AgentError:
    return AgentError(f"the agent connection was lost {what}: {_reason(exc)}",
                      hint="the VM may have stopped or be rebooting: `vmforge ls`, "
                           "`vmforge console NAME`")


class AgentClient:
    """One connection to a guest agent, shared by any number of overlapping calls.

    ``queue_timeout``: how long ``connect`` waits for a virtio-serial channel another client
    holds (None: ``$VMFORGE_AGENT_QUEUE_TIMEOUT`` or 60 s). ``on_queued(message)`` is called
    once if it has to wait.
    """

    def __init__(self, path: str | Path, *, hybrid_port: int | None = None,
                 queue_timeout: float | None = None,
                 on_queued: QueuedFn | None = None) -> None:
        endpoint = str(path)
        if endpoint.startswith("hvsock:"):
            endpoint, hybrid_port = parse_hvsock(endpoint)
        self.path = endpoint
        self.hybrid_port = hybrid_port
        self.queue_timeout = queue_timeout_from_env() if queue_timeout is None \
            else queue_timeout
        self.on_queued = on_queued
        self._lock: ChannelLock | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Call] = {}
        self._ids = itertools.count(random.randint(1, 1 << 30))
        self._hello = asyncio.Event()
        self._session: _Call | None = None
        self._left_boot: str | None = None
        self.hello: dict[str, Any] | None = None
        self.skipped = 0

    # -- connection
    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def exclusive(self) -> bool:
        """Whether the endpoint takes one host connection at a time (virtio-serial)."""
        return not self.path.startswith("vsock:") and self.hybrid_port is None

    async def connect(self, timeout: float = 10.0) -> AgentClient:
        """Open the connection and start the session (a ``hello`` call).

        ``timeout`` bounds waiting for the socket to appear and accept; waiting for a
        virtio-serial channel that another client holds is bounded by ``queue_timeout``.
        """
        if self.connected:
            return self
        deadline = time.monotonic() + timeout
        took_lock = False
        try:
            while True:
                try:
                    if self.exclusive and self._lock is None:
                        lock = ChannelLock(self.path)
                        try:
                            await lock.acquire(self.queue_timeout, self.on_queued)
                        except BaseException:
                            lock.release()
                            raise
                        self._lock, took_lock = lock, True
                    self._reader, self._writer = await self._open()
                    break
                except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
                        BlockingIOError, TimeoutError) as exc:
                    if time.monotonic() > deadline:
                        raise AgentError(f"cannot connect to the agent socket {self.path}: "
                                         f"{_reason(exc)}", hint=_HINT_RUNNING) from exc
                    # A full backlog drains in milliseconds; a missing socket takes longer.
                    await asyncio.sleep(0.005 if isinstance(exc, BlockingIOError) else 0.05)
                except OSError as exc:
                    raise AgentError(f"cannot connect to the agent socket {self.path}: "
                                     f"{_reason(exc)}", hint=_HINT_RUNNING) from exc
            if self.hybrid_port is not None:
                await self._hybrid_handshake(max(0.5, deadline - time.monotonic()))
            self.hello = None
            self._hello.clear()
            self._task = asyncio.create_task(self._read_loop())
            # The session handshake: answered once the agent runs; also tells the guest that
            # whatever an earlier connection left half done is abandoned.
            _mid, self._session = await self._send("hello", {}, None)
        except BaseException:
            await self._drop_connection()
            if took_lock and self._lock is not None:
                self._lock.release()
                self._lock = None
            raise
        return self

    async def _hybrid_handshake(self, timeout: float) -> None:
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(f"CONNECT {self.hybrid_port}\n".encode())
            await self._writer.drain()
            line = await asyncio.wait_for(self._reader.readline(), timeout)
        except TimeoutError:
            raise AgentTimeout(f"hybrid vsock handshake on {self.path}: no answer in "
                               f"{timeout:.1f}s", hint=_HINT_RUNNING) from None
        except (ConnectionError, OSError) as exc:
            raise _connection_lost("during the hybrid vsock handshake", exc) from exc
        if not line.startswith(b"OK"):
            raise AgentError(f"hybrid vsock handshake refused: {line!r}",
                             hint="is the guest agent listening on vsock port "
                                  f"{self.hybrid_port}?")

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        limit = 16 * 1024 * 1024
        if not self.path.startswith("vsock:"):
            # Connected by hand: a unix connect either completes at once (accepted or queued
            # in the listen backlog) or fails with EAGAIN when the backlog is full (QEMU's
            # chardev listens with a backlog of one). asyncio's sock_connect takes EAGAIN for
            # "in progress", waits for writability and returns an unconnected socket whose
            # first write fails with ENOTCONN: the raw "ConnectionResetError: Connection
            # lost" that 46 of 50 concurrent `vmforge exec` got. Here EAGAIN is retried.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
            return await asyncio.open_unix_connection(sock=sock, limit=limit)
        cid, port = parse_vsock(self.path)
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=limit)

    async def _drop_connection(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def close(self) -> None:
        """Close the connection, then let the next queued client have the channel."""
        try:
            await self._drop_connection()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            self._fail_all(AgentError("connection closed"))

    async def __aenter__(self) -> AgentClient:
        if not self.connected:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _fail_all(self, exc: Exception) -> None:
        for call in self._pending.values():
            if not call.future.done():
                call.future.set_exception(exc)
        self._pending.clear()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        decoder = Decoder()
        lost: BaseException | None = None
        try:
            while True:
                data = await self._reader.read(1 << 20)
                if not data:
                    break
                for msg in decoder.feed(data):
                    await self._dispatch(msg)
                self.skipped = decoder.skipped
        except (ConnectionError, OSError) as exc:
            lost = exc
        self._fail_all(AgentError(
            "the agent connection was closed" + (f" ({lost})" if lost else ""),
            hint="the VM may have stopped or be rebooting: `vmforge ls`"))
        if self._writer is not None:
            self._writer.close()

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "hello":
            self._saw_hello(msg.get("data") or {})
            return
        call = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
        if call is None:
            return  # a reply to a call of an earlier connection
        if "stream" in msg:
            data = base64.b64decode(msg.get("data", ""))
            if call.future.done():
                return  # the caller's stream callback failed: the rest is dropped
            if call.on_stream is not None:
                try:
                    res = call.on_stream(msg["stream"], data)
                    if asyncio.iscoroutine(res):
                        await res
                except Exception as exc:  # the caller's own error fails its call only
                    call.future.set_exception(exc)
            else:
                call.chunks.append((msg["stream"], data))
            return
        self._pending.pop(msg["id"], None)
        if call.future.done():
            return
        if "error" in msg:
            err = msg["error"] or {}
            call.future.set_exception(RemoteError(str(err.get("message")),
                                                  kind=str(err.get("kind"))))
        else:
            call.future.set_result(msg.get("result"))
            if call is self._session and isinstance(msg.get("result"), dict):
                self._saw_hello(msg["result"])

    def _saw_hello(self, data: dict[str, Any]) -> None:
        self.hello = dict(data)
        self._hello.set()

    # -- calls
    async def _send(self, call: str, args: dict[str, Any], on_stream: StreamFn | None
                    ) -> tuple[int, _Call]:
        if not self.connected and call != "hello":
            await self.connect()
        if self._writer is None:
            raise AgentError("not connected to the agent", hint=_HINT_RUNNING)
        mid = next(self._ids)
        pending = _Call(asyncio.get_running_loop().create_future(), on_stream)
        # Abandoned calls (timeouts, a hello race) must not log "exception never retrieved".
        pending.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending[mid] = pending
        try:
            self._writer.write(encode({"id": mid, "call": call, "args": args}))
            await self._writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            # RuntimeError: asyncio refuses writes to a transport closed under us.
            self._pending.pop(mid, None)
            raise _connection_lost(f"sending {call}", exc) from exc
        return mid, pending

    async def _result(self, mid: int, pending: _Call, timeout: float | None,
                      what: str) -> Any:
        try:
            return await asyncio.wait_for(pending.future, timeout)
        except TimeoutError:
            self._pending.pop(mid, None)
            raise AgentTimeout(f"{what} got no answer in {timeout:g}s",
                               hint="is the guest overloaded or hung? "
                                    "`vmforge console NAME`") from None

    async def call(self, name: str, args: dict[str, Any] | None = None, *,
                   timeout: float | None = 30.0, on_stream: StreamFn | None = None) -> Any:
        mid, pending = await self._send(name, args or {}, on_stream)
        return await self._result(mid, pending, timeout, f"agent call {name}")

    async def wait_ready(self, timeout: float = 120.0, *,
                         not_boot: str | None = None) -> dict[str, Any]:
        """Readiness: a hello of the current boot, pushed by the guest or answering the
        session ``hello`` call.

        The call is sent on connect; QEMU holds it until the agent opens its port, so a
        booting guest answers with the push and a running one with the reply. A hello whose
        ``boot_id`` is ``not_boot``, or the boot this client rebooted (``reboot()``), is not
        readiness: the next hello is awaited (the new boot's agent pushes one when it opens
        its port; under vsock the connection drops and is made again).
        """
        stale = not_boot or self._left_boot
        deadline = time.monotonic() + timeout
        last: AgentError | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                why = f" (last error: {last.message})" if last is not None else ""
                raise AgentTimeout(f"the agent did not announce itself within {timeout:.0f}s"
                                   + (" after the reboot" if stale else "") + why,
                                   hint="see `vmforge console NAME`")
            try:
                if not self.connected:
                    await self.connect(timeout=left)
                hello = self.hello
                if hello is not None and (stale is None or hello.get("boot_id") != stale):
                    self._left_boot = None
                    return hello
                self._hello.clear()
                assert self._task is not None
                pushed = asyncio.ensure_future(self._hello.wait())
                await asyncio.wait({pushed, self._task}, timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
                pushed.cancel()
                if not self._hello.is_set() and self._task.done():
                    # connection dropped (guest rebooting, vsock): reconnect after a pause
                    await self._drop_connection()
                    await asyncio.sleep(0.1)
            except AgentError as exc:
                last = exc
                await self._drop_connection()
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def wait_cloud_init(self, timeout: float = 600.0) -> dict[str, Any]:
        """Until cloud-init has finished (done, error) or is absent (not-installed, disabled).

        Polls a file read in the guest; no cloud-init CLI start-up (seconds under TCG).
        """
        deadline = time.monotonic() + timeout
        while True:
            state = dict(await self.call("cloud_init_status", timeout=30))
            if state.get("status") in ("done", "error", "disabled", "not-installed"):
                return state
            if time.monotonic() > deadline:
                raise AgentTimeout(f"cloud-init still {state.get('status')} after "
                                   f"{timeout:.0f}s")
            await asyncio.sleep(0.25)

    async def ping(self) -> dict[str, Any]:
        return dict(await self.call("ping"))

    async def interfaces(self) -> list[dict[str, Any]] | None:
        """The guest's network interfaces: ``name``, ``mac``, ``state``, ``ipv4``/``ipv6``
        (``ADDRESS/PREFIX``); None from an agent that predates the call."""
        try:
            res = await self.call("interfaces", timeout=10)
        except RemoteError as exc:
            if exc.kind == "unknown_call":
                return None
            raise
        return [dict(i) for i in res if isinstance(i, dict)] if isinstance(res, list) else None

    async def health(self, checks: list[dict[str, Any]] | None = None,
                     timeout: float = 60) -> dict[str, Any]:
        return dict(await self.call("health", {"checks": checks or []}, timeout=timeout))

    async def exec(self, argv: list[str], *, shell: bool = False,
                   env: dict[str, str] | None = None, cwd: str | None = None,
                   stdin: bytes | None = None, timeout: float | None = None,
                   on_output: StreamFn | None = None) -> ExecResult:
        args: dict[str, Any] = {"argv": list(argv), "shell": shell, "env": env, "cwd": cwd,
                                "timeout": timeout, "stream": True}
        if stdin is not None:
            args["stdin"] = base64.b64encode(stdin).decode()
        mid, pending = await self._send("exec", args, on_output)
        wait = None if timeout is None else timeout + 30
        res = await self._result(mid, pending, wait, f"exec {argv[0] if argv else ''}")
        out = b"".join(d for s, d in pending.chunks if s == "stdout")
        err = b"".join(d for s, d in pending.chunks if s == "stderr")
        return ExecResult(res["exit_code"], res["signal"], res["timed_out"], res["duration"],
                          out, err)

    async def features(self) -> set[str]:
        """What the guest agent can do beyond the first protocol (its hello's ``features``)."""
        hello = await self._session_hello()
        value = hello.get("features") if isinstance(hello, dict) else None
        return {str(f) for f in value} if isinstance(value, list) else set()

    async def require(self, feature: str, what: str) -> None:
        if feature not in await self.features():
            version = (self.hello or {}).get("agent_version", "unknown")
            raise AgentError(f"the guest agent (version {version}) cannot {what}",
                             hint="the agent was installed when the VM was created: recreate "
                                  "the VM to get the current one")

    async def start_exec(self, argv: list[str] | None = None, *, tty: bool = False,
                         rows: int = 24, cols: int = 80, term: str | None = None,
                         login: bool = False, user: str | None = None, shell: bool = False,
                         env: dict[str, str] | None = None, cwd: str | None = None,
                         timeout: float | None = None,
                         on_output: StreamFn | None = None) -> ExecSession:
        """Start a command whose stdin is streamed while it runs; ``tty``: on a new
        pseudo-terminal of ``rows`` x ``cols`` with ``$TERM`` = ``term`` (its output, stdout
        and stderr alike, is the ``stdout`` stream); ``login``: the user's login shell
        (``argv`` empty); ``user``: run as that guest user (name or uid)."""
        await self.require("tty" if tty else "stdin_stream",
                           "run a command on a terminal" if tty else "stream stdin")
        argv = list(argv or [])
        args: dict[str, Any] = {"argv": argv, "shell": shell, "env": env, "cwd": cwd,
                                "timeout": timeout, "stream": True, "interactive": True}
        if tty:
            args.update(tty=True, rows=rows, cols=cols, term=term)
        if login:
            args["login"] = True
        if user is not None:
            args["user"] = user
        mid, pending = await self._send("exec", args, on_output)
        what = "login shell" if login else f"exec {argv[0] if argv else ''}"
        return ExecSession(self, mid, pending, what, timeout, tty)

    async def mount(self, mounts: list[dict[str, Any]], timeout: float = 120.0
                    ) -> list[dict[str, Any]]:
        """Mount host folders shared with virtio-9p (``tag``, ``target``, ``readonly``) in the
        guest. Idempotent: a share already at its target reports ``already``. A share that
        cannot be mounted is a RemoteError (kind ``MountError``) with the guest's reason."""
        await self.require("mount", "mount shared folders")
        return [dict(r) for r in await self.call("mount", {"mounts": mounts}, timeout=timeout)]

    async def boot_timing(self) -> dict[str, Any]:
        """The guest's raw boot timing data (parsed by :mod:`vmforge.node.timeline`), placed
        on the host's clock: ``anchor`` pairs the guest's uptime with the host's time
        (``host_time``, the midpoint of the quickest of three pings; ``rtt`` its round trip)."""
        try:
            raw = dict(await self.call("boot_timing", timeout=120))
        except RemoteError as exc:
            if exc.kind != "unknown_call":
                raise
            hello = await self._session_hello()  # an older agent: its start is all there is
            raw = {"agent_started": hello.get("uptime_at_start"),
                   "boot_id": hello.get("boot_id")}
        best: dict[str, Any] | None = None
        for _ in range(3):
            t0 = time.time()
            pong = await self.ping()
            t1 = time.time()
            if best is None or t1 - t0 < best["rtt"]:
                best = {"host_time": (t0 + t1) / 2, "uptime": float(pong["uptime"]),
                        "rtt": t1 - t0}
        raw["anchor"] = best
        return raw

    async def _session_hello(self) -> dict[str, Any]:
        if self._session is None or not self.connected:
            await self.connect()
        assert self._session is not None
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._session.future), 30)
        except TimeoutError:
            raise AgentTimeout("the agent did not answer the session hello in 30s",
                               hint="is the guest up? `vmforge console NAME`") from None
        return hello if isinstance(hello, dict) else {}

    async def put_file(self, local: str | Path, remote: str, *, mode: int | None = None,
                       owner: str | None = None, group: str | None = None) -> dict[str, Any]:
        if not remote.startswith("/"):
            raise AgentError(f"guest path must be absolute: {remote!r}")
        local = Path(local)
        h = hashlib.sha256()
        try:
            st = local.stat()
            with open(local, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as exc:
            raise _local_error("cannot read", local, exc) from exc
        if mode is None:
            mode = st.st_mode & 0o7777
        begin = await self.call("put_begin", {"path": remote, "size": st.st_size,
                                              "sha256": h.hexdigest(), "mode": mode,
                                              "owner": owner, "group": group})
        handle = begin["handle"]
        inflight: list[tuple[int, _Call]] = []
        try:
            with open(local, "rb") as f:
                while chunk := f.read(CHUNK):
                    inflight.append(await self._send(
                        "put_chunk",
                        {"handle": handle, "data": base64.b64encode(chunk).decode()}, None))
                    if len(inflight) >= WINDOW:
                        await self._result(*inflight.pop(0), 60, f"put_chunk of {remote}")
        except OSError as exc:
            raise _local_error("cannot read", local, exc) from exc
        for mid, pending in inflight:
            await self._result(mid, pending, 60, f"put_chunk of {remote}")
        return dict(await self.call("put_end", {"handle": handle}, timeout=120))

    async def get_file(self, remote: str, local: str | Path) -> dict[str, Any]:
        if not remote.startswith("/"):
            raise AgentError(f"guest path must be absolute: {remote!r}")
        local = Path(local)
        tmp = local.with_name(f".{local.name}.vmforge-{os.getpid()}")
        h = hashlib.sha256()
        failed: list[OSError] = []
        try:
            try:
                f = open(tmp, "wb")
            except OSError as exc:
                raise _local_error("cannot write", local, exc) from exc
            with f:
                def sink(_stream: str, data: bytes) -> None:
                    # An error here must fail this copy, not the connection's reader.
                    if failed:
                        return
                    h.update(data)
                    try:
                        f.write(data)
                    except OSError as exc:
                        failed.append(exc)
                res = dict(await self.call("get_file", {"path": remote}, timeout=None,
                                           on_stream=sink))
                if failed:
                    raise _local_error("cannot write", local, failed[0]) from failed[0]
            if h.hexdigest() != res["sha256"]:
                raise AgentError(f"checksum mismatch copying {remote}: got {h.hexdigest()}, "
                                 f"guest says {res['sha256']}")
            try:
                os.chmod(tmp, res.get("mode", 0o644))
                os.replace(tmp, local)
            except OSError as exc:
                raise _local_error("cannot write", local, exc) from exc
            return res
        finally:
            tmp.unlink(missing_ok=True)

    async def put_tree(self, local: str | Path, remote: str) -> int:
        local = Path(local)
        if not local.exists():
            raise _local_error("cannot read", local,
                               FileNotFoundError(2, "No such file or directory"))
        if local.is_file():
            await self.put_file(local, remote)
            return 1
        count = 0
        try:
            await self.call("mkdir", {"path": remote, "mode": local.stat().st_mode & 0o7777})
            for dirpath, dirnames, filenames in os.walk(local):
                rel = Path(dirpath).relative_to(local)
                for d in sorted(dirnames):
                    mode = (Path(dirpath) / d).stat().st_mode & 0o7777
                    await self.call("mkdir",
                                    {"path": f"{remote}/{rel / d}".replace("/./", "/"),
                                     "mode": mode})
                for name in sorted(filenames):
                    src = Path(dirpath) / name
                    if src.is_file() and not src.is_symlink():
                        await self.put_file(src, f"{remote}/{rel / name}".replace("/./", "/"))
                        count += 1
        except OSError as exc:
            raise _local_error("cannot read", Path(exc.filename or local), exc) from exc
        return count

    async def get_tree(self, remote: str, local: str | Path) -> int:
        local = Path(local)
        tree = await self.call("list_tree", {"path": remote})
        if not tree["is_dir"]:
            await self.get_file(remote, local)
            return 1
        count = 0
        try:
            local.mkdir(parents=True, exist_ok=True)
            for entry in tree["entries"]:
                dest = local / entry["path"]
                if entry["type"] == "dir":
                    dest.mkdir(parents=True, exist_ok=True)
                    dest.chmod(entry["mode"])
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    await self.get_file(f"{tree['root']}/{entry['path']}", dest)
                    count += 1
        except OSError as exc:
            raise _local_error("cannot write", Path(exc.filename or local), exc) from exc
        return count

    async def boot_id(self) -> str | None:
        """The guest kernel's boot id (``/proc/sys/kernel/random/boot_id``), from the
        session's hello; None from an agent too old to report it."""
        value = (await self._session_hello()).get("boot_id")
        return str(value) if value else None

    async def shutdown(self) -> None:
        await self.call("shutdown")

    async def reboot(self) -> None:
        """Ask the guest to reboot. A later ``wait_ready`` waits for the *next* boot's hello
        (the connection may survive the reboot, and with it the old session's hello)."""
        left = await self.boot_id()
        await self.call("reboot")
        self._left_boot = left


def _local_error(what: str, path: Path, exc: OSError) -> AgentError:
    reason = _reason(exc)
    hint = {errno.ENOENT: "check the path (and that its directory exists)",
            errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
            errno.ENOSPC: "the host disk is full: free some space",
            errno.EISDIR: "name a file, or copy the directory as a whole"}.get(
                exc.errno or 0)
    return AgentError(f"{what} {path}: {reason}", hint=hint)


def parse_vsock(endpoint: str) -> tuple[int, int]:
    """``vsock:CID:PORT`` -> (cid, port)."""
    parts = endpoint.split(":")
    if len(parts) != 3 or parts[0] != "vsock" or not parts[1].isdigit() or \
            not parts[2].isdigit():
        raise AgentError(f"bad vsock endpoint {endpoint!r}", hint="use vsock:CID:PORT")
    return int(parts[1]), int(parts[2])


def parse_hvsock(endpoint: str) -> tuple[str, int]:
    """``hvsock:PATH:PORT`` -> (path, port): a hybrid-vsock unix socket and the guest port."""
    head, _, path_port = endpoint.partition(":")
    path, _, port = path_port.rpartition(":")
    if head != "hvsock" or not path or not port.isdigit():
        raise AgentError(f"bad hybrid vsock endpoint {endpoint!r}",
                         hint="use hvsock:/path/to/socket:PORT")
    return path, int(port)


async def connect(path: str | Path, *, timeout: float = 10.0,
                  hybrid_port: int | None = None,
                  queue_timeout: float | None = None) -> AgentClient:
    return await AgentClient(path, hybrid_port=hybrid_port,
                             queue_timeout=queue_timeout).connect(timeout)
