"""Host side of the agent protocol: an asyncio client with overlapping calls and streaming.

Connections: a unix socket (QEMU's virtio-serial chardev, libvirt's channel) or a hybrid-vsock
unix socket (Firecracker, Cloud Hypervisor) after a ``CONNECT <port>`` handshake.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AgentError, AgentTimeout, RemoteError
from .protocol import Decoder, encode

__all__ = ["AgentClient", "ExecResult", "connect", "parse_vsock", "CHUNK"]

CHUNK = 512 * 1024
WINDOW = 8

StreamFn = Callable[[str, bytes], Awaitable[None] | None]


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


class AgentClient:
    def __init__(self, path: str | Path, *, hybrid_port: int | None = None) -> None:
        self.path = str(path)
        self.hybrid_port = hybrid_port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Call] = {}
        self._ids = itertools.count(random.randint(1, 1 << 30))
        self._hello = asyncio.Event()
        self._session: _Call | None = None
        self.hello: dict[str, Any] | None = None
        self.skipped = 0

    # -- connection
    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self, timeout: float = 10.0) -> AgentClient:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._reader, self._writer = await self._open()
                break
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError,
                    TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise AgentError(f"cannot connect to the agent socket {self.path}: {exc}",
                                     hint="is the VM running? `vmforge ls`") from exc
                await asyncio.sleep(0.05)
        if self.hybrid_port is not None:
            self._writer.write(f"CONNECT {self.hybrid_port}\n".encode())
            line = await asyncio.wait_for(self._reader.readline(), timeout)
            if not line.startswith(b"OK"):
                raise AgentError(f"hybrid vsock handshake refused: {line!r}")
        self._hello.clear()
        self._task = asyncio.create_task(self._read_loop())
        # The session handshake: answered once the agent runs; also tells the guest that
        # whatever an earlier connection left half done is abandoned.
        _mid, self._session = await self._send("hello", {}, None)
        return self

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        limit = 16 * 1024 * 1024
        if not self.path.startswith("vsock:"):
            return await asyncio.open_unix_connection(self.path, limit=limit)
        cid, port = parse_vsock(self.path)
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=limit)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._writer = None
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
        try:
            while True:
                data = await self._reader.read(1 << 20)
                if not data:
                    break
                for msg in decoder.feed(data):
                    await self._dispatch(msg)
                self.skipped = decoder.skipped
        except (ConnectionError, OSError):
            pass
        self._fail_all(AgentError("the agent connection was closed (VM stopped or rebooting?)"))
        if self._writer is not None:
            self._writer.close()

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "hello":
            self.hello = msg.get("data") or {}
            self._hello.set()
            return
        call = self._pending.get(msg.get("id"))  # type: ignore[arg-type]
        if call is None:
            return  # a reply to a call of an earlier connection
        if "stream" in msg:
            data = base64.b64decode(msg.get("data", ""))
            if call.on_stream is not None:
                res = call.on_stream(msg["stream"], data)
                if asyncio.iscoroutine(res):
                    await res
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

    # -- calls
    async def _send(self, call: str, args: dict[str, Any], on_stream: StreamFn | None
                    ) -> tuple[int, _Call]:
        if not self.connected and call != "hello":
            await self.connect()
        assert self._writer is not None
        mid = next(self._ids)
        pending = _Call(asyncio.get_running_loop().create_future(), on_stream)
        # Abandoned calls (timeouts, a hello race) must not log "exception never retrieved".
        pending.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending[mid] = pending
        self._writer.write(encode({"id": mid, "call": call, "args": args}))
        await self._writer.drain()
        return mid, pending

    async def call(self, name: str, args: dict[str, Any] | None = None, *,
                   timeout: float | None = 30.0, on_stream: StreamFn | None = None) -> Any:
        mid, pending = await self._send(name, args or {}, on_stream)
        try:
            return await asyncio.wait_for(pending.future, timeout)
        except TimeoutError:
            self._pending.pop(mid, None)
            raise AgentTimeout(f"agent call {name} got no answer in {timeout}s") from None

    async def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Readiness: the guest's pushed hello, or its answer to the session ``hello`` call.

        The call is sent on connect; QEMU holds it until the agent opens its port, so a
        booting guest answers with the push and a running one with the reply.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeout(f"the agent did not announce itself within {timeout:.0f}s")
            try:
                if not self.connected:
                    await self.connect(timeout=left)
                assert self._session is not None
                session = self._session.future
                pushed = asyncio.ensure_future(self._hello.wait())
                await asyncio.wait({pushed, session}, timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
                pushed.cancel()
                if session.done() and session.exception() is None:
                    self.hello = dict(session.result())
                    return self.hello
                if self._hello.is_set():
                    return self.hello or {}
                if session.done():  # connection dropped (guest rebooting): reconnect
                    await asyncio.sleep(0.1)
            except AgentError:
                await asyncio.sleep(0.1)

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
        try:
            res = await asyncio.wait_for(pending.future, wait)
        except TimeoutError:
            self._pending.pop(mid, None)
            raise AgentTimeout(f"exec {argv[0]} got no answer") from None
        out = b"".join(d for s, d in pending.chunks if s == "stdout")
        err = b"".join(d for s, d in pending.chunks if s == "stderr")
        return ExecResult(res["exit_code"], res["signal"], res["timed_out"], res["duration"],
                          out, err)

    async def put_file(self, local: str | Path, remote: str, *, mode: int | None = None,
                       owner: str | None = None, group: str | None = None) -> dict[str, Any]:
        if not remote.startswith("/"):
            raise AgentError(f"guest path must be absolute: {remote!r}")
        local = Path(local)
        size = local.stat().st_size
        h = hashlib.sha256()
        with open(local, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if mode is None:
            mode = local.stat().st_mode & 0o7777
        begin = await self.call("put_begin", {"path": remote, "size": size,
                                              "sha256": h.hexdigest(), "mode": mode,
                                              "owner": owner, "group": group})
        handle = begin["handle"]
        inflight: list[asyncio.Future[Any]] = []
        with open(local, "rb") as f:
            while chunk := f.read(CHUNK):
                _mid, pending = await self._send(
                    "put_chunk", {"handle": handle, "data": base64.b64encode(chunk).decode()},
                    None)
                inflight.append(pending.future)
                if len(inflight) >= WINDOW:
                    await asyncio.wait_for(inflight.pop(0), 60)
        for fut in inflight:
            await asyncio.wait_for(fut, 60)
        return dict(await self.call("put_end", {"handle": handle}, timeout=120))

    async def get_file(self, remote: str, local: str | Path) -> dict[str, Any]:
        if not remote.startswith("/"):
            raise AgentError(f"guest path must be absolute: {remote!r}")
        local = Path(local)
        tmp = local.with_name(f".{local.name}.vmforge-{os.getpid()}")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                def sink(_stream: str, data: bytes) -> None:
                    h.update(data)
                    f.write(data)
                res = dict(await self.call("get_file", {"path": remote}, timeout=None,
                                           on_stream=sink))
            if h.hexdigest() != res["sha256"]:
                raise AgentError(f"checksum mismatch copying {remote}: got {h.hexdigest()}, "
                                 f"guest says {res['sha256']}")
            os.chmod(tmp, res.get("mode", 0o644))
            os.replace(tmp, local)
            return res
        finally:
            tmp.unlink(missing_ok=True)

    async def put_tree(self, local: str | Path, remote: str) -> int:
        local = Path(local)
        if local.is_file():
            await self.put_file(local, remote)
            return 1
        count = 0
        await self.call("mkdir", {"path": remote, "mode": local.stat().st_mode & 0o7777})
        for dirpath, dirnames, filenames in os.walk(local):
            rel = Path(dirpath).relative_to(local)
            for d in sorted(dirnames):
                mode = (Path(dirpath) / d).stat().st_mode & 0o7777
                await self.call("mkdir", {"path": f"{remote}/{rel / d}".replace("/./", "/"),
                                          "mode": mode})
            for name in sorted(filenames):
                src = Path(dirpath) / name
                if src.is_file() and not src.is_symlink():
                    await self.put_file(src, f"{remote}/{rel / name}".replace("/./", "/"))
                    count += 1
        return count

    async def get_tree(self, remote: str, local: str | Path) -> int:
        local = Path(local)
        tree = await self.call("list_tree", {"path": remote})
        if not tree["is_dir"]:
            await self.get_file(remote, local)
            return 1
        local.mkdir(parents=True, exist_ok=True)
        count = 0
        for entry in tree["entries"]:
            dest = local / entry["path"]
            if entry["type"] == "dir":
                dest.mkdir(parents=True, exist_ok=True)
                dest.chmod(entry["mode"])
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                await self.get_file(f"{tree['root']}/{entry['path']}", dest)
                count += 1
        return count

    async def shutdown(self) -> None:
        await self.call("shutdown")

    async def reboot(self) -> None:
        await self.call("reboot")


def parse_vsock(endpoint: str) -> tuple[int, int]:
    """``vsock:CID:PORT`` -> (cid, port)."""
    parts = endpoint.split(":")
    if len(parts) != 3 or parts[0] != "vsock" or not parts[1].isdigit() or \
            not parts[2].isdigit():
        raise AgentError(f"bad vsock endpoint {endpoint!r}", hint="use vsock:CID:PORT")
    return int(parts[1]), int(parts[2])


async def connect(path: str | Path, *, timeout: float = 10.0,
                  hybrid_port: int | None = None) -> AgentClient:
    return await AgentClient(path, hybrid_port=hybrid_port).connect(timeout)
