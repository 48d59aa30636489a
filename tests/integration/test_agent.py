"""The guest agent on real TCG guests: readiness, exec, transfers, overlap, reconnects."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmforge.agent.client import AgentClient
from vmforge.errors import AgentError, RemoteError

from .conftest import VmHelper

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def guest(vm_data: object) -> object:
    from .conftest import VmHelper
    helper = VmHelper(vm_data)  # type: ignore[arg-type]
    helper.run("agent1", memory_mib=768)
    yield helper
    helper.cleanup()


def call(helper: VmHelper, fn):  # type: ignore[no-untyped-def]
    return helper.call("agent1", fn)


def test_exec_true_and_exit_codes(guest: VmHelper) -> None:
    assert call(guest, lambda c: c.exec(["true"])).exit_code == 0
    res = call(guest, lambda c: c.exec(["sh", "-c", "echo out; echo err >&2; exit 7"]))
    assert (res.exit_code, res.stdout, res.stderr) == (7, b"out\n", b"err\n")


def test_exec_env_cwd_stdin_shell(guest: VmHelper) -> None:
    res = call(guest, lambda c: c.exec(["sh", "-c", "pwd; echo $GREETING; cat"],
                                       env={"GREETING": "hi"}, cwd="/tmp", stdin=b"piped"))
    assert res.stdout == b"/tmp\nhi\npiped"
    res = call(guest, lambda c: c.exec(["echo a | tr a b"], shell=True))
    assert res.stdout == b"b\n"
    res = call(guest, lambda c: c.exec(["echo", "a", "|", "tr", "a", "b"]))
    assert res.stdout == b"a | tr a b\n"  # no shell unless asked


def test_exec_1mib_stdout_streams(guest: VmHelper) -> None:
    chunks: list[bytes] = []

    async def go(c: AgentClient) -> object:
        return await c.exec(["head", "-c", "1048576", "/dev/urandom"],
                            on_output=lambda s, d: chunks.append(d) if s == "stdout" else None)
    res = call(guest, go)
    assert res.exit_code == 0
    assert sum(len(c) for c in chunks) == 1048576
    assert len(chunks) >= 2  # arrived in pieces while it ran


def test_exec_streams_while_running(guest: VmHelper) -> None:
    seen: list[float] = []

    async def go(c: AgentClient) -> object:
        t0 = time.monotonic()
        return await c.exec(["sh", "-c", "echo first; sleep 2; echo second"],
                            on_output=lambda s, d: seen.append(time.monotonic() - t0))
    call(guest, go)
    assert len(seen) == 2 and seen[1] - seen[0] > 1.5


def test_exec_timeout_kills_with_signal(guest: VmHelper) -> None:
    res = call(guest, lambda c: c.exec(["sleep", "30"], timeout=1))
    assert res.timed_out and res.signal == signal.SIGTERM and res.exit_code is None
    assert res.duration < 10


def test_64_overlapping_execs(guest: VmHelper) -> None:
    async def go(c: AgentClient) -> list[object]:
        return list(await asyncio.gather(*[
            c.exec(["sh", "-c", f"sleep 1; echo {i}"]) for i in range(64)]))
    t0 = time.monotonic()
    results = call(guest, go)
    elapsed = time.monotonic() - t0
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(64)]  # type: ignore[attr-defined]
    assert elapsed < 60  # they overlapped: serial would be >= 64 s


def test_100mib_both_ways_checksummed(guest: VmHelper, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    put = call(guest, lambda c: c.put_file(src, "/tmp/big.bin", mode=0o600))
    assert put["sha256"] == digest and put["size"] == 100 << 20
    res = call(guest, lambda c: c.exec(["stat", "-c", "%a %s", "/tmp/big.bin"]))
    assert res.stdout == f"600 {100 << 20}\n".encode()
    back = tmp_path / "back.bin"
    got = call(guest, lambda c: c.get_file("/tmp/big.bin", back))
    assert got["sha256"] == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    call(guest, lambda c: c.exec(["rm", "/tmp/big.bin"]))


def test_directories_recursively(guest: VmHelper, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "a" / "b" / "deep.sh").write_text("#!/bin/sh\n")
    (tree / "a" / "b" / "deep.sh").chmod(0o750)
    assert call(guest, lambda c: c.put_tree(tree, "/srv/tree")) == 2
    res = call(guest, lambda c: c.exec(["stat", "-c", "%a", "/srv/tree/a/b/deep.sh"]))
    assert res.stdout == b"750\n"
    out = tmp_path / "out"
    assert call(guest, lambda c: c.get_tree("/srv/tree", out)) == 2
    assert (out / "top.txt").read_text() == "top"
    assert (out / "a" / "b" / "deep.sh").stat().st_mode & 0o777 == 0o750


def test_paths_must_be_absolute_and_owner_applies(guest: VmHelper, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(RemoteError, match="absolute"):
        call(guest, lambda c: c.call("get_file", {"path": "etc/passwd"}))
    with pytest.raises(AgentError, match="absolute"):
        call(guest, lambda c: c.put_file(f, "relative/path"))
    call(guest, lambda c: c.put_file(f, "/tmp/owned", owner="root", group="root"))


def test_agent_listens_on_nothing(guest: VmHelper) -> None:
    res = call(guest, lambda c: c.exec(["cat", "/proc/net/tcp", "/proc/net/tcp6",
                                        "/proc/net/udp", "/proc/net/udp6"]))
    listening = [line for line in res.stdout.decode().splitlines()[1:]
                 if line.split()[3:4] == ["0A"]]
    assert listening == []


def test_health_with_checks(guest: VmHelper) -> None:
    h = call(guest, lambda c: c.health([{"command": ["true"]}, {"command": ["false"]},
                                        {"http_get": "http://127.0.0.1:2280/health"}]))
    assert h["agent"] == "ok" and h["memory"]["MemTotal"] > 0
    assert [c["ok"] for c in h["checks"]] == [True, False, False]
    assert not h["healthy"]
    assert "ConnectionRefused" in h["checks"][2]["detail"]


BOOT_ID = "/proc/sys/kernel/random/boot_id"

# A client that begins an upload it never finishes: it says "begun" once the guest holds a
# half-written upload (a chunk acknowledged), then keeps sending chunks until it is killed.
KILLED_UPLOADER = """
import asyncio, base64, os, sys
from vmforge.agent.client import AgentClient
async def go():
    async with AgentClient(sys.argv[1]) as c:
        begin = await c.call("put_begin", {"path": "/tmp/partial", "size": 1 << 30,
                                           "sha256": "0" * 64, "mode": 0o644})
        data = base64.b64encode(os.urandom(512 * 1024)).decode()
        await c.call("put_chunk", {"handle": begin["handle"], "data": data})
        print("begun", flush=True)
        while True:
            await c.call("put_chunk", {"handle": begin["handle"], "data": data})
