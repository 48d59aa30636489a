"""Attach a local terminal (or any pair of descriptors) to an :class:`ExecSession`.

The host half of ``vmforge shell`` and ``vmforge exec -t/-i``: the local terminal goes into raw
mode (so Ctrl-C, Ctrl-Z and the arrow keys travel to the guest as bytes: the guest's own
terminal turns them into signals and escape sequences), what is typed is forwarded as it is
read, window-size changes (SIGWINCH) become ``resize`` calls, and the terminal is restored
however the session ends. Output is written to ``stdout_fd`` by the caller's ``on_output``
(:func:`writer`), so that it starts before the session object exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator

from .client import ExecResult, ExecSession

__all__ = ["attach", "raw_mode", "terminal_size", "window_size", "writer"]

READ_SIZE = 64 * 1024
QUEUE_HIGH = 16  # chunks read ahead of the guest before the reader pauses
QUEUE_LOW = 4


def window_size(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``, or None if it is not one."""
    import fcntl
    import struct
    import termios
    try:
        rows, cols, _x, _y = struct.unpack(
            "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def terminal_size(fds: tuple[int, ...] = (0, 1, 2)) -> tuple[int, int]:
    """The first terminal's window size among ``fds``, else $LINES x $COLUMNS, else 24 x 80."""
    for fd in fds:
        size = window_size(fd)
        if size:
            return size
    try:
        return int(os.environ["LINES"]), int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        return 24, 80


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[bool]:
    """Put the terminal on ``fd`` in raw mode for the block (yields False if it is none) and
    restore its exact previous settings afterwards, whatever happens."""
    import termios
    import tty
    try:
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield False
        return
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def writer(fd: int) -> Callable[[str, bytes], None]:
    """An ``on_output`` that writes every stream to ``fd`` (blocking, complete writes);
    stderr of a command without a terminal goes to fd 2."""
    def write(stream: str, data: bytes) -> None:
        target = 2 if stream == "stderr" else fd
        view = memoryview(data)
        while view:
            view = view[os.write(target, view):]
    return write


async def attach(session: ExecSession, stdin_fd: int | None = 0, *,
                 resize_fd: int | None = None) -> ExecResult:
    """Forward ``stdin_fd`` to the session (None: nothing; end of file closes its stdin) and,
    if ``resize_fd`` is a terminal, its window-size changes; return once the command exits."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
    state = {"reading": False}
    tasks: set[asyncio.Task[None]] = set()

    def readable() -> None:
        assert stdin_fd is not None
        try:
            data = os.read(stdin_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or chunks.qsize() >= QUEUE_HIGH:
            loop.remove_reader(stdin_fd)
            state["reading"] = False
        chunks.put_nowait(data or None)

    async def forward() -> None:
        assert stdin_fd is not None
        try:
            loop.add_reader(stdin_fd, readable)
            state["reading"] = True
            polled = True
        except (PermissionError, ValueError, OSError):
            polled = False  # a regular file: epoll refuses it, and reads never block
        while True:
            if polled:
                data = await chunks.get()
                if data is not None and not state["reading"] and chunks.qsize() < QUEUE_LOW:
                    loop.add_reader(stdin_fd, readable)
                    state["reading"] = True
            else:
                data = os.read(stdin_fd, READ_SIZE) or None
            if data is None:
                await session.close_stdin()
                return
            await session.write(data)

    def winched() -> None:
        assert resize_fd is not None
        size = window_size(resize_fd)
        if size:
            task = asyncio.ensure_future(session.resize(*size))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    forwarder = asyncio.ensure_future(forward()) if stdin_fd is not None else None
    watching = False
    if resize_fd is not None and window_size(resize_fd) is not None:
        loop.add_signal_handler(signal.SIGWINCH, winched)
        watching = True
    waiter = asyncio.ensure_future(session.wait())
    try:
        pending = {waiter} | ({forwarder} if forwarder else set())
        while not waiter.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and not task.cancelled() and task.exception():
                    raise task.exception()  # type: ignore[misc]
        return waiter.result()
    finally:
        if not waiter.done():
            waiter.cancel()
        if watching:
            loop.remove_signal_handler(signal.SIGWINCH)
        if stdin_fd is not None and state["reading"]:
            loop.remove_reader(stdin_fd)
        for other in [forwarder, *tasks]:
            if other is not None and not other.done():
                other.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await other
