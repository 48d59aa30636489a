"""Snapshots, clones and warm pools through a real `vmforge serve` process and a real TCG guest
of the minimal image (one VM booted cold, the rest restored):

* over REST (vmforge.client): a snapshot of the running VM, a clone of it (as a job whose
  progress is readable), exec in the clone (the file written before, its own hostname), a
  snapshot in use refused (409) and the same JSON as the local `snapshot inspect`;
* over the remote CLI (``--host``): `pool create --size 1 --from-snapshot`, `pool ls` until a
  VM is ready, `pool take`, exec in the taken VM, `run --from-snapshot`, `pool rm`,
  `snapshot rm`;
* everything removed at the end, the pool's refiller gone, no QEMU left.

Every VM, pool and refiller is removed by name or pid at teardown, even when a step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_daemon import Daemon
from vmforge.client import Client
from vmforge.errors import ImageError
from vmforge.node import pools, snapshots
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[2]
SRC, CLONE, TAKEN, RESTORED, POOL = "ds-src", "ds-clone", "ds-taken", "ds-run", "dsp"
SNAP = "ds-snap"
VMS = (SRC, CLONE, TAKEN, RESTORED)


@pytest.fixture(scope="module")
def daemon(vm_data: DataDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(vm_data, tmp_path_factory.mktemp("daemon-snapshots"))
    d.start()
    try:
        yield d
    finally:
        try:
            _clean_up(d)
        finally:
            d.stop()
            for log in d.logs:
                assert d.token not in log.read_text(errors="replace")


def _clean_up(d: Daemon) -> None:
    """Whatever a failed test left: the pool (its refiller by pid), the VMs, the snapshots;
    through the node's data directory, so that it works whatever the daemon's state."""
    m = VmManager(d.data)
    try:
        pid = pools.refiller_pid(m, POOL)
        if pools.find_pool(m, POOL) is not None:
            with contextlib.suppress(Exception):
                asyncio.run(pools.remove_pool(m, POOL))
        if pid and pid > 0 and _alive(pid) and POOL in _cmdline(pid):
            os.kill(pid, signal.SIGKILL)
        for name in [*VMS, *(r.name for r in pools.members(m, POOL))]:
            with contextlib.suppress(Exception):
                asyncio.run(m.delete(name, force=True, stop_timeout=0))
        for snap in snapshots.all_snapshots(m):
            if snap.meta.get("source_vm") in (SRC, f"{POOL}--template"):
                with contextlib.suppress(Exception):
                    snapshots.remove(m, snap.ref)
    finally:
        m.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def vmforge(d: Daemon, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """The CLI against the daemon's unix socket, as a user runs it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VMFORGE_HOST", "VMFORGE_TOKEN", "VMFORGE_TOKEN_FILE")}
    env.update({"NO_COLOR": "1", "VMFORGE_HOME": "/nonexistent/not-used-remotely"})
    return subprocess.run([sys.executable, "-m", "vmforge", "--host", f"unix://{d.socket}",
                           *args], cwd=ROOT, env=env, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def local(d: Daemon, *args: str) -> Any:
    """The same command on the node's data directory (``--json``)."""
    env = {k: v for k, v in os.environ.items() if k != "VMFORGE_HOST"}
    res = subprocess.run([sys.executable, "-m", "vmforge", "--data-dir", str(d.data.root),
                          *args], cwd=ROOT, env=env, capture_output=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    return json.loads(ok(res))


def ok(res: subprocess.CompletedProcess[bytes], code: int = 0) -> str:
    out = res.stdout.decode(errors="replace")
    err = res.stderr.decode(errors="replace")
    assert res.returncode == code, f"exit {res.returncode}\n{out}\n{err}"
    assert "Traceback" not in err, err
    return out


def sh(c: Client, vm: str, script: str) -> str:
    res = c.exec(vm, ["sh", "-c", script], timeout=60)
    assert res.exit_code == 0, (vm, script, res.stdout, res.stderr)
    return res.stdout.decode()


def test_snapshots_clones_and_pools_through_the_daemon(daemon: Daemon) -> None:
    d = daemon
    with d.unix() as c:
        # -- one VM, booted cold
        c.create({"name": SRC, "spec": {"memory_mib": 256, "kernel": {"image": "minimal"},
                                        "disks": [{"id": "data", "size_gib": 1}]}},
                 wait="ready", timeout=240)
        sh(c, SRC, "echo written-before > /root/before.txt")

        # -- snapshot over REST: the VM runs on
        snap = c.snapshot(SRC, SNAP)
        assert snap["ref"] == f"{SNAP}:1" and snap["source_vm"] == SRC, snap
        assert set(snap["files"]) == {"state", "layer:data"}
        assert snap["users"] == [SRC]  # its disks build on the snapshot's layers now
        assert c.get(SRC)["state"] == "running"
        assert snap == local(d, "snapshot", "inspect", SNAP, "--json")
        assert [s["ref"] for s in c.snapshots() if s["source_vm"] == SRC] == [snap["ref"]]
        assert c.snapshot_info(SNAP) == snap

        # -- clone over REST, as a job
        job = c.clone(SRC, CLONE, wait=False)
        assert job["kind"] == "vm.clone" and job["state"] == "running", job
        done = c.wait_job(job["id"], timeout=300)
        clone = done["result"]
        assert clone["name"] == CLONE and clone["state"] == "running", clone
        assert clone["snapshot"] == f"{SRC}-clone:1"
        phases = {p["phase"] for p in done["progress"]}
        assert {"snapshot", "restore"} <= phases, done["progress"]
        states = [e.get("state") for e in c.events(vm=CLONE, replay=True, follow=False)
                  if e.get("state")]
        assert states[:2] == ["restoring", "ready"], states  # on the event stream too
        assert sh(c, CLONE, "cat /root/before.txt") == "written-before\n"
        assert sh(c, CLONE, "hostname").strip() == CLONE
        assert c.get(SRC)["state"] == "running"

        with pytest.raises(ImageError) as info:  # the daemon's errors as vmforge's own
            c.remove_snapshot("no-such-snapshot")
        assert getattr(info.value, "status", None) == 404
        with pytest.raises(ImageError, match=f"in use by VM.*{CLONE}") as info:
            c.remove_snapshot(clone["snapshot"])
        assert getattr(info.value, "status", None) == 409
        # the clone, and the source, whose disks build on the new snapshot's layers now
        assert c.snapshot_info(clone["snapshot"])["users"] == [CLONE, SRC]

    # -- a warm pool over the remote CLI
    created = json.loads(ok(vmforge(d, "pool", "create", POOL, "--size", "1",
                                    "--from-snapshot", f"{SNAP}:1", "--json")))
    assert created["name"] == POOL and created["snapshot_ref"] == f"{SNAP}:1", created
    assert created["refiller_pid"], created
    refiller = int(created["refiller_pid"])
    with d.tcp() as c:  # on TCP with the token too
        assert c.pool(POOL)["snapshot_ref"] == f"{SNAP}:1"
    deadline = time.monotonic() + 180
    while True:
        rows = json.loads(ok(vmforge(d, "pool", "ls", "--json")))
        row = next(r for r in rows if r["name"] == POOL)
        if row["ready"]:
            break
        assert time.monotonic() < deadline, (rows, _pool_log(d))
        time.sleep(1)
    assert "READY" in ok(vmforge(d, "pool", "ls"))
    t0 = time.monotonic()
    taken = json.loads(ok(vmforge(d, "pool", "take", POOL, "--name", TAKEN, "--json")))
    took = time.monotonic() - t0
    assert taken["name"] == TAKEN and taken["state"] == "running", taken
    print(f"pool take over the remote CLI: {taken['take_seconds'] * 1000:.0f} ms inside, "
          f"{took:.2f}s for the whole process")
    assert ok(vmforge(d, "exec", TAKEN, "--", "hostname")).strip() == TAKEN
    assert ok(vmforge(d, "exec", TAKEN, "--", "cat", "/root/before.txt")) == "written-before\n"

    # -- run --from-snapshot over the remote CLI: the text the local command prints
    out = ok(vmforge(d, "run", "--from-snapshot", SNAP, "--name", RESTORED))
    assert out.startswith(f"{RESTORED} is ready in ") and f"(restored from {SNAP})" in out
    assert ok(vmforge(d, "exec", RESTORED, "--", "hostname")).strip() == RESTORED

    # -- remove everything, through the remote CLI
    out = ok(vmforge(d, "pool", "rm", POOL))
    assert out.startswith(f"removed pool {POOL} ("), out
    deadline = time.monotonic() + 30
    while _alive(refiller) and POOL in _cmdline(refiller):
        assert time.monotonic() < deadline, "the refiller outlived its pool"
        time.sleep(0.2)
    assert json.loads(ok(vmforge(d, "pool", "ls", "--json"))) == []
    res = vmforge(d, "snapshot", "rm", SNAP)  # still used by the VMs made from it
    assert res.returncode == 1 and b"in use by VM(s)" in res.stderr, res.stderr
    for vm in (TAKEN, RESTORED, CLONE, SRC):
        ok(vmforge(d, "rm", "-f", vm))
    out = ok(vmforge(d, "snapshot", "rm", f"{SRC}-clone", SNAP))  # the later one first
    assert out.splitlines() == [f"removed snapshot {SRC}-clone:1", f"removed snapshot {SNAP}:1"]
    assert [s for s in json.loads(ok(vmforge(d, "snapshot", "ls", "--json")))
            if s["source_vm"] == SRC] == []
    names = {v["name"] for v in json.loads(ok(vmforge(d, "ls", "--json")))}
    assert not names & {*VMS} and not [n for n in names if n.startswith(f"{POOL}--")], names
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and
                any(f"/vms/{n}/" in _cmdline(int(p.name)) for n in VMS)]


def _pool_log(d: Daemon) -> str:
    try:
        return (d.data.root / "pools" / f"{POOL}.log").read_text()[-3000:]
    except OSError:
        return ""
