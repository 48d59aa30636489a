"""Cloud Hypervisor and Firecracker memory snapshots end to end through the manager, against the
stand-in VMMs (tests/fakevmm.py: they serve each VMM's API, validated against its own document,
and bridge the hybrid vsock to a real guest agent; nothing boots). Neither binary nor KVM works
here: the stand-ins are the contract, and the manager is told KVM works (monkeypatched, in this
process only), since it refuses KVM-only backends otherwise.

One flow per VMM: run a VM (a disk from a library image, a seed, the agent), ``snapshot
create`` (the VM runs on, on a new overlay over the stored layer), a clone by restore (its own
disks, seed, vsock socket and identity), exec in the clone over hybrid vsock, then ``rm`` of
both and of the snapshot: nothing is left (no process, no directory, no socket).
"""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from vmforge.hypervisors import get_driver
from vmforge.hypervisors._apisnap import (
    MANIFEST,
    open_disks,
    pack_state,
    read_manifest,
    set_backing_name,
    unpack_state,
)
from vmforge.hypervisors.base import Accel, SavesState
from vmforge.hypervisors.cloud_hypervisor import render as ch
from vmforge.hypervisors.host import KvmVerdict
from vmforge.hypervisors.qemu.driver import pid_alive
from vmforge.images import qcow2
from vmforge.node import restore, snapshots
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir
from vmforge.spec import parse_request

from ..fakes import fake_host
from ..fakevmm import read_journal, write_shim
from ..oracle import Oracle

MIB = 1 << 20
BACKENDS = ("cloud-hypervisor", "firecracker")


def manager(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch,
            options: dict[str, Any] | None = None) -> tuple[VmManager, Path]:
    journal = tmp_path / "journal.jsonl"
    shim = write_shim(tmp_path / "bin", backend, journal=journal, options=options)
    monkeypatch.setenv("PATH", f"{shim.parent}:{os.environ.get('PATH', '')}")
    # KVM does not work on this machine and the manager refuses KVM-only backends without
    # it; the stand-ins need no KVM. Only this process's manager is told otherwise.
    monkeypatch.setattr(VmManager, "accel_for", lambda self, req, host=None:
                        (Accel.KVM, "test: stand-in VMM, KVM assumed"))
    m = VmManager(DataDir(tmp_path / "data"),
                  host=fake_host(kvm=KvmVerdict(True, "test: assumed")))
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF stand-in kernel")
    m.library.add("minimal", {"kernel": k, "vmlinux": k, "initrd": k}, kind="kernel",
                  cmdline="console=ttyS0", recipe={"agent": True})
    data = tmp_path / "data.raw"
    with open(data, "wb") as f:
        f.truncate(8 * MIB)
        f.write(b"the data disk's first bytes")
    m.library.add("datadisk", {"disk": data}, kind="disk", format="raw")
    return m, journal


def spec(backend: str) -> dict[str, Any]:
    return {"hypervisor": backend, "machine": "microvm" if backend == "firecracker" else "q35",
            "memory_mib": 256, "kernel": {"image": "minimal"}, "nics": [],
            "disks": [{"id": "data", "image": "datadisk"}],
            "cloud_init": {"user_data": "#cloud-config\n"}}


def calls(journal: Path, since: int = 0) -> list[str]:
    return [f"{e['method']} {e['path']}" for e in read_journal(journal)[since:]
            if e["method"] != "GET"]


