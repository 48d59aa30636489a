"""A lock per VM, held across create, start, stop, kill and rm, so that one VM never gets two
hypervisor processes. It is an ``flock`` on a file under ``DATA/locks``: the kernel releases it
when its holder dies, which is how the next command knows that a ``starting`` or ``stopping``
row was left by a dead process rather than one still at work.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from ..errors import InvalidState

__all__ = ["VmLock", "DEFAULT_TIMEOUT"]

# How long an operation waits for another one on the same VM (``VMFORGE_LOCK_TIMEOUT``).
DEFAULT_TIMEOUT = 30.0


def _timeout(given: float | None) -> float:
    if given is not None:
        return given
    try:
        return float(os.environ.get("VMFORGE_LOCK_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


class VmLock:
    def __init__(self, locks_dir: Path, name: str) -> None:
        self.path = locks_dir / f"{name}.lock"
        self.name = name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never waits."""
        if self._fd is not None:
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # The file may have been unlinked (rm) between our open and our flock: then the
            # lock we hold guards nothing; take the new file instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._fd = fd
                return True
            os.close(fd)

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def _busy(self) -> InvalidState:
        return InvalidState(f"VM {self.name} is busy: another vmforge process (pid "
                            f"{self.holder()}) is working on it",
                            hint="wait for it to finish, or stop that process")

    def acquire(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + _timeout(timeout)
        while not self.try_acquire():
            if time.monotonic() > deadline:
                raise self._busy()
            time.sleep(0.05)

    async def acquire_async(self, timeout: float | None = None) -> None:
        import asyncio
        deadline = time.monotonic() + _timeout(timeout)
        while not self.try_acquire():
            if time.monotonic() > deadline:
                raise self._busy()
            await asyncio.sleep(0.05)

    def release(self, *, unlink: bool = False) -> None:
        if self._fd is None:
            return
        if unlink:  # while still holding it: a waiter then retries on the new file
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> VmLock:
        self.acquire()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
