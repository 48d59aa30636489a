"""Memory snapshots, clones and restores of libvirt VMs, through libvirt's own API on the real
libvirtd (started by the ``libvirt_uri`` fixture when none answers) and real TCG guests of the
minimal image.

One source VM is booted for the whole module. A clone must have the file written and the
process started before the snapshot, its own hostname, machine-id, VM generation id and random
stream, and a disk of its own; exec and cp work in it; the snapshot's files are never written
(sha256 before and after). ``--stop`` leaves the source stopped on an overlay over the stored
layer, and a cold start sees the disk as saved. A damaged or truncated state file is a clear
error that leaves nothing behind: no row, no directory, no libvirt domain, no QEMU.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmforge.agent.client import AgentClient
from vmforge.errors import ImageError, VmError
from vmforge.hypervisors.libvirt import snapshot as lvsnap
from vmforge.hypervisors.libvirt.driver import LibvirtDriver
from vmforge.node import restore, snapshots
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir

from .conftest import VmHelper

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

SRC = "lvs-src"
SPEC: dict[str, Any] = {"hypervisor": "libvirt", "disks": [{"id": "data", "size_gib": 1}]}


class Lv(VmHelper):
    def __init__(self, data: DataDir, uri: str) -> None:
        super().__init__(data)
        self.uri = uri
        self.snaps: list[str] = []

    def sh(self, name: str, script: str) -> str:
        res = self.call(name, lambda c: c.exec(["sh", "-c", script], timeout=60))
        assert res.exit_code == 0, (name, script, res.stdout, res.stderr)
        return str(res.stdout.decode())

    def sector(self, name: str, n: int) -> str:
        return self.sh(name, f"dd if=/dev/vda bs=512 skip={n} count=1 2>/dev/null | "
                             "tr -d '\\0'")

    def write_sector(self, name: str, n: int, text: str) -> None:
        self.sh(name, f"printf {text} | dd of=/dev/vda bs=512 seek={n} conv=fsync "
                      "2>/dev/null")

    def restore(self, ref: str, name: str) -> Any:
        self.names.append(name)
        return asyncio.run(restore.restore(self.manager, ref, name, timeout=120))

    def cli(self, *args: str, failpoint: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, VMFORGE_HOME=str(self.manager.data.root), NO_COLOR="1",
                   VMFORGE_LIBVIRT_URI=self.uri)
        env.pop("VMFORGE_FAILPOINT", None)
        if failpoint:
            env["VMFORGE_FAILPOINT"] = failpoint
        return subprocess.run([sys.executable, "-m", "vmforge", *args], env=env, text=True,
                              capture_output=True, timeout=300)

    def ok(self, *args: str) -> str:
        res = self.cli(*args)
        assert res.returncode == 0, (args, res.stderr)
        return res.stdout

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True,
                              text=True, timeout=60)

    def driver(self) -> LibvirtDriver:
        drv = self.manager.driver(self.manager.get(SRC).backend)
        assert isinstance(drv, LibvirtDriver)
        return drv

    def genid(self, name: str) -> str | None:
        rt = self.manager.get(name).runtime
        assert rt is not None
        return self.driver().generation_id(rt)


@pytest.fixture(scope="module")
def lv(vm_data: DataDir, libvirt_uri: str) -> Iterator[Lv]:
    """The source VM: a file in RAM, a process and a disk sector written before any
    snapshot. Everything made here is removed at the end, VMs first."""
    helper = Lv(vm_data, libvirt_uri)
    try:
        helper.run(SRC, **SPEC)
        helper.sh(SRC, "echo written-before > /root/before.txt; "
                       "(setsid sleep 7777 </dev/null >/dev/null 2>&1 &)")
        helper.write_sector(SRC, 8, "SRCDISK")
        yield helper
    finally:
        helper.cleanup()
        m = VmManager(vm_data)
        try:
            for ref in reversed(helper.snaps):
                if snapshots.find(m, ref) is not None:
                    snapshots.remove(m, ref)
        finally:
            m.close()


def digests(snap: snapshots.Snapshot) -> dict[str, str]:
    out = {}
    for role in snap.image.files:
        path = snap.image.path(role)
        assert path is not None
        out[role] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def nothing_left(lv: Lv, name: str) -> None:
    m = lv.manager
    assert m.db.query("SELECT name FROM vms WHERE name=?", (name,)) == []
    assert m.db.query("SELECT vm_name FROM vm_images WHERE vm_name=?", (name,)) == []
    assert not (m.data.vms / name).exists()
    assert not list(m.data.vms.glob(f".{name}.creating-*"))
    assert lv.virsh("dominfo", name).returncode != 0, "libvirt domain left behind"
    assert not Path(f"/run/libvirt/qemu/{name}.pid").exists()
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and
                f"guest={name},".encode() in _cmdline(p)]


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def test_running_snapshot_then_two_clones_with_their_own_identity(lv: Lv) -> None:
    m = lv.manager
    src = m.get(SRC)
    uuid = src.runtime.control if src.runtime else None
    src_gen = lv.genid(SRC)
    assert src_gen  # <genid/>: libvirt made one

    snap = snapshots.create(m, SRC, "lvs-snap")  # the VM runs on
    lv.snaps.append(snap.ref)
    rec = m.get(SRC)
    assert rec.state == "running" and rec.runtime and rec.runtime.control == uuid
    assert snap.meta["backend"] == "libvirt" and snap.meta["machine_type"].startswith("pc-")
    assert snap.meta["paused_seconds"] < 5 and snap.meta["generation_id"] == src_gen
    assert set(snap.image.files) == {"state", "layer:data"}
    assert not (rec.dir / snapshots.JOURNAL).exists() and not list(rec.dir.glob("layer-*"))
    tops = list(rec.dir.glob(".disk-data.top-*.qcow2"))  # the name libvirt runs it by
    assert len(tops) == 1 and os.path.samefile(tops[0], rec.paths.disk("data"))
    assert snapshots.backing_name(rec.paths.disk("data")) == str(snap.layer("data"))
    assert f"<source file='{rec.paths.disk('data')}'" in \
        lv.virsh("dumpxml", "--inactive", SRC).stdout  # the next start's disk: its own path
    info = lvsnap.state_info(snap.state)  # type: ignore[arg-type]
    assert info["domain"] == SRC and info["machine"] == snap.meta["machine_type"]
    lv.write_sector(SRC, 9, "AFTER")  # after the snapshot: the source's own
    assert lv.sector(SRC, 8) == "SRCDISK"
    before = digests(snap)

    listed = {r["ref"]: r for r in json.loads(lv.ok("snapshot", "ls", "--json"))}
    assert listed[snap.ref]["source_vm"] == SRC and listed[snap.ref]["users"] == [SRC]
    inspected = json.loads(lv.ok("snapshot", "inspect", snap.ref, "--json"))
    assert inspected["backend"] == "libvirt" and inspected["files"]["state"]["size"] > 1 << 20

    c1 = lv.restore(snap.ref, "lvs-a")
    res = lv.cli("run", "--from-snapshot", snap.ref, "--name", "lvs-b", "--json")
    lv.names.append("lvs-b")
    assert res.returncode == 0, res.stderr
    c2 = m.get("lvs-b")
    assert c1.state == "running" and c2.state == "running", (c1, c2)
    assert not c1.last_error and not c2.last_error, (c1.last_error, c2.last_error)
    print(f"cold boot {m.get(SRC).boot_seconds:.2f}s, restore {c1.boot_seconds:.2f}s")

    seen: dict[str, dict[str, str]] = {}
    for name in ("lvs-a", "lvs-b"):
        assert lv.sh(name, "cat /root/before.txt").strip() == "written-before"
        assert "sleep 7777" in lv.sh(name, "ps")
        assert lv.sector(name, 8) == "SRCDISK" and lv.sector(name, 9) == ""
        assert lv.virsh("domstate", name).stdout.strip() == "running"
        seen[name] = {
            "hostname": lv.sh(name, "hostname").strip(),
            "machine_id": lv.sh(name, "cat /etc/machine-id").strip(),
            "random": lv.sh(name, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"),
            "vm_id": lv.call(name, lambda c: c.wait_ready(10))["vm_id"],
            "genid": lv.genid(name) or "",
        }
    a, b = seen["lvs-a"], seen["lvs-b"]
    assert (a["hostname"], b["hostname"]) == ("lvs-a", "lvs-b")
    assert (a["vm_id"], b["vm_id"]) == ("lvs-a", "lvs-b")
    for key in ("machine_id", "random", "genid"):
        assert a[key] and b[key] and a[key] != b[key], key
    assert src_gen not in (a["genid"], b["genid"])

    lv.write_sector("lvs-a", 20, "CLONEA")  # disks of their own
    assert lv.sector("lvs-a", 20) == "CLONEA" and lv.sector("lvs-b", 20) == ""
    assert lv.sector(SRC, 20) == ""

    async def roundtrip(c: AgentClient) -> str:
        local = Path(m.data.root) / "lv-cp-in.txt"
        local.write_text("through cp\n")
        await c.put_file(local, "/root/cp.txt")
        back = Path(m.data.root) / "lv-cp-out.txt"
        await c.get_file("/root/cp.txt", back)
        return back.read_text()
    assert lv.call("lvs-b", roundtrip) == "through cp\n"

    for name in ("lvs-a", "lvs-b"):
        asyncio.run(m.delete(name, force=True, stop_timeout=0))
        nothing_left(lv, name)
    assert digests(snap) == before, "a snapshot file was written"
    res = lv.cli("snapshot", "rm", snap.ref)
    assert res.returncode != 0 and "in use by VM" in res.stderr  # the source builds on it


def test_damaged_or_truncated_state_is_a_clear_error_and_leaves_nothing(lv: Lv) -> None:
    m = lv.manager
    snap = snapshots.create(m, SRC, "lvs-bad")
    lv.snaps.append(snap.ref)
    state = snap.state
    assert state is not None
    st = state.stat()
    # Damaged in place, size and mtime kept (the library's cheap check passes): libvirt's and
    # QEMU's own reason, and the half-made clone is removed.
    os.chmod(state, 0o600)
    with open(state, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\xff" * (1 << 18))
    os.utime(state, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(VmError, match="libvirt could not load the saved state") as info:
        lv.restore(snap.ref, "lvs-bad-clone")
    assert "removed again" in str(info.value)
    nothing_left(lv, "lvs-bad-clone")
    # Truncated: refused before anything is made.
    os.truncate(state, st.st_size // 3)
    with pytest.raises(ImageError, match="cannot be restored: .*state file .* changed"):
        lv.restore(snap.ref, "lvs-bad-clone")
    nothing_left(lv, "lvs-bad-clone")
    # The driver's own reading of a file cut inside libvirt's header or QEMU's stream.
    cut = m.data.root / "lv-cut.state"
    for size in (50, 200, lvsnap.read_save_image(state).stream_offset + 2):
        with open(state, "rb") as f:
            cut.write_bytes(f.read(size))
        with pytest.raises(VmError, match="not a libvirt saved state|truncated"):
            lvsnap.state_info(cut)
    cut.write_bytes(b"LibvirtQemudPart" + bytes(200))
    with pytest.raises(VmError, match="incomplete libvirt saved state"):
        lvsnap.state_info(cut)
    cut.unlink()
    assert m.get(SRC).state == "running"
    assert lv.sh(SRC, "echo alive").strip() == "alive"


def test_killed_snapshot_leaves_a_consistent_vm(lv: Lv) -> None:
    """vmforge killed before libvirt switched the disks: undone. After: finished (stored,
    the VM's disk named by its own path, on an overlay over the stored layer)."""
    m = lv.manager
    for point, finished in (("snapshot.overlays", False), ("snapshot.switched", True),
                            ("snapshot.resumed", True)):
        chain = snapshots.backing_name(m.get(SRC).paths.disk("data"))
        res = lv.cli("snapshot", "create", SRC, "--name", "lvs-kill", failpoint=f"{point}:kill")
        assert res.returncode == -9, (point, res.stderr)
        rec = m.get(SRC)  # the next command recovers it
        assert rec.state == "running" and not (rec.dir / snapshots.JOURNAL).exists(), rec
        assert lv.virsh("domstate", SRC).stdout.strip() == "running", point
        assert not list(m.library.tmp.glob("in-*")) and not list(rec.dir.glob("layer-*"))
        tops = list(rec.dir.glob(".disk-data.top-*.qcow2"))
        assert len(tops) == 1 and os.path.samefile(tops[0], rec.paths.disk("data")), point
        snap = snapshots.find(m, "lvs-kill")
        assert (snap is not None) == finished, point
        backing = snapshots.backing_name(rec.paths.disk("data"))
        if snap is not None:
            lv.snaps.append(snap.ref)
            assert backing == str(snap.layer("data")) and Path(backing).exists(), point
            snapshots.get(m, snap.ref)
            m.library.check_intact(snap.image)
        else:
            assert backing == chain, point
        mark = f"KILL{point[9:13].upper()}"  # one length: a sector write overwrites the last
        lv.write_sector(SRC, 10, mark)
        assert lv.sector(SRC, 10) == mark
        assert lv.sector(SRC, 8) == "SRCDISK"


def test_warm_pool_member_taken_then_cold_started(lv: Lv) -> None:
    """A pool member is a libvirt restore; taken, it is renamed in vmforge while its running
    domain keeps the member's name; stopped and started, its domain follows the name."""
    m = lv.manager
    lv.ok("pool", "create", "lvw", "--from-snapshot", "lvs-snap:1", "--size", "1")
    try:
        deadline = time.monotonic() + 120
        while not json.loads(lv.ok("pool", "ls", "--json"))[0]["ready"]:
            assert time.monotonic() < deadline, (m.data.root / "pools/lvw.log").read_text()
            time.sleep(0.5)
        took = json.loads(lv.ok("pool", "take", "lvw", "--name", "lvs-taken", "--json"))
        lv.names.append("lvs-taken")
        assert took["take_seconds"] < 1.0
        assert lv.sh("lvs-taken", "hostname").strip() == "lvs-taken"
        assert lv.sh("lvs-taken", "cat /root/before.txt").strip() == "written-before"
        asyncio.run(m.stop("lvs-taken", timeout=0))
        m.start("lvs-taken")  # a cold boot: the domain is renamed to the VM's name
        asyncio.run(m.wait_ready("lvs-taken", 120))
        assert lv.virsh("domstate", "lvs-taken").stdout.strip() == "running"
        assert lv.sector("lvs-taken", 8) == "SRCDISK"
        asyncio.run(m.delete("lvs-taken", force=True, stop_timeout=0))
        nothing_left(lv, "lvs-taken")
    finally:
        lv.ok("pool", "rm", "lvw")
    assert not [r for r in m.vms() if r.name.startswith("lvw--p")]
    assert not [n for n in lv.virsh("list", "--all", "--name").stdout.split()
                if n.startswith("lvw--p")]


def test_stop_then_cold_start_then_clone_command(lv: Lv) -> None:
    m = lv.manager
    first = snapshots.get(m, "lvs-snap:1")
    out = json.loads(lv.ok("snapshot", "create", SRC, "--name", "lvs-snap", "--stop",
                           "--json"))
    lv.snaps.append(out["ref"])
    snap = snapshots.get(m, out["ref"])
    assert snap.image.version == 2
    rec = m.get(SRC)
    assert rec.state == "stopped" and not rec.last_error, rec
    assert lv.virsh("domstate", SRC).stdout.strip() == "shut off"
    assert not list(rec.dir.glob(".disk-*")) and not list(rec.dir.glob("layer-*"))
    # The chain on disk: the VM's overlay -> this snapshot's layer -> ... (lineage)
    layer = snap.layer("data")
    assert snapshots.backing_name(rec.paths.disk("data")) == str(layer)
    assert layer is not None
    layers = digests(snap)

    m.start(SRC)  # a cold boot on the disk as saved
    asyncio.run(m.wait_ready(SRC, 120))
    assert lv.sector(SRC, 8) == "SRCDISK" and lv.sector(SRC, 9) == "AFTER"
    assert "sleep 7777" not in lv.sh(SRC, "ps")

    res = lv.cli("clone", SRC, "--name", "lvs-c", "--json")
    lv.names.append("lvs-c")
    assert res.returncode == 0, res.stderr
    lv.snaps.append(snapshots.get(m, f"{SRC}-clone").ref)
    assert lv.sh("lvs-c", "hostname").strip() == "lvs-c"
    assert lv.sector("lvs-c", 9) == "AFTER"
    assert m.get(SRC).state == "running" and lv.sh(SRC, "echo ok").strip() == "ok"
    asyncio.run(m.delete("lvs-c", force=True, stop_timeout=0))
    nothing_left(lv, "lvs-c")
    assert digests(snap) == layers
    assert first.image.id != snap.image.id
