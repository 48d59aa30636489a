"""The host client against the real guest Agent class over a local unix socket.

The socket server stands in for Firecracker/Cloud Hypervisor's hybrid vsock (which needs
KVM, absent here): it answers ``CONNECT <port>`` with ``OK <n>`` and then hands the stream to
the guest agent's own code, as the guest's vsock listener would. No process is started.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmforge.agent import guest
from vmforge.agent.client import AgentClient
from vmforge.errors import AgentError, RemoteError


def serve(srv: socket.socket, handshake: bool, stop: threading.Event) -> None:
    srv.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            if handshake:
                line = b""
                while not line.endswith(b"\n"):
                    line += conn.recv(1)
                if line != b"CONNECT 1024\n":
                    conn.sendall(b"ERR\n")
                    continue
                conn.sendall(b"OK 1073741824\n")
            guest.serve_stream(conn, 1.0)  # the guest's own per-connection loop (vsock)


@pytest.fixture(params=[True, False], ids=["hybrid-vsock", "unix"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, bool]]:
    path = str(tmp_path / "a.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(srv, request.param, stop), daemon=True)
    t.start()
    yield path, request.param
    stop.set()
    t.join(2)
    srv.close()


def client(endpoint: tuple[str, bool]) -> AgentClient:
    path, hybrid = endpoint
    return AgentClient(path, hybrid_port=1024 if hybrid else None)


def test_handshake_hello_ping(endpoint: tuple[str, bool]) -> None:
    async def go() -> None:
        async with client(endpoint) as c:
            hello = await c.wait_ready(5)
            assert hello["agent_version"] == guest.VERSION
            assert (await c.ping())["pong"] is True
            with pytest.raises(RemoteError, match="unknown call"):
                await c.call("no_such_call")
    asyncio.run(go())


def test_files_round_trip_and_overlap(endpoint: tuple[str, bool], tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))

    async def go() -> None:
        async with client(endpoint) as c:
            dests = [str(tmp_path / f"guest-{i}.bin") for i in range(4)]
            await asyncio.gather(*[c.put_file(src, d, mode=0o640) for d in dests])
            for d in dests:
                assert Path(d).read_bytes() == src.read_bytes()
                assert Path(d).stat().st_mode & 0o777 == 0o640
            info = await c.get_file(dests[0], tmp_path / "back.bin")
            assert info["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
            pings = await asyncio.gather(*[c.ping() for _ in range(100)])
            assert len(pings) == 100
    asyncio.run(go())


def test_relative_paths_refused(endpoint: tuple[str, bool], tmp_path: Path) -> None:
    async def go() -> None:
        async with client(endpoint) as c:
            with pytest.raises(RemoteError, match="absolute"):
                await c.call("put_begin", {"path": "x", "size": 0, "sha256": ""})
            with pytest.raises(AgentError, match="absolute"):
                await c.get_file("relative", tmp_path / "x")
    asyncio.run(go())


def test_refused_handshake(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(srv, True, stop), daemon=True)
    t.start()
    try:
        async def go() -> None:
            with pytest.raises(AgentError, match="handshake refused"):
                await AgentClient(path, hybrid_port=9).connect(2)
        asyncio.run(go())
    finally:
        stop.set()
        t.join(2)
        srv.close()
