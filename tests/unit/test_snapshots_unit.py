"""Snapshots, restores and pools without processes: argv, state headers, library objects,
field-named refusals, renames in the state file, the pool's names and records."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vmforge.errors import ImageError, SpecError, VmError, VmExists
from vmforge.hypervisors import get_driver
from vmforge.hypervisors.base import Accel, Backend, SavesState, SnapshotsInOneStep
from vmforge.hypervisors.qemu.render import qemu_argv
from vmforge.hypervisors.qemu.snapshot import incoming_uri, read_state_header
from vmforge.images import qcow2
from vmforge.images.library import Library, valid_role
from vmforge.node import pools, restore, snapshots
from vmforge.node.manager import VmManager
from vmforge.node.plan import Inputs, machine_plan
from vmforge.node.states import LIVE, TRANSIENT, TRANSITIONS, VmState
from vmforge.paths import DataDir, VmPaths
from vmforge.spec import parse_request
from vmforge.state import Database

from ..fakes import fake_host
from ..golden import check_golden

HOST = fake_host(tsc_khz=2600000)


def plan(spec: dict[str, object], name: str = "vm1"):  # type: ignore[no-untyped-def]
    req = parse_request({"name": name, "spec": spec})
    return machine_plan(req, Inputs({}, None), VmPaths(Path("/data/vms") / name), HOST,
                        Accel.TCG)


# ---------------------------------------------------------------------------- argv

def test_every_pc_and_q35_vm_has_a_generation_id_device() -> None:
    for machine in ("q35", "pc"):
        argv = qemu_argv(plan({"machine": machine}), HOST)
        assert "vmgenid,id=vmgenid0,guid=auto" in argv
        assert "-incoming" not in argv and "-S" not in argv
    assert not any("vmgenid" in a for a in qemu_argv(plan({"machine": "microvm"}), HOST))


def test_restore_argv_golden() -> None:
    mp = replace(plan({"disks": [{"id": "data", "size_gib": 1}]}, "clone1"),
                 vmgenid="0f0e0d0c-0b0a-4908-8706-050403020100",
                 incoming=incoming_uri("/data/images/blobs/ab cd'ef"))
    argv = qemu_argv(mp, HOST)
    check_golden("argv-restore.txt", "\n".join(argv) + "\n")
    i = argv.index("-incoming")
    assert argv[i + 1] == "exec:cat '/data/images/blobs/ab cd'\"'\"'ef'"
    assert argv[i + 2:i + 5] == ["-S", "-D", "/data/vms/clone1/qemu.log"]
    assert "vmgenid,id=vmgenid0,guid=0f0e0d0c-0b0a-4908-8706-050403020100" in argv


def test_the_device_set_of_a_clone_is_the_source_s() -> None:
    """Only names, paths and the generation id differ: what -incoming needs."""
    spec = {"disks": [{"id": "data", "size_gib": 1}], "cpu_cores": 2, "memory_mib": 512}

    def devices(name: str) -> list[str]:
        argv = qemu_argv(replace(plan(spec, name), vmgenid="x"), HOST)
        out = []
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag in ("-device", "-machine", "-smp", "-m", "-cpu"):
                out.append(value)
        return out
    assert devices("src") == devices("a-clone")


# ---------------------------------------------------------------------------- state files

def header(machine: bytes, version: int = 3) -> bytes:
    return b"QEVM" + struct.pack(">I", version) + b"\x07" + struct.pack(">I", len(machine)) + \
        machine + b"\x01\x00\x00\x00\x02"


def test_state_header(tmp_path: Path) -> None:
    p = tmp_path / "state"
    p.write_bytes(header(b"pc-q35-7.2") + b"\0" * 64)
    assert read_state_header(p) == {"version": 3, "machine": "pc-q35-7.2"}
    p.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(VmError, match="not a QEMU saved state"):
        read_state_header(p)
    p.write_bytes(header(b"pc-q35-7.2", version=2))
    with pytest.raises(VmError, match="format 2"):
        read_state_header(p)
    with pytest.raises(VmError, match="cannot read"):
        read_state_header(tmp_path / "missing")


def test_backing_name_of_an_overlay(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    base.write_bytes(qcow2.overlay_bytes("/nowhere", "raw", 1 << 20)[0].ljust(1 << 16, b"\0"))
    top = qcow2.create_overlay(base, tmp_path / "top.qcow2", None, backing_format="qcow2")
    assert snapshots.backing_name(top) == str(base.resolve())
    raw = tmp_path / "raw"
    raw.write_bytes(b"\0" * 512)
    assert snapshots.backing_name(raw) is None


# ---------------------------------------------------------------------------- library

@pytest.fixture
def lib(tmp_path: Path) -> Library:
    return Library(Database(tmp_path / "state.db"), tmp_path / "images")


def test_snapshot_roles_and_kinds_keep_apart(lib: Library, tmp_path: Path) -> None:
    assert valid_role("state") and valid_role("layer:boot") and valid_role("nvram")
    assert not valid_role("layer:") and not valid_role("memory")
    (tmp_path / "s").write_bytes(b"QEVM state")
    (tmp_path / "l").write_bytes(b"layer")
    snap = lib.add("snap", {"state": tmp_path / "s", "layer:boot": tmp_path / "l"},
                   kind="snapshot", recipe={"format": 1})
    assert snap.path("state") and snap.path("layer:boot")
    with pytest.raises(ImageError, match="unknown file roles"):
        lib.add("snap", {"memory": tmp_path / "s"}, kind="snapshot")
    with pytest.raises(ImageError, match="is the name of a snapshot"):
        lib.add("snap", {"disk": tmp_path / "l"}, kind="disk")
    lib.add("base", {"disk": tmp_path / "l"}, kind="disk")
    with pytest.raises(ImageError, match="is the name of an image"):
        lib.add("base", {"state": tmp_path / "s"}, kind="snapshot")
    # Only the roles asked for are checked (a restore reads an earlier snapshot's layers).
    path = snap.path("state")
    assert path is not None
    path.chmod(0o600)
    path.write_bytes(b"truncated")
    with pytest.raises(ImageError, match="state file .* changed"):
        lib.check_intact(snap)
    lib.check_intact(snap, lambda r: r.startswith("layer:"))


# ---------------------------------------------------------------------------- states

def test_new_states_are_transient_and_live() -> None:
    for s in (VmState.SNAPSHOTTING, VmState.RESTORING):
        assert s in TRANSIENT and s in LIVE
    assert VmState.SNAPSHOTTING in TRANSITIONS[VmState.RUNNING]
    assert TRANSITIONS[VmState.RESTORING] == (VmState.RUNNING, VmState.DELETING)
    assert VmState.RESTORING in TRANSITIONS[VmState.CREATING]


# ---------------------------------------------------------------------------- refusals

def test_capabilities_and_field_named_refusals() -> None:
    qemu = get_driver(Backend.QEMU)
    assert qemu.capabilities().snapshots and isinstance(qemu, SavesState)
    assert qemu.capabilities().to_json()["snapshots"] is True
    libvirt = get_driver(Backend.LIBVIRT)  # libvirt's external snapshot, in one step
    assert libvirt.capabilities().snapshots and isinstance(libvirt, SavesState)
    assert isinstance(libvirt, SnapshotsInOneStep) and not isinstance(qemu, SnapshotsInOneStep)
    for backend in Backend:
        drv = get_driver(backend)
        if not drv.capabilities().snapshots:
            with pytest.raises(SpecError, match=rf"^spec.hypervisor: {backend.value} cannot "
                                                "save"):
                snapshots.saver(drv)

    def refused(spec: dict[str, object]) -> str:
        req = parse_request({"name": "x", "spec": {"kernel": {"kernel": "/k"}, **spec}})
        with pytest.raises(SpecError) as info:
            snapshots.check_snapshottable(req, qemu)
        return str(info.value.field)
    assert refused({"mounts": [{"source": "/srv", "target": "/srv"}]}) == "spec.mounts[0]"
    assert refused({"disks": [{"id": "a", "size_gib": 1},
                              {"id": "b", "size_gib": 1, "format": "raw"}]}) == \
        "spec.disks[1].format"
    assert refused({"nics": [{"id": "n", "network": "lab", "ip": "10.0.0.5/24"}]}) == \
        "spec.nics[0].ip"


# ---------------------------------------------------------------------------- identity

def test_identity_call_arguments() -> None:
    a = restore.identity_args("clone1")
    b = restore.identity_args("clone1", [{"old_mac": "52:54:00:00:00:01",
                                         "mac": "52:54:00:00:00:02", "dhcp": True}])
    assert a["name"] == a["hostname"] == "clone1"
    assert len(a["machine_id"]) == 32 and a["machine_id"] != b["machine_id"]
    assert a["entropy"] != b["entropy"] and abs(a["time_ns"] / 1e9 - time.time()) < 5
    assert "nics" not in a and b["nics"][0]["dhcp"] is True
    assert restore._identity_problems({"failed": {"machine-id": "read-only"}}) == \
        "identity partly refreshed: machine-id: read-only"
    assert restore._identity_problems({"refreshed": ["hostname"], "failed": {}}) is None


def test_guest_refuses_a_bad_machine_id() -> None:
    from vmforge.agent.guest import FEATURES, set_machine_id
    assert "identity" in FEATURES
    with pytest.raises(ValueError):
        set_machine_id("../../etc/passwd")


# ---------------------------------------------------------------------------- pools

def test_pool_names_and_members() -> None:
    pat = pools.member_pattern("web")
    name = pools._member_name("web")
    assert pat.match(name) and len(name) <= 63
    assert not pat.match("web--pXYZ") and not pat.match("webx--p0123abcd")
    pools.check_pool_name("a" * pools.POOL_NAME_MAX)
    for bad in ("a" * (pools.POOL_NAME_MAX + 1), "-x", "a_b", ""):
        with pytest.raises(SpecError):
            pools.check_pool_name(bad)


@pytest.fixture
def manager(tmp_path: Path) -> VmManager:
    return VmManager(DataDir(tmp_path / "data"), host=HOST)


def _row(m: VmManager, name: str, image_id: int | None = None) -> None:
    req = parse_request({"name": name, "spec": {"kernel": {"kernel": "/k"}}})
    d = m.data.vms / name
    d.mkdir(parents=True)
    with m.db.tx() as c:
        c.execute("INSERT INTO vms (name, state, spec, spec_rev, dir, created_at, backend) "
                  "VALUES (?, 'running', ?, 1, ?, ?, 'qemu')",
                  (name, req.model_dump_json(by_alias=True), str(d), time.time()))
        if image_id is not None:
            c.execute("INSERT INTO vm_images (vm_name, role, image_id) VALUES (?,?,?)",
                      (name, "snapshot:1", image_id))


def test_rename_moves_the_row_and_its_pins_and_keeps_the_directory(manager: VmManager,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(b"state")
    img = manager.library.add("snap", {"state": tmp_path / "s"}, kind="snapshot")
    _row(manager, "web--p0123abcd", img.id)
    _row(manager, "other")
    rec = manager._row("web--p0123abcd")
    assert rec is not None
    out = pools.rename(manager, rec, "taken")
    assert out.name == "taken" and out.dir == rec.dir
    assert out.stored["name"] == "taken"
    assert json.loads((rec.dir / "spec.json").read_text())["name"] == "taken"
    assert manager._pins("taken") == {"snapshot:1": img.id}
    assert manager._row("web--p0123abcd") is None
    with pytest.raises(VmExists):
        pools.rename(manager, out, "other")
    assert manager._pins("taken") == {"snapshot:1": img.id}  # rolled back whole
    with pytest.raises(ImageError, match="in use by VM"):
        manager.library.remove("snap")


def test_pool_records(manager: VmManager) -> None:
    assert pools.all_pools(manager) == []
    p = pools.Pool("web", 2, 7, "snap:1")
    pools._save(manager, p)
    assert pools.get_pool(manager, "web") == p
    assert [x.name for x in pools.all_pools(manager)] == ["web"]
    assert pools.refiller_pid(manager, "web") is None
    with pytest.raises(VmError, match="no pool named"):
        pools.get_pool(manager, "nope")


def test_pools_api_without_pools(manager: VmManager) -> None:
    from fastapi.testclient import TestClient

    from vmforge.api import create_app
    with TestClient(create_app(manager, None, supervise=False)) as c:
        r = c.get("/v1/pools")
        assert r.status_code == 200 and r.json() == []
        r = c.post("/v1/pools/nope/take", json={"name": "n1"})
        assert r.status_code == 404 and r.json()["error"] == "VmNotFound"
        r = c.post("/v1/pools/nope/take", json={"name": "bad_name"})
        assert r.status_code == 422
        assert "/v1/pools/{pool}/take" in c.get("/openapi.json").json()["paths"]
    assert pools.all_pools(manager) == []


def test_a_clone_on_a_bridge_gets_its_own_mac_and_a_dhcp_renew(manager: VmManager) -> None:
    from vmforge.net.names import derived_mac
    spec = {"kernel": {"kernel": "/k"}, "nics": [{"id": "n0", "bridge": "br0"},
                                                  {"id": "n1"}]}
    req = parse_request({"name": "clone1", "spec": spec})
    d = manager.data.vms / "clone1"
    d.mkdir(parents=True)
    with manager.db.tx() as c:
        c.execute("INSERT INTO vms (name, state, spec, spec_rev, dir, created_at, backend) "
                  "VALUES ('clone1', 'restoring', ?, 1, ?, 0, 'qemu')",
                  (req.model_dump_json(by_alias=True), str(d)))
    rec = manager._row("clone1")
    assert rec is not None
    old = [{"id": "n0", "mac": derived_mac("source", "n0"), "dhcp": True, "on_host": True},
           {"id": "n1", "mac": derived_mac("source", "n1"), "dhcp": False, "on_host": False}]
    changes = restore._nic_changes(manager, rec, old)
    assert changes == [{"old_mac": derived_mac("source", "n0"),
                        "mac": derived_mac("clone1", "n0"), "dhcp": True}]
    # A taken pool member keeps its MACs: they are pinned into its spec by the rename.
    out = pools.rename(manager, rec, "taken")
    assert out.stored["spec"]["nics"][0]["mac"] == derived_mac("clone1", "n0")
    assert restore._nic_changes(manager, out, [{**old[0], "mac": derived_mac("clone1",
                                                                              "n0")}]) == []


def test_restore_refuses_another_qemu_or_machine_or_a_missing_base(manager: VmManager,
                                                                  tmp_path: Path) -> None:
    """Checked before anything is made (no row, no directory, no process)."""
    def snapshot(name: str, machine: bytes, **meta: object) -> snapshots.Snapshot:
        state = tmp_path / f"{name}.state"
        state.write_bytes(header(machine) + b"\0" * 64)
        recipe = {"format": snapshots.FORMAT, "spec": {"kernel": {"kernel": str(state)}},
                  "hypervisor_version": HOST.qemu_version, "machine_type": "pc-q35-7.2",
                  "accel": "tcg", "pins": {}, **meta}
        return snapshots.Snapshot(manager.library.add(name, {"state": state},
                                                       kind="snapshot", recipe=recipe))
    ok = snapshot("ok", b"pc-q35-7.2")
    restore.check_restorable(manager, ok, "clone1")
    with pytest.raises(ImageError, match="saved by qemu 8.2.0; this host runs 7.2.0"):
        restore.check_restorable(manager, snapshot("newer", b"pc-q35-7.2",
                                                   hypervisor_version="8.2.0"), "c")
    with pytest.raises(ImageError, match="machine type pc-i440fx-7.2, the snapshot for "
                                         "pc-q35-7.2"):
        restore.check_restorable(manager, snapshot("other", b"pc-i440fx-7.2"), "c")
    with pytest.raises(ImageError, match="builds on image #999 .* no longer in the library"):
        restore.check_restorable(manager, snapshot("orphan", b"pc-q35-7.2",
                                                   pins={"disk:boot": 999}), "c")
    with pytest.raises(ImageError, match="another version of vmforge"):
        restore.check_restorable(manager, snapshot("future", b"pc-q35-7.2", format=99), "c")
    with pytest.raises(SpecError, match="invalid VM name"):
        restore.check_restorable(manager, ok, "bad_name")
    assert manager.vms() == [] and list(manager.data.vms.iterdir()) == []


def test_images_a_snapshot_builds_on_cannot_be_removed(lib: Library, tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"kernel")
    (tmp_path / "d").write_bytes(b"disk")
    (tmp_path / "s").write_bytes(b"state")
    kernel = lib.add("kern", {"kernel": tmp_path / "k"}, kind="kernel")
    disk = lib.add("base", {"disk": tmp_path / "d"}, kind="disk")
    lib.add("snap", {"state": tmp_path / "s"}, kind="snapshot", parent=disk,
            recipe={"uses": [kernel.id, disk.id]})
    for ref in ("kern", "base"):
        with pytest.raises(ImageError, match="in use by image snap:1"):
            lib.remove(ref)
    lib.remove("snap")
    lib.remove("kern")
    lib.remove("base")