asyncio.run(go())
"""


def test_client_killed_mid_transfer_then_next_call_works(guest: VmHelper) -> None:
    sock = guest.manager.get("agent1").agent_endpoint
    proc = subprocess.Popen([sys.executable, "-c", KILLED_UPLOADER, str(sock)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the upload has begun
        assert line == b"begun\n", f"the uploader ended early: {line!r}"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-transfer, not finished
    # The killed client held the channel: the kernel released its lock, so this connects.
    res = call(guest, lambda c: c.exec(["sh", "-c", "echo still here; ls -a /tmp"]))
    assert res.exit_code == 0 and res.stdout.startswith(b"still here")
    assert b"partial" not in res.stdout  # the half-written temp file was cleaned up


def test_reboot_and_the_agent_reconnects(guest: VmHelper) -> None:
    def read_boot_id() -> str:  # through a new client (and a new connection) each time
        res = call(guest, lambda c: c.exec(["cat", BOOT_ID]))
        assert res.exit_code == 0
        return str(res.stdout.decode().strip())
    before = read_boot_id()
    assert len(before) == 36

    async def go(c: AgentClient) -> dict[str, object]:
        assert await c.boot_id() == before
        await c.reboot()
        return await c.wait_ready(240)  # the old session's hello does not count
    hello = call(guest, go)
    after = read_boot_id()
    assert hello["vm_id"] == "agent1"
    assert after != before, "the guest did not reboot"
    assert hello["boot_id"] == after
