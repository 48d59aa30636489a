"""The lock that gives one host process at a time a virtio-serial agent channel.

Kept apart from the asyncio client (vmforge.agent.client) so that the blocking one-shot exec of
the command line (vmforge.agent.quick) takes the same lock without importing asyncio.
"""

from __future__ import annotations

import fcntl
import io
import os
import time

from ..errors import AgentBusy

TYPE_CHECKING = False  # not typing's: `vmforge exec` must not import it
if TYPE_CHECKING:
    from collections.abc import Callable

    QueuedFn = Callable[[str], None]

__all__ = ["ChannelLock", "QUEUE_TIMEOUT_ENV"]

QUEUE_TIMEOUT_ENV = "VMFORGE_AGENT_QUEUE_TIMEOUT"


class ChannelLock:
    """One host connection at a time on a virtio-serial agent channel, across processes.

    An exclusive ``flock`` of ``<socket>.lock`` (0600, beside the socket; in the temporary
    directory if that directory is read-only to us). flock belongs to the open file, so two
    clients in one process queue as two processes do, and the kernel releases it when the
    holder exits or is killed. The holder writes its pid into the file so that waiters can say
    whom they wait for. The file is never unlinked: unlinking a lock file races with waiters,
    and it goes with the VM directory.
    """

    POLL_MIN = 0.002
    POLL_MAX = 0.05

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.path = socket_path + ".lock"
        self._file: io.FileIO | None = None
        self.held = False

    def _open(self) -> io.FileIO:
        if self._file is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError):
                    raise  # no VM directory: the caller's "cannot connect"
                # A socket in a directory we cannot write (a libvirt channel directory):
                # lock a per-user file named after the socket instead.
                import hashlib  # rare: kept off the start-up path of `vmforge exec`
                import tempfile

                digest = hashlib.sha256(os.path.realpath(self.socket_path).encode()).hexdigest()
                self.path = os.path.join(tempfile.gettempdir(),
                                         f"vmforge-agent-{os.getuid()}-{digest[:20]}.lock")
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._file = io.FileIO(fd, "r+", closefd=True)
        return self._file

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never blocks."""
        f = self._open()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        try:
            os.ftruncate(f.fileno(), 0)
            os.pwrite(f.fileno(), f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # only informational (a full disk must not stop a connection)
        return True

    def holder(self) -> str:
        """Who holds the lock, for messages: ``pid N (command line)`` when known."""
        try:
            raw = os.pread(self._open().fileno(), 32, 0).decode().strip()
            pid = int(raw)
        except (OSError, ValueError, UnicodeDecodeError):
            return "another client"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            return f"pid {pid}"
        if argv and os.path.basename(argv[0]).startswith("python") and argv[1:2] == ["-m"]:
            argv = argv[2:]
        cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))
        return f"pid {pid} ({cmd[:100]})" if cmd else f"pid {pid}"

    async def acquire(self, timeout: float, on_queued: QueuedFn | None = None) -> None:
        """Take the lock, waiting at most ``timeout`` seconds; else AgentError("agent busy").

        Free: one flock call. Busy: polls with a growing, jittered delay (2 ms to 50 ms), which
        costs 64 waiters about a thousand cheap system calls a second and stays cancellable; a
        blocking flock in a thread could be neither cancelled nor bounded.
        """
        import asyncio
        import logging
        import random
        log = logging.getLogger("vmforge.agent")
        if self.try_acquire():
            return
        if timeout > 0:
            note = (f"the agent channel {self.socket_path} is in use by {self.holder()}; "
                    f"queued (up to {timeout:g}s)")
            log.info("%s", note)
            if on_queued is not None:
                on_queued(note)
        t0 = time.monotonic()
        delay = self.POLL_MIN
        while True:
            left = t0 + timeout - time.monotonic()
            if left <= 0:
                holder = self.holder()
                self.release()
                raise AgentBusy(
                    f"agent busy: waited {timeout:g}s (the bound of the queue) for the agent "
                    f"channel {self.socket_path}, in use by {holder}",
                    hint="a virtio-serial agent channel carries one host connection at a time "
                         "and other commands queue for it: wait for that command (or stop "
                         f"it), or raise the bound with {QUEUE_TIMEOUT_ENV}=SECONDS")
            await asyncio.sleep(min(left, delay * random.uniform(0.5, 1.5)))
            if self.try_acquire():
                log.debug("agent channel %s: acquired after %.3fs", self.socket_path,
                          time.monotonic() - t0)
                return
            delay = min(delay * 1.5, self.POLL_MAX)

    def release(self) -> None:
        """Unlock and close (idempotent)."""
        f, self._file = self._file, None
        self.held = False
        if f is not None:
            f.close()  # closing the last descriptor of the open file releases the flock
