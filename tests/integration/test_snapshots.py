"""Memory snapshots, clones and warm pools on real TCG guests of the minimal image.

What a clone must have: the file written and the process started before the snapshot; its own
hostname, machine-id, VM generation id and random stream; a disk of its own (a write in one
clone is seen neither in the other nor in the source); the snapshot's files are never written
(sha256 before and after). A damaged state file is a clear error that leaves nothing behind; a
vmforge killed half-way through a snapshot or a restore leaves a consistent VM. A pool of 2
hands out a VM at once and refills.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmforge.agent.client import AgentClient
from vmforge.errors import ImageError, VmError
from vmforge.hypervisors.qemu.driver import pid_alive
from vmforge.hypervisors.qemu.snapshot import generation_id
from vmforge.node import pools, restore, snapshots
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir

from .conftest import VmHelper

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

DISK = [{"id": "data", "size_gib": 1}]


def sh(vms: VmHelper, name: str, script: str) -> str:
    res = vms.call(name, lambda c: c.exec(["sh", "-c", script], timeout=60))
    assert res.exit_code == 0, (name, script, res.stdout, res.stderr)
    return str(res.stdout.decode())


def sector(vms: VmHelper, name: str, n: int) -> str:
    return sh(vms, name, f"dd if=/dev/vda bs=512 skip={n} count=1 2>/dev/null | tr -d '\\0'")


def write_sector(vms: VmHelper, name: str, n: int, text: str) -> None:
    sh(vms, name, f"printf {text} | dd of=/dev/vda bs=512 seek={n} conv=fsync 2>/dev/null")


def digests(snap: snapshots.Snapshot) -> dict[str, str]:
    out = {}
    for role in snap.image.files:
        path = snap.image.path(role)
        assert path is not None
        out[role] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def restore_vm(vms: VmHelper, ref: str, name: str) -> Any:
    vms.names.append(name)
    return asyncio.run(restore.restore(vms.manager, ref, name, timeout=120))


def nothing_left(m: VmManager, name: str) -> None:
    assert m.db.query("SELECT name FROM vms WHERE name=?", (name,)) == []
    assert m.db.query("SELECT vm_name FROM vm_images WHERE vm_name=?", (name,)) == []
    assert not (m.data.vms / name).exists()
    assert not list(m.data.vms.glob(f".{name}.creating-*"))
    assert not (m.data.locks / f"{name}.lock").exists()
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and
                f"/vms/{name}/".encode() in _cmdline(p)]


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def test_two_clones_have_the_past_and_their_own_identity_and_disks(vms: VmHelper) -> None:
    m = vms.manager
    src = vms.run("snap-src", disks=DISK)
    cold = src.boot_seconds
    sh(vms, "snap-src", "echo written-before > /root/before.txt; "
                        "(setsid sleep 7777 </dev/null >/dev/null 2>&1 &)")
    write_sector(vms, "snap-src", 8, "SRCDISK")
    src_gen = generation_id(m.get("snap-src").runtime)  # type: ignore[arg-type]

    snap = snapshots.create(m, "snap-src", "snap-two", stop=True)
    assert m.get("snap-src").state == "stopped"
    assert snap.meta["generation_id"] == src_gen and src_gen
    before = digests(snap)
    assert set(before) == {"state", "layer:data"}

    c1 = restore_vm(vms, snap.ref, "clone-a")
    c2 = restore_vm(vms, snap.ref, "clone-b")  # both run at the same time
    assert c1.state == "running" and c2.state == "running" and not c1.last_error
    restored = max(c1.boot_seconds, c2.boot_seconds)
    print(f"cold boot to agent-ready {cold:.2f}s, restore to agent-ready {restored:.2f}s")
    assert restored < cold, (restored, cold)

    seen: dict[str, dict[str, str]] = {}
    for name in ("clone-a", "clone-b"):
        assert sh(vms, name, "cat /root/before.txt").strip() == "written-before"
        assert "sleep 7777" in sh(vms, name, "ps")
        assert sector(vms, name, 8) == "SRCDISK"
        seen[name] = {
            "hostname": sh(vms, name, "hostname").strip(),
            "machine_id": sh(vms, name, "cat /etc/machine-id").strip(),
            "random": sh(vms, name, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"),
            "vm_id": vms.call(name, lambda c: c.wait_ready(10))["vm_id"],
            "genid": generation_id(m.get(name).runtime) or "",  # type: ignore[arg-type]
            "dmesg": sh(vms, name, "dmesg | grep -c \"virtual machine fork\" || true"),
        }
    a, b = seen["clone-a"], seen["clone-b"]
    assert (a["hostname"], b["hostname"]) == ("clone-a", "clone-b")
    assert (a["vm_id"], b["vm_id"]) == ("clone-a", "clone-b")
    for key in ("machine_id", "random", "genid"):
        assert a[key] and b[key] and a[key] != b[key], key
    assert src_gen not in (a["genid"], b["genid"])
    assert int(a["dmesg"]) >= 1  # the kernel reseeded its CRNG on the new vmgenid

    # Separate disks: a write in one clone is seen neither in the other nor in the source.
    write_sector(vms, "clone-a", 20, "CLONEA")
    assert sector(vms, "clone-a", 20) == "CLONEA"
    assert sector(vms, "clone-b", 20) == ""
    # exec and cp work in clones
    async def roundtrip(c: AgentClient) -> str:
        local = Path(m.data.root) / "cp-in.txt"
        local.write_text("through cp\n")
        await c.put_file(local, "/root/cp.txt")
        back = Path(m.data.root) / "cp-out.txt"
        await c.get_file("/root/cp.txt", back)
        return back.read_text()
    assert vms.call("clone-b", roundtrip) == "through cp\n"

    for name in ("clone-a", "clone-b"):
        asyncio.run(m.delete(name, force=True, stop_timeout=0))
    m.start("snap-src")
    asyncio.run(m.wait_ready("snap-src", 120))
    assert sector(vms, "snap-src", 8) == "SRCDISK"
    assert sector(vms, "snap-src", 20) == ""
    assert "sleep 7777" not in sh(vms, "snap-src", "ps")  # a cold boot, not the saved memory
    assert digests(snap) == before, "a snapshot file was written"
    with pytest.raises(ImageError, match="in use by VM"):
        snapshots.remove(m, snap.ref)  # the source's disk builds on its layer


def test_snapshot_of_a_running_vm_keeps_it_running(vms: VmHelper) -> None:
    m = vms.manager
    vms.run("live-src", disks=DISK)
    write_sector(vms, "live-src", 8, "ONE")
    pid = m.get("live-src").pid
    snap = snapshots.create(m, "live-src", "live-snap")
    rec = m.get("live-src")
    assert rec.state == "running" and rec.pid == pid  # the same QEMU, paused briefly
    assert snap.meta["paused_seconds"] < 5
    assert not (rec.dir / snapshots.JOURNAL).exists()
    assert not list(rec.dir.glob("layer-*")) and not list(rec.dir.glob(".disk-*"))
    write_sector(vms, "live-src", 9, "TWO")  # after the snapshot: the source's own
    assert sector(vms, "live-src", 8) == "ONE"
    layers = digests(snap)

    # A second snapshot builds on the first one's layer (lineage).
    snap2 = snapshots.create(m, "live-src", "live-snap")
    assert snap2.image.parent_id == snap.image.id
    assert snap2.image.version == 2
    c = restore_vm(vms, snap.ref, "live-clone")
    assert sector(vms, "live-clone", 8) == "ONE" and sector(vms, "live-clone", 9) == ""
    asyncio.run(m.delete("live-clone", force=True, stop_timeout=0))
    assert c.name == "live-clone"
    assert digests(snap) == layers
    asyncio.run(m.delete("live-src", force=True, stop_timeout=0))
    snapshots.remove(m, snap2.ref)
    snapshots.remove(m, snap.ref)
    assert snapshots.find(m, "live-snap") is None


def test_damaged_state_file_is_a_clear_error_and_leaves_nothing(vms: VmHelper) -> None:
    m = vms.manager
    vms.run("bad-src")
    snap = snapshots.create(m, "bad-src", "bad-snap", stop=True)
    state = snap.state
    assert state is not None
    size = state.stat().st_size
    # Damaged in place, size and mtime kept (the cheap check passes): QEMU's own reason.
    st = state.stat()
    os.chmod(state, 0o600)
    with open(state, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * (1 << 18))
    os.utime(state, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(VmError, match="could not load the saved state") as info:
        restore_vm(vms, snap.ref, "bad-clone")
    assert "removed again" in str(info.value)
    nothing_left(m, "bad-clone")
    # Truncated: refused before anything is made.
    os.truncate(state, size // 3)
    with pytest.raises(ImageError, match="cannot be restored: .*state file .* changed"):
        restore_vm(vms, snap.ref, "bad-clone")
    nothing_left(m, "bad-clone")
    assert [r.name for r in m.vms()] == ["bad-src"]


def _cli(data: DataDir, *args: str, failpoint: str | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMFORGE_HOME=str(data.root), NO_COLOR="1")
    env.pop("VMFORGE_FAILPOINT", None)
    if failpoint:
        env["VMFORGE_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "vmforge", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("point", ["snapshot.saved", "snapshot.renamed", "snapshot.switched",
                                   "snapshot.resumed", "snapshot.stored"])
def test_killed_snapshot_leaves_a_consistent_vm(vms: VmHelper, point: str) -> None:
    """Killed before QEMU switched the disks: undone. After: finished (stored, and the
    VM's overlays point at the stored layers)."""
    m = vms.manager
    data = m.data
    vms.run("kill-src", disks=DISK)
    write_sector(vms, "kill-src", 8, "KEEP")
    res = _cli(data, "snapshot", "create", "kill-src", "--name", "kill-snap",
               failpoint=f"{point}:kill")
    assert res.returncode == -signal.SIGKILL, res.stderr
    rec = m.get("kill-src")  # the next command recovers it
    assert rec.state == "running" and pid_alive(rec.pid), rec
    assert not (rec.dir / snapshots.JOURNAL).exists()
    assert not list(m.library.tmp.glob("in-*"))
    assert not list(rec.dir.glob("layer-*")) and not list(rec.dir.glob(".disk-*"))
    finished = point in ("snapshot.switched", "snapshot.resumed", "snapshot.stored")
    snap = snapshots.find(m, "kill-snap")
    assert (snap is not None) == finished, snap
    backing = snapshots.backing_name(rec.paths.disk("data"))
    if snap is not None:
        assert backing == str(snap.layer("data"))
    else:
        assert backing is None  # the blank disk's own overlay again
    assert sh(vms, "kill-src", "echo alive").strip() == "alive"  # resumed
    write_sector(vms, "kill-src", 9, "AFTER")
    assert sector(vms, "kill-src", 8) == "KEEP"
    # The disk chain on disk is whole: a cold boot sees both writes.
    asyncio.run(m.stop("kill-src", timeout=30))
    m.start("kill-src")
    asyncio.run(m.wait_ready("kill-src", 120))
    assert (sector(vms, "kill-src", 8), sector(vms, "kill-src", 9)) == ("KEEP", "AFTER")
    if snap is not None:  # a valid snapshot
        c = restore_vm(vms, snap.ref, "kill-clone")
        assert sector(vms, c.name, 8) == "KEEP" and sector(vms, c.name, 9) == ""
        assert "sleep" not in sh(vms, c.name, "hostname") and c.state == "running"
        asyncio.run(m.delete(c.name, force=True, stop_timeout=0))
    asyncio.run(m.delete("kill-src", force=True, stop_timeout=0))
    if snap is not None:
        snapshots.remove(m, snap.ref)


def test_killed_snapshot_with_stop_is_finished(vms: VmHelper) -> None:
    """--stop, killed after QEMU quit: the saved state is complete, so the snapshot is
    stored and the VM is stopped on an overlay over it."""
    m = vms.manager
    vms.run("ks-src", disks=DISK)
    write_sector(vms, "ks-src", 8, "KEPT")
    res = _cli(m.data, "snapshot", "create", "ks-src", "--stop", "--name", "ks-snap",
               failpoint="snapshot.resumed:kill")
    assert res.returncode == -signal.SIGKILL, res.stderr
    rec = m.get("ks-src")
    assert rec.state == "stopped" and not rec.last_error, rec
    snap = snapshots.get(m, "ks-snap")
    assert snapshots.backing_name(rec.paths.disk("data")) == str(snap.layer("data"))
    c = restore_vm(vms, snap.ref, "ks-clone")
    assert sector(vms, c.name, 8) == "KEPT"
    asyncio.run(m.delete(c.name, force=True, stop_timeout=0))
    asyncio.run(m.delete("ks-src", force=True, stop_timeout=0))
    snapshots.remove(m, snap.ref)


def test_killed_restore_leaves_nothing(vms: VmHelper) -> None:
    m = vms.manager
    vms.run("kr-src")
    snapshots.create(m, "kr-src", "kr-snap", stop=True)
    for point in ("restore.created", "restore.launched", "restore.resumed"):
        res = _cli(m.data, "run", "--from-snapshot", "kr-snap", "--name", "kr-clone",
                   failpoint=f"{point}:kill")
        assert res.returncode == -signal.SIGKILL, res.stderr
        assert "kr-clone" not in [r.name for r in m.vms()]  # recovered: removed
        nothing_left(m, "kr-clone")


def test_pool_take_is_fast_and_the_pool_refills(vms: VmHelper) -> None:
    m = vms.manager
    data = m.data
    vms.run("pool-src")
    sh(vms, "pool-src", "echo from-the-template > /root/t.txt")
    snapshots.create(m, "pool-src", "pool-snap", stop=True)

    def ready() -> list[str]:
        res = _cli(data, "pool", "ls", "--json")
        assert res.returncode == 0, res.stderr
        rows = {r["name"]: r for r in json.loads(res.stdout)}
        return list(rows["warm"]["ready"])

    def wait_ready(n: int, timeout: float = 120) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(got := ready()) < n:
            assert time.monotonic() < deadline, (got, (data.root / "pools/warm.log")
                                                 .read_text())
            time.sleep(0.5)
        return got

    res = _cli(data, "pool", "create", "warm", "--from-snapshot", "pool-snap", "--size", "2")
    assert res.returncode == 0, res.stderr
    refiller = None
    try:
        members = wait_ready(2)
        refiller = pools.refiller_pid(m, "warm")
        assert refiller and pid_alive(refiller)
        t0 = time.monotonic()
        res = _cli(data, "pool", "take", "warm", "--name", "taken", "--json")
        cli_take = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        vms.names.append("taken")
        took = json.loads(res.stdout)
        print(f"pool take: {took['take_seconds'] * 1000:.0f} ms in the library, "
              f"{cli_take * 1000:.0f} ms as a command")
        assert took["take_seconds"] < 1.0
        assert took["dir"].rsplit("/", 1)[1] in members  # a member, renamed
        assert sh(vms, "taken", "hostname").strip() == "taken"
        assert sh(vms, "taken", "cat /root/t.txt").strip() == "from-the-template"
        asyncio.run(m.delete("taken", force=True, stop_timeout=0))
        again = wait_ready(2)  # refilled
        assert len(set(again) - set(members)) == 1
        # The daemon hands them out too.
        from fastapi.testclient import TestClient

        from vmforge.api import create_app
        vms.names.append("via-api")
        with TestClient(create_app(m, None, supervise=False)) as client:
            r = client.post("/v1/pools/warm/take", json={"name": "via-api"})
            assert r.status_code == 200, r.text
            assert r.json()["name"] == "via-api" and r.json()["take_seconds"] < 1.0
        assert sh(vms, "via-api", "hostname").strip() == "via-api"
        asyncio.run(m.delete("via-api", force=True, stop_timeout=0))
    finally:
        res = _cli(data, "pool", "rm", "warm")
        assert res.returncode == 0, res.stderr
    if refiller:
        deadline = time.monotonic() + 10
        while pid_alive(refiller) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(refiller), "the refiller outlived pool rm"
    assert not [r for r in m.vms() if r.name.startswith("warm--p")]
    asyncio.run(m.delete("pool-src", force=True, stop_timeout=0))
    snapshots.remove(m, "pool-snap")
