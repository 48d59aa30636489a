"""The agent channel under concurrency, failures and reboots, against the real guest Agent.

Three stand-in servers, no process started:

* ``serial``: behaves like QEMU's virtio-serial chardev: a listen backlog of one and one
  connection served at a time; extra clients wait in the backlog or are refused, so only the
  client's channel lock makes 64 of them work.
* ``hybrid``: Firecracker / Cloud Hypervisor hybrid vsock: ``CONNECT <port>`` then a stream of
  its own per connection, served concurrently (as the guest's vsock listener does).
* a guest that "reboots" on the same connection, as a virtio-serial guest does.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmforge.agent import guest
from vmforge.agent.client import (
    QUEUE_TIMEOUT_ENV,
    AgentClient,
    ChannelLock,
    parse_hvsock,
    queue_timeout_from_env,
)
from vmforge.errors import AgentError, AgentTimeout, SpecError


class Server:
    """A unix-socket stand-in for a hypervisor's agent endpoint, run on threads."""

    def __init__(self, path: str, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(1 if mode == "serial" else 128)
        self.srv.settimeout(0.1)
        self.stop = threading.Event()
        self.connections = 0
        self.live = 0
        self.max_live = 0
        self._count = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            if self.mode == "serial":
                self._serve(conn)  # one host connection at a time, like QEMU's chardev
            else:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._count:
            self.connections += 1
            self.live += 1
            self.max_live = max(self.max_live, self.live)
        try:
            if self.mode == "hybrid":
                line = b""
                while not line.endswith(b"\n"):
                    byte = conn.recv(1)
                    if not byte:
                        return
                    line += byte
                conn.sendall(b"OK 1073741824\n")
            guest.serve_stream(conn, 1.0)
        finally:
            with self._count:
                self.live -= 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.srv.close()


@pytest.fixture
def serial(tmp_path: Path) -> Iterator[Server]:
    srv = Server(str(tmp_path / "agent.sock"), "serial")
    yield srv
    srv.close()


@pytest.fixture
def hybrid(tmp_path: Path) -> Iterator[Server]:
    srv = Server(str(tmp_path / "hv.sock"), "hybrid")
    yield srv
    srv.close()


def lock_is_free(sock_path: str) -> bool:
    fd = os.open(sock_path + ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- virtio-serial


def test_64_concurrent_clients_on_a_one_connection_channel(serial: Server) -> None:
    queued: list[str] = []

    async def one(i: int) -> tuple[int, str]:
        async with AgentClient(serial.path, on_queued=queued.append) as c:
            hello = await c.wait_ready(5)
            await c.ping()
            return i, str(hello["agent_version"])

    async def go() -> list[tuple[int, str]]:
        return list(await asyncio.gather(*[one(i) for i in range(64)]))
    assert asyncio.run(go()) == [(i, guest.VERSION) for i in range(64)]
    assert serial.connections == 64 and serial.max_live == 1
    assert queued and all("queued" in q for q in queued)  # they did wait for each other
    assert lock_is_free(serial.path)


def test_without_the_lock_the_serial_stand_in_refuses_the_crowd(serial: Server) -> None:
    """The stand-in is faithful: raw concurrent connections do not all get through."""
    socks = []
    refused = 0
    for _ in range(16):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(serial.path)
            socks.append(s)
        except (BlockingIOError, ConnectionRefusedError):
            refused += 1
            s.close()
    for s in socks:
        s.close()
    assert refused > 0


def test_a_free_channel_is_taken_at_once_and_given_back(serial: Server) -> None:
    queued: list[str] = []

    async def go() -> None:
        c = AgentClient(serial.path, on_queued=queued.append)
        await c.connect()
        lock = Path(serial.path + ".lock")
        assert lock.read_text().strip() == str(os.getpid())
        assert lock.stat().st_mode & 0o777 == 0o600
        assert not lock_is_free(serial.path)
        await c.ping()
        await c.close()
        assert lock_is_free(serial.path)
    asyncio.run(go())
    assert queued == []


def test_a_busy_channel_fails_after_the_bound_with_a_clear_message(serial: Server) -> None:
    queued: list[str] = []

    async def go() -> None:
        async with AgentClient(serial.path) as holder:
            await holder.ping()
            waiter = AgentClient(serial.path, queue_timeout=0.3, on_queued=queued.append)
            t0 = time.monotonic()
            with pytest.raises(AgentError, match="agent busy") as info:
                await waiter.connect()
            assert 0.3 <= time.monotonic() - t0 < 5
            assert f"pid {os.getpid()}" in info.value.message
            assert info.value.hint and QUEUE_TIMEOUT_ENV in info.value.hint
            await holder.ping()  # the holder was not disturbed
    asyncio.run(go())
    assert len(queued) == 1 and "queued (up to 0.3s)" in queued[0]
    assert lock_is_free(serial.path)


def test_a_queued_client_gets_the_channel_when_the_holder_closes(serial: Server) -> None:
    async def go() -> None:
        holder = await AgentClient(serial.path).connect()
        waiter = AgentClient(serial.path, queue_timeout=30)
        pending = asyncio.ensure_future(waiter.connect())
        await asyncio.sleep(0.2)
        assert not pending.done()
        await holder.close()
        await asyncio.wait_for(pending, 5)
        assert (await waiter.ping())["pong"] is True
        await waiter.close()
    asyncio.run(go())


def test_a_full_listen_backlog_is_waited_out_not_taken_for_a_connection(tmp_path: Path
                                                                        ) -> None:
    """QEMU's chardev listens with a backlog of one. A unix connect to a full backlog fails
    with EAGAIN, which asyncio's sock_connect took for "in progress": the client then wrote to
    an unconnected socket and got a raw ConnectionResetError (the issue-14 failure)."""
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    filler = []
    while True:  # fill the backlog; nobody accepts yet
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        filler.append(s)

    async def go() -> None:
        with pytest.raises(AgentError, match="cannot connect") as info:
            await AgentClient(path, hybrid_port=None).connect(timeout=0.2)
        assert isinstance(info.value.__cause__, BlockingIOError)
        c = AgentClient(path)
        pending = asyncio.ensure_future(c.connect(timeout=10))
        await asyncio.sleep(0.1)
        assert not pending.done()  # still waiting for room in the backlog
        conn, _ = srv.accept()  # the "hypervisor" takes one: room for one more
        await asyncio.wait_for(pending, 5)
        assert c.connected
        await c.close()
        conn.close()
    try:
        asyncio.run(go())
    finally:
        for s in filler:
            s.close()
        srv.close()


def test_queue_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(QUEUE_TIMEOUT_ENV, "2.5")
    assert queue_timeout_from_env() == 2.5
    assert AgentClient("/nonexistent.sock").queue_timeout == 2.5
    assert AgentClient("/nonexistent.sock", queue_timeout=7).queue_timeout == 7
    monkeypatch.setenv(QUEUE_TIMEOUT_ENV, "soon")
    with pytest.raises(SpecError, match=QUEUE_TIMEOUT_ENV):
        queue_timeout_from_env()
    monkeypatch.delenv(QUEUE_TIMEOUT_ENV)
    assert queue_timeout_from_env() == 60


def test_a_failed_connect_gives_the_channel_back(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")  # the directory exists; nothing listens

    async def go() -> None:
        with pytest.raises(AgentError, match="cannot connect") as info:
            await AgentClient(path).connect(timeout=0.2)
        assert info.value.hint
    asyncio.run(go())
    assert lock_is_free(path)


def test_a_missing_vm_directory_is_an_agent_error(tmp_path: Path) -> None:
    async def go() -> None:
        with pytest.raises(AgentError, match="cannot connect"):
            await AgentClient(str(tmp_path / "gone" / "agent.sock")).connect(timeout=0.2)
    asyncio.run(go())


def test_a_read_only_socket_directory_locks_elsewhere(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refuse_beside(path: str, flags: int, mode: int = 0o777) -> int:
        if path.startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode)
    monkeypatch.setattr(os, "open", refuse_beside)
    a, b = ChannelLock(str(tmp_path / "agent.sock")), ChannelLock(str(tmp_path / "agent.sock"))
    try:
        assert a.try_acquire()
        assert not a.path.startswith(str(tmp_path))
        assert not b.try_acquire() and b.path == a.path
    finally:
        a.release()
        b.release()


# ---------------------------------------------------------------------------- failures


def test_a_connection_dropped_by_the_other_end_is_an_agent_error(tmp_path: Path) -> None:
    path = str(tmp_path / "rude.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    srv.settimeout(0.1)
    stop = threading.Event()

    def rude() -> None:  # reads a little, then hangs up: every connection, every time
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.recv(100)
            conn.close()
    t = threading.Thread(target=rude, daemon=True)
    t.start()

    async def go() -> None:
        async with AgentClient(path) as c:
            with pytest.raises(AgentError) as info:
                for _ in range(50):  # the drop shows on a reply or on a send
                    await c.call("ping", timeout=5)
                    await asyncio.sleep(0.01)
            assert not isinstance(info.value, AgentTimeout)
            assert info.value.hint
    try:
        asyncio.run(go())
    finally:
        stop.set()
        t.join(2)
        srv.close()
    assert lock_is_free(path)


def test_a_failing_stream_callback_fails_its_call_only(serial: Server, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(600_000))

    async def go() -> None:
        async with AgentClient(serial.path) as c:
            def boom(_stream: str, _data: bytes) -> None:
                raise BrokenPipeError(32, "Broken pipe")
            with pytest.raises(BrokenPipeError):
                await c.call("get_file", {"path": str(src)}, on_stream=boom)
            assert (await c.ping())["pong"] is True  # the reader survived
    asyncio.run(go())


def test_local_file_errors_name_the_path(serial: Server, tmp_path: Path) -> None:
    src = tmp_path / "f.txt"
    src.write_text("x")

    async def go() -> None:
        async with AgentClient(serial.path) as c:
            with pytest.raises(AgentError, match="cannot read .*missing") as info:
                await c.put_tree(tmp_path / "missing", "/tmp/x")
            assert info.value.hint
            with pytest.raises(AgentError, match="cannot read .*missing"):
                await c.put_file(tmp_path / "missing", "/tmp/x")
            with pytest.raises(AgentError, match="cannot write .*nodir"):
                await c.get_file(str(src), tmp_path / "nodir" / "f.txt")
            assert not list((tmp_path).glob("**/.f.txt.vmforge-*"))
    asyncio.run(go())


# ---------------------------------------------------------------------------- vsock


def test_hybrid_vsock_clients_are_not_serialised(hybrid: Server) -> None:
    """64 clients hold their connections at the same time: no lock, no queue."""
    async def go() -> None:
        all_in = asyncio.Event()
        opened = 0

        async def one() -> None:
            nonlocal opened
            c = AgentClient(f"hvsock:{hybrid.path}:1024", queue_timeout=0,
                            on_queued=lambda m: pytest.fail(m))
            async with c:
                await c.wait_ready(5)
                opened += 1
                if opened == 64:
                    all_in.set()
                await asyncio.wait_for(all_in.wait(), 10)
                await c.ping()
        await asyncio.gather(*[one() for _ in range(64)])
    asyncio.run(go())
    assert hybrid.max_live == 64
    assert not Path(hybrid.path + ".lock").exists()


def test_endpoint_syntax() -> None:
    assert parse_hvsock("hvsock:/run/vm:1/v.sock:1024") == ("/run/vm:1/v.sock", 1024)
    c = AgentClient("hvsock:/x/v.sock:52")
    assert (c.path, c.hybrid_port, c.exclusive) == ("/x/v.sock", 52, False)
    assert not AgentClient("vsock:3:1024").exclusive
    assert AgentClient("/x/agent.sock").exclusive
    with pytest.raises(AgentError, match="hybrid vsock endpoint"):
        parse_hvsock("hvsock:/x/v.sock")


# ---------------------------------------------------------------------------- reboots


class RebootingAgent(guest.Agent):
    """A guest whose reboot, like a virtio-serial guest's, keeps the host connection: the
    new boot's agent pushes its hello on the same stream (or, if ``works`` is false, the
    reboot does nothing at all)."""

    boot = "boot-1"
    works = True

    def hello_data(self) -> dict[str, Any]:
        return {**super().hello_data(), "boot_id": RebootingAgent.boot}

    def call_reboot(self, mid: Any) -> dict[str, Any]:
        def later() -> None:
            time.sleep(0.3)
            RebootingAgent.boot = "boot-2"
            self.hello()
        if RebootingAgent.works:
            threading.Thread(target=later, daemon=True).start()
        return {"accepted": True}


@pytest.fixture
def rebooting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setattr(RebootingAgent, "boot", "boot-1")
    monkeypatch.setattr(RebootingAgent, "works", True)
    monkeypatch.setattr(guest, "Agent", RebootingAgent)
    srv = Server(str(tmp_path / "agent.sock"), "serial")
    yield srv
    srv.close()


def test_after_a_reboot_the_old_boots_hello_is_not_readiness(rebooting: Server) -> None:
    async def go() -> None:
        async with AgentClient(rebooting.path) as c:
            assert (await c.wait_ready(5))["boot_id"] == "boot-1"
            assert await c.boot_id() == "boot-1"
            await c.reboot()
            hello = await c.wait_ready(5)
            assert hello["boot_id"] == "boot-2"
            assert (await c.wait_ready(5))["boot_id"] == "boot-2"  # no longer waits
    asyncio.run(go())


def test_a_reboot_that_does_nothing_is_not_taken_for_one(rebooting: Server) -> None:
    RebootingAgent.works = False

    async def go() -> None:
        async with AgentClient(rebooting.path) as c:
            await c.reboot()
            with pytest.raises(AgentTimeout, match="after the reboot"):
                await c.wait_ready(1)
    asyncio.run(go())


def test_wait_ready_not_boot(rebooting: Server) -> None:
    async def go() -> None:
        async with AgentClient(rebooting.path) as c:
            with pytest.raises(AgentTimeout):
                await c.wait_ready(0.5, not_boot="boot-1")
            assert (await c.wait_ready(1, not_boot="boot-0"))["boot_id"] == "boot-1"
    asyncio.run(go())