@pytest.mark.subprocess
@pytest.mark.parametrize("backend", BACKENDS)
def test_snapshot_clone_exec_rm_through_the_manager(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    m, journal = manager(tmp_path, backend, monkeypatch)
    drv = get_driver(backend)
    assert drv.capabilities().snapshots and isinstance(drv, SavesState)
    pids: list[int] = []
    try:
        src = asyncio.run(m.run(parse_request({"name": "src", "spec": spec(backend)}),
                                timeout=30))
        assert src.runtime is not None and src.pid
        pids.append(src.pid)
        before = open_disks(src.pid, src.dir)
        assert set(before) == {"data"}
        n = len(read_journal(journal))

        snap = snapshots.create(m, "src", "src-snap")

        after = m.get("src")
        assert after.state.value == "running" and after.pid == src.pid  # the same VMM
        moved = open_disks(src.pid, src.dir)
        assert moved["data"] != before["data"]  # it writes the new overlay now
        disk = src.paths.disk("data")
        layer = snap.layer("data")
        assert layer is not None and snap.state is not None
        if backend == "cloud-hypervisor":
            assert calls(journal, n) == ["PUT /api/v1/vm.pause", "PUT /api/v1/vm.snapshot",
                                         "PUT /api/v1/vm.delete", "PUT /api/v1/vm.restore",
                                         "PUT /api/v1/vm.resume"]
            # the new overlay names the stored layer, which names the image
            assert snapshots.backing_name(disk) == str(layer)
            assert qcow2.probe_format(layer)[0] == "qcow2"
        else:
            # pointed at the raw copy beside the disk, then at the disk once it is renamed
            assert calls(journal, n) == ["PATCH /vm", "PUT /snapshot/create",
                                         "PATCH /drives/data", "PATCH /drives/data",
                                         "PATCH /vm"]
            patches = [e["body"]["path_on_host"] for e in read_journal(journal)[n:]
                       if e["method"] == "PATCH" and e["path"] == "/drives/data"]
            # named relative to the VM directory, where Firecracker runs
            assert patches == [f".{disk.name}.next", disk.name]
            # Firecracker reads raw only: its disk is a raw copy of the stored layer
            assert qcow2.probe_format(disk)[0] == "raw" == qcow2.probe_format(layer)[0]
            assert disk.read_bytes() == layer.read_bytes()
            assert read_manifest(snap.state)["drives"] == {
                "data": disk.name, "cidata": src.paths.seed.name}
        assert read_manifest(snap.state)["backend"] == backend
        assert not (src.dir / "vmm-snapshot").exists()  # tidied once the VM ran again
        assert snap.as_dict()["backend"] == backend

        n = len(read_journal(journal))
        clone = asyncio.run(restore.restore(m, snap.ref, "clone1", timeout=30))
        assert clone.state.value == "running" and clone.pid and clone.pid != src.pid
        pids.append(clone.pid)
        assert clone.last_error is None, clone.last_error
        # its own files: its disk over the layer, its seed, its vsock socket
        assert set(open_disks(clone.pid, clone.dir)) == {"data"}
        assert clone.runtime is not None and clone.runtime.agent is not None
        assert str(clone.paths.sockets) in str(clone.runtime.agent.path)
        restored = [e for e in read_journal(journal)[n:] if e["method"] != "GET"]
        oracle = Oracle(backend)
        for e in restored:  # every body valid in the VMM's own document, strict
            oracle.check(e["method"], e["path"], e["body"])
        if backend == "cloud-hypervisor":
            assert [f"{e['method']} {e['path']}" for e in restored] == [
                "PUT /api/v1/vm.restore", "PUT /api/v1/vm.resume"]
            assert snapshots.backing_name(clone.paths.disk("data")) == str(layer)
        else:
            load = restored[1]["body"]
            assert [f"{e['method']} {e['path']}" for e in restored] == [
                "PUT /logger", "PUT /snapshot/load", "PATCH /drives/data",
                "PATCH /drives/cidata", "PATCH /vm"]
            assert load["resume_vm"] is False
            assert load["vsock_override"]["uds_path"] == clone.runtime.agent.path
            assert restored[2]["body"]["path_on_host"] == clone.paths.disk("data").name
            assert restored[3]["body"]["path_on_host"] == clone.paths.seed.name
            assert qcow2.probe_format(clone.paths.disk("data"))[0] == "raw"
        asked = json.loads((clone.paths.sockets / "stand-in-identity.json").read_text())
        assert asked["name"] == asked["hostname"] == "clone1"  # its identity is its own

        async def exec_in(name: str) -> tuple[int, bytes]:
            async with m.agent(name) as c:
                res = await c.exec(["echo", f"in {name} over hybrid vsock"], timeout=10)
                return res.exit_code, res.stdout
        assert asyncio.run(exec_in("clone1")) == (0, b"in clone1 over hybrid vsock\n")
        assert asyncio.run(exec_in("src")) == (0, b"in src over hybrid vsock\n")

        with pytest.raises(Exception, match="in use by VM"):
            snapshots.remove(m, snap.ref)
        asyncio.run(m.delete("clone1", force=True))
        asyncio.run(m.delete("src", force=True))
        snapshots.remove(m, snap.ref)
        assert m.vms() == []
        assert [p for p in m.data.vms.iterdir()] == []
        assert not any(pid_alive(p) for p in pids)
        assert snapshots.all_snapshots(m) == []
    finally:
        for rec in m.vms():
            asyncio.run(m.delete(rec.name, force=True, stop_timeout=0))
        m.close()


@pytest.mark.subprocess
def test_a_firecracker_clone_outlives_the_vm_it_came_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Firecracker reopens the saved drives at the load itself, before they can be pointed
    elsewhere. They are named relative to the VM directory and Firecracker runs there, so a
    clone's load opens the clone's own files: it restores after its source VM is gone."""
    m, journal = manager(tmp_path, "firecracker", monkeypatch)
    try:
        asyncio.run(m.run(parse_request({"name": "src", "spec": spec("firecracker")}),
                          timeout=30))
        snap = snapshots.create(m, "src", "s", stop=True)
        assert m.get("src").state.value == "stopped"
        asyncio.run(m.delete("src", force=True))
        assert not (m.data.vms / "src").exists()
        n = len(read_journal(journal))
        clone = asyncio.run(restore.restore(m, snap.ref, "c1", timeout=30))
        assert clone.state.value == "running"
        load = [e for e in read_journal(journal)[n:] if e["path"] == "/snapshot/load"]
        assert load and load[0]["status"] < 300

        async def exec_in_clone() -> Any:
            async with m.agent("c1") as c:
                return await c.exec(["echo", "clone"])
        assert asyncio.run(exec_in_clone()).stdout == b"clone\n"
        asyncio.run(m.delete("c1", force=True))
        snapshots.remove(m, snap.ref)
        assert m.vms() == [] and not (m.data.vms / "c1").exists()
    finally:
        for rec in m.vms():
            asyncio.run(m.delete(rec.name, force=True, stop_timeout=0))
        m.close()


@pytest.mark.subprocess
def test_a_stopped_snapshot_then_a_cold_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``snapshot create --stop`` leaves a thin qcow2 overlay over the stored raw layer;
    Firecracker's next start makes it a raw copy again before Firecracker opens it."""
    m, _journal = manager(tmp_path, "firecracker", monkeypatch)
    try:
        rec = asyncio.run(m.run(parse_request({"name": "src", "spec": spec("firecracker")}),
                                timeout=30))
        snapshots.create(m, "src", "s", stop=True)
        disk = rec.paths.disk("data")
        assert qcow2.probe_format(disk)[0] == "qcow2"
        m.start("src")
        assert qcow2.probe_format(disk)[0] == "raw"
        assert disk.read_bytes().startswith(b"the data disk's first bytes")
        asyncio.run(m.delete("src", force=True))
    finally:
        for r in m.vms():
            asyncio.run(m.delete(r.name, force=True, stop_timeout=0))
        m.close()


@pytest.mark.subprocess
def test_a_cloud_hypervisor_switch_that_fails_keeps_the_snapshot_and_stops_the_vm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM was deleted inside its VMM and could not be restored on the new overlay: the
    snapshot is finished (its state was saved), the VM is recorded stopped on the new overlay
    over the stored layer, and it boots again cold."""
    m, journal = manager(tmp_path, "cloud-hypervisor", monkeypatch,
                         {"refuse": ["PUT /api/v1/vm.restore"]})
    try:
        rec = asyncio.run(m.run(parse_request({"name": "src",
                                               "spec": spec("cloud-hypervisor")}), timeout=30))
        assert rec.pid
        with pytest.raises(Exception, match=r"refused PUT /api/v1/vm.restore \(disk switch\)"):
            snapshots.create(m, "src", "s")
        after = m.get("src")
        assert after.state.value == "stopped" and not pid_alive(rec.pid)
        (snap,) = snapshots.all_snapshots(m)
        assert snapshots.backing_name(rec.paths.disk("data")) == str(snap.layer("data"))
        assert sorted(p.name for p in rec.dir.iterdir() if "layer-" in p.name) == []
        assert not (rec.dir / "snapshot.json").exists()
        m.start("src")
        assert m.get("src").state.value == "running"
        asyncio.run(m.delete("src", force=True))
        snapshots.remove(m, snap.ref)
    finally:
        for r in m.vms():
            asyncio.run(m.delete(r.name, force=True, stop_timeout=0))
        m.close()


@pytest.mark.subprocess
def test_a_firecracker_switch_that_fails_is_undone_and_the_vm_runs_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Firecracker refused to reopen the drive: the VM still writes its old file, which is the
    disk again; the VM runs on, nothing of the snapshot is left."""
    m, journal = manager(tmp_path, "firecracker", monkeypatch,
                         {"refuse": ["PATCH /drives/data"]})
    try:
        rec = asyncio.run(m.run(parse_request({"name": "src", "spec": spec("firecracker")}),
                                timeout=30))
        assert rec.pid
        before = open_disks(rec.pid, rec.dir)
        disk = rec.paths.disk("data")
        inode = disk.stat().st_ino
        with pytest.raises(Exception, match=r"refused PATCH /drives/data \(disk switch\)"):
            snapshots.create(m, "src", "s")
        after = m.get("src")
        assert after.state.value == "running" and after.pid == rec.pid
        assert open_disks(rec.pid, rec.dir) == before and disk.stat().st_ino == inode
        assert after.runtime is not None
        assert m.driver("firecracker").status(after.runtime).value == "running"  # resumed
        assert snapshots.all_snapshots(m) == []
        assert sorted(p.name for p in rec.dir.iterdir() if "layer-" in p.name or
                      p.name.startswith(".")) == [".disk-data.qcow2.next"]
        m.kill("src")
        m.start("src")  # the start removes the copy of the switch that never happened
        assert not (rec.dir / ".disk-data.qcow2.next").exists()
        asyncio.run(m.delete("src", force=True))
    finally:
        for r in m.vms():
            asyncio.run(m.delete(r.name, force=True, stop_timeout=0))
        m.close()


# ---------------------------------------------------------------------------- pure parts

def test_state_file_round_trip_and_refusals(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "vmstate").write_bytes(b"state")
    (work / "memory").write_bytes(b"\0" * 8192)
    (work / MANIFEST).write_text(json.dumps({"format": 1, "backend": "firecracker",
                                             "vmm_version": "1.16.1"}))
    state = tmp_path / "state"
    pack_state(work, state)
    assert state.stat().st_mode & 0o777 == 0o600
    with tarfile.open(state) as tar:  # uncompressed, flat
        assert sorted(tar.getnames()) == sorted([MANIFEST, "memory", "vmstate"])
    out = tmp_path / "out"
    assert unpack_state(state, out)["backend"] == "firecracker"
    assert (out / "memory").read_bytes() == b"\0" * 8192
    drv = get_driver("firecracker")
    assert isinstance(drv, SavesState)
    assert drv.state_info(state) == {"machine": "firecracker 1.16.1", "version": 1}
    with pytest.raises(Exception, match="saved by firecracker, not cloud-hypervisor"):
        get_driver("cloud-hypervisor").state_info(state)  # type: ignore[attr-defined]
    evil = tmp_path / "evil"
    with tarfile.open(evil, "w") as tar:
        tar.add(work / "vmstate", arcname="../vmstate")
    with pytest.raises(Exception, match="not a saved VM state: unexpected entry"):
        unpack_state(evil, tmp_path / "out2")
    assert not (tmp_path / "vmstate").exists()
    qemu_state = tmp_path / "qemu"
    qemu_state.write_bytes(b"QEVM\0\0\0\3")
    with pytest.raises(Exception, match="cannot read the saved state"):
        read_manifest(qemu_state)


def test_ch_config_of_a_clone_names_its_own_files() -> None:
    saved = {"payload": {"kernel": "/lib/vmlinux"}, "memory": {"size": 1 << 28},
             "disks": [{"id": "data", "path": "/vms/src/disk-data.qcow2", "num_queues": 1},
                       {"id": "cidata", "path": "/vms/src/seed.iso", "readonly": True}],
             "net": [{"id": "net0", "tap": "vmf-src0", "mac": "52:54:00:00:00:01"}],
             "vsock": {"cid": 3, "socket": "/run/src/vsock.sock"},
             "serial": {"mode": "File", "file": "/vms/src/console.log"}}
    own = {"disks": [{"id": "data", "path": "/vms/c1/disk-data.qcow2"},
                     {"id": "cidata", "path": "/vms/c1/seed.iso"}],
           "net": [{"id": "net0", "tap": "vmf-c10", "mac": "52:54:00:00:00:02"}],
           "vsock": {"cid": 3, "socket": "/run/c1/vsock.sock"},
           "serial": {"mode": "File", "file": "/vms/c1/console.log"}}
    out = ch.rewrite_config(saved, own)
    assert [d["path"] for d in out["disks"]] == ["/vms/c1/disk-data.qcow2", "/vms/c1/seed.iso"]
    assert out["disks"][0]["num_queues"] == 1  # the saved hardware stays
    assert out["net"] == [{"id": "net0", "tap": "vmf-c10", "mac": "52:54:00:00:00:01"}]
    assert out["vsock"]["socket"] == "/run/c1/vsock.sock"
    assert out["serial"]["file"] == "/vms/c1/console.log"
    assert saved["vsock"]["socket"] == "/run/src/vsock.sock"  # not modified in place
    with pytest.raises(Exception, match="device 'cidata', which this VM's spec lacks"):
        ch.rewrite_config(saved, {**own, "disks": own["disks"][:1]})


def test_backing_name_is_rewritten_in_place(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * MIB)
    ov = qcow2.create_overlay(base, tmp_path / "ov.qcow2")
    longer = str(tmp_path / "images" / "blobs" / ("a" * 64))
    set_backing_name(ov, longer)
    assert snapshots.backing_name(ov) == longer
    set_backing_name(ov, "/b")
    assert snapshots.backing_name(ov) == "/b"
    with pytest.raises(Exception, match="does not fit its header"):
        set_backing_name(ov, "/" + "x" * 70000)
