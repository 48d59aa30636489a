"""The blocking one-shot exec of the command line (vmforge.agent.quick) against the real guest
Agent class over a local unix socket, plain (virtio-serial) and with the hybrid vsock
handshake (Firecracker, Cloud Hypervisor). The guest agent's code runs the commands here, so
these tests start processes (harmless shell commands) and carry the marker."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmforge.agent.channel import ChannelLock
from vmforge.agent.quick import _records, exec_once
from vmforge.errors import RemoteError

from .test_agent_loopback import serve


@pytest.fixture(params=[True, False], ids=["hybrid-vsock", "unix"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "a.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(srv, request.param, stop), daemon=True)
    t.start()
    yield f"hvsock:{path}:1024" if request.param else path
    stop.set()
    t.join(2)
    srv.close()


def run(endpoint: str, argv: list[str], **kw: object) -> tuple[object, list[tuple[str, bytes]]]:
    chunks: list[tuple[str, bytes]] = []
    res = exec_once(endpoint, argv, on_output=lambda s, d: chunks.append((s, d)),
                    **kw)  # type: ignore[arg-type]
    return res, chunks


@pytest.mark.subprocess
def test_output_streams_and_exit_status(endpoint: str) -> None:
    res, chunks = run(endpoint, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert res is not None and res.exit_code == 7 and res.signal is None  # type: ignore[attr-defined]
    assert b"".join(d for s, d in chunks if s == "stdout") == b"out\n"
    assert b"".join(d for s, d in chunks if s == "stderr") == b"err\n"


@pytest.mark.subprocess
def test_stdin_env_cwd_shell_and_signal(endpoint: str, tmp_path: Path) -> None:
    res, chunks = run(endpoint, ["cat; echo $K; pwd"], shell=True, env={"K": "v"},
                      cwd=str(tmp_path), stdin=b"in\n")
    assert res.exit_code == 0  # type: ignore[attr-defined]
    assert b"".join(d for _s, d in chunks) == f"in\nv\n{tmp_path}\n".encode()
    res, _ = run(endpoint, ["sh", "-c", "kill -9 $$"])
    assert res.signal == 9  # type: ignore[attr-defined]


@pytest.mark.subprocess
def test_timeout_is_the_guests(endpoint: str) -> None:
    res, _ = run(endpoint, ["sleep", "5"], timeout=0.5)
    assert res.timed_out  # type: ignore[attr-defined]


@pytest.mark.subprocess
def test_a_guest_error_is_a_remote_error(endpoint: str) -> None:
    with pytest.raises(RemoteError, match="No such file"):
        run(endpoint, ["/nonexistent/command"])


def test_what_it_does_not_handle_is_left_to_the_asyncio_client(tmp_path: Path) -> None:
    """None, with nothing sent: no socket, a socket nobody listens on, vsock, and a
    virtio-serial channel that another process holds (the asyncio client queues for it)."""
    assert exec_once(str(tmp_path / "none.sock"), ["true"], on_output=print) is None
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    assert exec_once(str(tmp_path / "dead.sock"), ["true"], on_output=print) is None
    assert exec_once("vsock:3:1024", ["true"], on_output=print) is None
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "busy.sock"))
    srv.listen(1)
    held = ChannelLock(str(tmp_path / "busy.sock"))
    assert held.try_acquire()
    try:
        assert exec_once(str(tmp_path / "busy.sock"), ["true"], on_output=print) is None
        srv.settimeout(0.1)
        with pytest.raises(TimeoutError):
            srv.accept()  # it did not even connect
    finally:
        held.release()
        srv.close()


def test_records_are_read_as_the_framing_writes_them() -> None:
    buf = bytearray(b'junk\x1e{"id":1}\n\x1e{"id":2,"x":"a\\nb"}\n\x1e{"id"')
    assert _records(buf) == [{"id": 1}, {"id": 2, "x": "a\nb"}]
    assert bytes(buf) == b'\x1e{"id"'  # the incomplete record waits for more
    buf += b':3}\n\x1e{"id":4}\x1e{"id":5}\n'  # a record cut short by the next one
    assert _records(buf) == [{"id": 3}, {"id": 5}]
