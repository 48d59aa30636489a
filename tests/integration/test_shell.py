"""`vmforge shell` and `vmforge exec -t/-i` on a real guest, driven through a pseudo-terminal
as a person at a terminal would: type, read, resize the window, Ctrl-C, exit with a code."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest

from .conftest import VmHelper

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

VM = "shelly"


@pytest.fixture(scope="module")
def guest(vm_data: object) -> Iterator[VmHelper]:
    helper = VmHelper(vm_data)  # type: ignore[arg-type]
    try:
        helper.run(VM)
        yield helper
    finally:
        helper.cleanup()


class Terminal:
    """`python -m vmforge ARGS` on a pseudo-terminal of its own (its controlling terminal, so
    a window-size change reaches it as SIGWINCH)."""

    def __init__(self, vms: VmHelper, *args: str, rows: int = 24, cols: int = 80) -> None:
        self.master, slave = os.openpty()
        self.resize(rows, cols)
        self.original = termios.tcgetattr(slave)
        env = dict(os.environ, VMFORGE_HOME=str(vms.manager.data.root), TERM="xterm",
                   NO_COLOR="1")

        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        self.proc = subprocess.Popen([sys.executable, "-m", "vmforge", *args], stdin=slave,
                                     stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, preexec_fn=take_terminal)
        os.close(slave)
        self.screen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.screen += os.read(self.master, 65536)
            except OSError:  # EIO: the process has gone
                time.sleep(timeout)

    def expect(self, pattern: bytes, timeout: float = 60, start: int = 0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.screen, start)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen in {timeout}s; the screen: "
                                     f"{self.screen[-2000:]!r}")
            self.read(0.2)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"still running; the screen: {self.screen[-2000:]!r}")
            self.read(0.1)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_shell_types_resizes_ctrl_c_and_exits_with_the_code(guest: VmHelper) -> None:
    term = Terminal(guest, "shell", VM, rows=24, cols=80)
    try:
        term.expect(rb"[#$] ")  # the prompt of root's login shell (busybox sh -l)
        mark = len(term.screen)
        term.type("echo $((6*7)); tty\r")  # Enter is a carriage return, as from a keyboard
        term.expect(rb"\r\n42\r\n/dev/pts/\d+\r\n", start=mark)

        mark = len(term.screen)
        term.type("stty size\r")
        term.expect(rb"\r\n24 80\r\n", start=mark)
        term.resize(40, 120)  # the window changes: SIGWINCH to vmforge, a resize to the guest
        deadline = time.monotonic() + 60
        while True:
            mark = len(term.screen)
            term.type("stty size\r")
            m = term.expect(rb"\r\n(\d+) (\d+)\r\n", start=mark)
            if m.groups() == (b"40", b"120"):
                break
            assert time.monotonic() < deadline, "the guest's terminal was never resized"
            time.sleep(0.5)

        mark = len(term.screen)
        term.type("echo sleeping; sleep 60\r")
        term.expect(rb"\r\nsleeping\r\n", start=mark)  # the shell runs the line (TCG: slow)
        time.sleep(1.0)
        t0 = time.monotonic()
        term.type("\x03")  # Ctrl-C: a byte to the guest's terminal, which interrupts sleep
        term.type("echo after-$((1+1))\r")
        term.expect(rb"after-2", start=mark, timeout=30)
        assert time.monotonic() - t0 < 30
        assert term.proc.poll() is None  # vmforge itself was not interrupted

        term.type("exit 7\r")
        assert term.wait() == 7
        # raw mode was undone: the terminal is as the test made it
        assert termios.tcgetattr(term.master)[3] == term.original[3]
    finally:
        term.close()


def test_exec_t_gives_a_terminal_and_its_exit_code(guest: VmHelper) -> None:
    term = Terminal(guest, "exec", "-t", VM, "--", "sh", "-c",
                    "stty size; tty; test -t 0 && echo stdin-is-a-tty; exit 3", rows=30,
                    cols=90)
    try:
        assert term.wait() == 3
        text = term.screen.decode(errors="replace")
        assert "30 90" in text and "/dev/pts/" in text and "stdin-is-a-tty" in text
    finally:
        term.close()


def test_vi_through_exec_t(guest: VmHelper) -> None:
    term = Terminal(guest, "exec", "-t", VM, "--", "vi", "/tmp/from-vi.txt")
    try:
        term.expect(rb"from-vi\.txt|~", timeout=60)  # vi has drawn its screen
        time.sleep(0.5)
        term.type("ihello from vi\x1b")
        time.sleep(0.5)
        term.type(":wq\r")
        assert term.wait() == 0
    finally:
        term.close()
    res = guest.call(VM, lambda c: c.exec(["cat", "/tmp/from-vi.txt"]))
    assert res.stdout == b"hello from vi\n"


def test_exec_i_streams_stdin_while_the_command_runs(guest: VmHelper) -> None:
    env = dict(os.environ, VMFORGE_HOME=str(guest.manager.data.root))
    proc = subprocess.Popen([sys.executable, "-m", "vmforge", "exec", "-i", VM, "--", "sh",
                             "-c", "read line; echo got:$line; cat"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"first\n")
        proc.stdin.flush()
        # the answer comes while vmforge's stdin is still open: streamed, not read to the end
        assert proc.stdout.readline() == b"got:first\n"
        proc.stdin.write(b"rest")
        proc.stdin.close()
        assert proc.stdout.read() == b"rest"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
