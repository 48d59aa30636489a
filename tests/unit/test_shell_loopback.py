"""Interactive execs (terminals, streamed stdin) against the real guest Agent class over a
local unix socket, as the guest's vsock listener serves them: each connection gets its own
Agent (``guest.serve_stream``). The programs run are the host's own ``sh``, ``stty``, ``cat``."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import socket
import termios
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vmforge.agent import guest
from vmforge.agent.client import AgentClient, ExecSession
from vmforge.agent.terminal import attach, raw_mode, terminal_size, window_size, writer
from vmforge.errors import AgentError, RemoteError

T = TypeVar("T")


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    thread = threading.Thread(target=guest.serve_listener, args=(srv, 1.0), daemon=True)
    thread.start()
    yield path
    srv.close()


def run(endpoint: str, fn: Callable[[AgentClient], Awaitable[T]], timeout: float = 30) -> T:
    async def go() -> T:
        async with AgentClient(endpoint) as c:
            return await asyncio.wait_for(fn(c), timeout)
    return asyncio.run(go())


class Screen:
    """What a terminal session printed, with a wait for a pattern."""

    def __init__(self) -> None:
        self.data = b""
        self.changed = asyncio.Event()

    def __call__(self, stream: str, chunk: bytes) -> None:
        self.data += chunk
        self.changed.set()

    async def expect(self, pattern: bytes, timeout: float = 10) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.data)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; the screen: {self.data!r}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


def test_hello_announces_features(endpoint: str) -> None:
    feats = run(endpoint, lambda c: c.features())
    assert {"tty", "stdin_stream", "signal", "boot_timing"} <= feats


def test_command_on_a_terminal(endpoint: str) -> None:
    async def go(c: AgentClient) -> tuple[Any, Screen]:
        screen = Screen()
        s = await c.start_exec(["sh", "-c", "stty size; tty; echo TERM=$TERM; "
                                "test -t 0 && test -t 1 && test -t 2 && echo all-ttys; exit 3"],
                               tty=True, rows=30, cols=100, term="vt100", on_output=screen)
        return await s.wait(), screen
    res, screen = run(endpoint, go)
    assert res.exit_code == 3 and res.signal is None
    text = screen.data.decode()
    assert "30 100" in text and "/dev/pts/" in text and "TERM=vt100" in text
    assert "all-ttys" in text
    assert "\r\n" in text  # the guest's terminal translates newlines, as a terminal does


def test_interactive_shell_types_resizes_and_exits_with_its_code(endpoint: str) -> None:
    async def go(c: AgentClient) -> Any:
        screen = Screen()
        s = await c.start_exec(["sh"], tty=True, rows=24, cols=80, on_output=screen)
        await s.write(b"echo $((6*7))\n")
        await screen.expect(rb"42\r\n")
        await s.write(b"stty size\n")
        await screen.expect(rb"24 80")
        await s.resize(40, 132)
        await s.write(b"stty size\n")
        await screen.expect(rb"40 132")
        await s.write(b"exit 7\n")
        return await s.wait()
    assert run(endpoint, go).exit_code == 7


def test_ctrl_c_is_a_byte_the_guest_terminal_turns_into_sigint(endpoint: str) -> None:
    async def go(c: AgentClient) -> Any:
        screen = Screen()
        s = await c.start_exec(["sh", "-c", "trap 'echo got-int; exit 9' INT; echo ready; "
                                "while :; do sleep 0.1; done"], tty=True, on_output=screen)
        await screen.expect(rb"ready")
        await s.write(b"\x03")
        res = await s.wait()
        assert b"got-int" in screen.data
        return res
    assert run(endpoint, go).exit_code == 9


def test_signal_call_reaches_the_foreground_job(endpoint: str) -> None:
    async def go(c: AgentClient) -> Any:
        screen = Screen()
        s = await c.start_exec(["sh", "-c", "trap 'echo got-term; exit 4' TERM; echo ready; "
                                "while :; do sleep 0.1; done"], tty=True, on_output=screen)
        await screen.expect(rb"ready")
        await s.signal(15)
        return await s.wait()
    assert run(endpoint, go).exit_code == 4


def test_streamed_stdin_without_a_terminal(endpoint: str) -> None:
    async def go(c: AgentClient) -> Any:
        screen = Screen()
        s = await c.start_exec(["cat"], on_output=screen)
        await s.write(b"first line\n")
        await screen.expect(rb"first line\n")  # echoed back while cat still runs
        assert not s.done
        await s.write(b"second")
        await s.close_stdin()
        res = await s.wait()
        assert screen.data == b"first line\nsecond"
        return res
    assert run(endpoint, go).exit_code == 0


def test_large_stdin_is_flow_controlled(endpoint: str) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 5)

    async def go(c: AgentClient) -> Any:
        s = await c.start_exec(["wc", "-c"])
        await s.write(payload)
        await s.close_stdin()
        return await s.wait()
    res = run(endpoint, go, timeout=60)
    assert res.exit_code == 0 and int(res.stdout) == len(payload)


def test_input_after_exit_is_dropped_quietly(endpoint: str) -> None:
    async def go(c: AgentClient) -> Any:
        s = await c.start_exec(["sh", "-c", "exit 2"])
        res = await s.wait()
        await s.write(b"too late")
        await s.close_stdin()
        await s.resize(10, 10)
        with pytest.raises(RemoteError, match="no running interactive exec"):
            await c.call("input", {"exec": s.id, "data": ""})
        return res
    assert run(endpoint, go).exit_code == 2


def test_command_that_stops_reading_does_not_wedge_the_agent(endpoint: str) -> None:
    async def go(c: AgentClient) -> Any:
        s = await c.start_exec(["sleep", "1"])
        writing = asyncio.ensure_future(s.write(b"x" * (4 * 1024 * 1024)))
        assert (await c.ping())["pong"]  # the channel stays free while the pipe is full
        res = await s.wait()
        await asyncio.wait_for(writing, 10)  # answered once the command has gone
        assert not s.stdin_open
        return res
    assert run(endpoint, go).exit_code == 0


def test_login_shell_of_the_user(endpoint: str) -> None:
    me = pwd.getpwuid(os.getuid())

    async def go(c: AgentClient) -> Any:
        screen = Screen()
        s = await c.start_exec(login=True, tty=True, user=me.pw_name, on_output=screen)
        await s.write(b"echo HOME=$HOME USER=$USER; pwd; exit 5\n")
        res = await s.wait()
        text = screen.data.decode(errors="replace")
        assert f"HOME={me.pw_dir} USER={me.pw_name}" in text
        return res
    assert run(endpoint, go).exit_code == 5


def test_unknown_user_and_bad_login_are_refused(endpoint: str) -> None:
    async def go(c: AgentClient) -> None:
        with pytest.raises(RemoteError, match="no user 'no-such-user-x'"):
            await (await c.start_exec(login=True, tty=True, user="no-such-user-x")).wait()
        with pytest.raises(RemoteError, match="give no argv"):
            await (await c.start_exec(["true"], login=True, tty=True)).wait()
    run(endpoint, go)


def test_hangup_when_the_host_goes_away(endpoint: str) -> None:
    async def go(c: AgentClient) -> int:
        screen = Screen()
        await c.start_exec(["sh", "-c", "echo pid=$$; exec sleep 100"], tty=True,
                           on_output=screen)
        m = await screen.expect(rb"pid=(\d+)")
        return int(m.group(1))
    pid = run(endpoint, go)  # the client closes its connection here
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the terminal's command outlived its host"
        time.sleep(0.05)


def test_old_agent_without_terminals_is_named(endpoint: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "FEATURES", ())

    async def go(c: AgentClient) -> None:
        with pytest.raises(AgentError, match="cannot run a command on a terminal") as info:
            await c.start_exec(["sh"], tty=True)
        assert info.value.hint and "recreate" in info.value.hint
    run(endpoint, go)


def test_old_exec_calls_are_unchanged(endpoint: str) -> None:
    res = run(endpoint, lambda c: c.exec(["sh", "-c", "cat; echo err >&2; exit 3"],
                                         stdin=b"piped"))
    assert (res.exit_code, res.stdout, res.stderr) == (3, b"piped", b"err\n")


# ---------------------------------------------------------------------------- host terminal

def test_attach_forwards_a_pipe_and_its_end(endpoint: str) -> None:
    r, w = os.pipe()
    os.write(w, b"through attach\n")
    os.close(w)
    out_r, out_w = os.pipe()

    async def go(c: AgentClient) -> Any:
        s: ExecSession = await c.start_exec(["cat"], on_output=writer(out_w))
        return await attach(s, r)
    try:
        res = run(endpoint, go)
        os.close(out_w)
        assert res.exit_code == 0
        assert os.read(out_r, 1000) == b"through attach\n"
    finally:
        os.close(r)
        os.close(out_r)


def test_attach_reads_a_regular_file(endpoint: str, tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_bytes(b"from a file\n" * 1000)
    seen: list[bytes] = []

    async def go(c: AgentClient) -> Any:
        s = await c.start_exec(["wc", "-l"], on_output=lambda _s, d: seen.append(d))
        with open(src, "rb") as f:
            return await attach(s, f.fileno())
    assert run(endpoint, go).exit_code == 0
    assert b"".join(seen).strip() == b"1000"


def test_raw_mode_and_window_size_on_a_pseudo_terminal() -> None:
    master, slave = os.openpty()
    try:
        guest.set_winsize(master, 33, 111)
        assert window_size(slave) == (33, 111)
        assert terminal_size((slave,)) == (33, 111)
        before = termios.tcgetattr(slave)
        with raw_mode(slave) as raw:
            assert raw
            now = termios.tcgetattr(slave)
            assert not now[3] & termios.ICANON and not now[3] & termios.ISIG
        assert termios.tcgetattr(slave) == before
        r, w = os.pipe()
        with raw_mode(r) as raw:
            assert raw is False  # not a terminal: left alone
        os.close(r)
        os.close(w)
    finally:
        os.close(master)
        os.close(slave)
