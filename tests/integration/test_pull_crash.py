"""Crash injection for `vmforge image pull`: a real vmforge process is killed (SIGKILL, and
SIGTERM, which the CLI turns into the same clean-up as Ctrl-C) at each progress point of a
pull from a slow local server; the next pull of the same URL must then succeed with the right
hash, leave exactly one image version, and no temporary file or lock behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.imageserver import Server

pytestmark = pytest.mark.subprocess

IMAGE = os.urandom(24 * 1024 * 1024 + 77)  # big enough that storing takes a while
SHA = hashlib.sha256(IMAGE).hexdigest()
MiB = 1 << 20


def vmforge(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "VMFORGE_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "vmforge", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def parts(home: Path) -> list[Path]:
    return list((home / "images" / "tmp").glob("*.part"))


def part_size(home: Path) -> int:
    return max((p.stat().st_size for p in parts(home) if p.exists()), default=-1)


def leftovers(home: Path) -> list[str]:
    """Files under the data directory that are neither the catalog nor a stored image."""
    keep = {"state.db", "state.db-wal", "state.db-shm"}
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")
                  if p.is_file() and p.name not in keep and p.parent.name != "blobs")


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(image=IMAGE) as s:
        yield s


def pull_cmd(url: str, checksum: bool) -> list[str]:
    return ["image", "pull", url, "--name", "base", *(["--sha256", SHA] if checksum else [])]


def check_consistent(home: Path, server: Server, url: str, checksum: bool = True) -> None:
    """The next pull succeeds; one version, the right bytes, nothing else left behind."""
    rc, _, err = finish(vmforge(home, *pull_cmd(url, checksum)))
    assert rc == 0, err
    rc, out, err = finish(vmforge(home, "image", "ls", "--json"))
    assert rc == 0, err
    imgs = json.loads(out)
    assert [(i["ref"], i["files"]["disk"]) for i in imgs] == [("base:1", SHA)]
    blobs = list((home / "images" / "blobs").iterdir())
    assert [b.name for b in blobs] == [SHA]
    assert hashlib.sha256(blobs[0].read_bytes()).hexdigest() == SHA
    rc, out, err = finish(vmforge(home, "image", "verify", "--json"))
    assert rc == 0 and json.loads(out)[0]["status"] == "ok", err
    assert leftovers(home) == []
    for d in (home / "images").rglob("*"):  # owner-only, like the whole data directory
        if d.is_dir():
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


# Each point: where the server pauses the first transfer (None: it does not), and when the
# test kills, judged from outside by what the process has written.
POINTS: dict[str, tuple[int | None, Callable[[Path, Server], bool]]] = {
    "connected": (64 * 1024, lambda home, s: s.held.is_set() and part_size(home) >= 0),
    "first-bytes": (MiB + 64 * 1024,
                    lambda home, s: s.held.is_set() and part_size(home) >= MiB),
    "mid-transfer": (len(IMAGE) // 2 + 64 * 1024,
                     lambda home, s: s.held.is_set() and part_size(home) >= len(IMAGE) // 2 - MiB),
    "last-byte": (len(IMAGE) - 1,
                  lambda home, s: s.held.is_set() and part_size(home) >= len(IMAGE) - MiB),
    "storing": (None, lambda home, s: part_size(home) == len(IMAGE)
                or any((home / "images" / "blobs").glob("*"))),
}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("point", list(POINTS))
def test_killed_pull_then_pull_again(point: str, sig: signal.Signals, server: Server,
                                     tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = server.url + "/disk.img"
    hold, reached = POINTS[point]
    server.hold_at = hold
    p = vmforge(home, *pull_cmd(url, True))
    try:
        wait_for(lambda: reached(home, server) or p.poll() is not None, point)
        p.send_signal(sig)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        server.release.set()
    if sig == signal.SIGTERM and p.returncode > 0:  # cleaned up like Ctrl-C
        assert p.returncode == 130, p.stderr.read() if p.stderr else ""
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in parts(home))
    before = len(server.ranges)
    check_consistent(home, server, url)
    if point in ("first-bytes", "mid-transfer", "last-byte"):  # resumed, not fetched again
        assert server.ranges[before] is not None and server.full_gets() == 1


def test_killed_while_storing_without_checksum(server: Server, tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = server.url + "/disk.img"
    p = vmforge(home, *pull_cmd(url, False))
    try:
        wait_for(lambda: POINTS["storing"][1](home, server) or p.poll() is not None, "storing")
        p.kill()
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    check_consistent(home, server, url, checksum=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_while_waiting_for_another_pull(sig: signal.Signals, server: Server,
                                               tmp_path: Path) -> None:
    """Two pulls of one URL: the second waits for the first's lock and is killed there."""
    home = tmp_path / "home"
    url = server.url + "/disk.img"
    server.hold_at = len(IMAGE) // 2
    first = vmforge(home, *pull_cmd(url, True))
    second = None
    try:
        wait_for(lambda: server.held.is_set(), "the first pull to be half-way")
        second = vmforge(home, *pull_cmd(url, True))
        assert second.stderr is not None
        line = second.stderr.readline()
        assert "waiting for another pull" in line, line
        second.send_signal(sig)
        second.wait(30)
        server.release.set()
        rc, _, err = finish(first)
        assert rc == 0, err
    finally:
        server.release.set()
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert server.full_gets() == 1
    check_consistent(home, server, url)
    assert server.full_gets() == 1  # the next pull found the image stored
