"""Bad input and failed creates leave nothing behind (no process is started here)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from vmforge.errors import SpecError, VmExists
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir
from vmforge.spec import parse_request

from ..fakes import fake_host


@pytest.fixture
def mgr(tmp_path: Path) -> VmManager:
    m = VmManager(DataDir(tmp_path / "data"),
                  host=fake_host(ovmf_vars=str(tmp_path / "no-such-vars.fd")))
    k = tmp_path / "k"
    k.write_bytes(b"kernel")
    m.library.add("minimal", {"kernel": k, "vmlinux": k, "initrd": k}, kind="kernel")
    return m


def nothing_left(m: VmManager, name: str) -> None:
    assert m.db.query("SELECT * FROM vms WHERE name=?", (name,)) == []
    assert m.db.query("SELECT * FROM vm_images WHERE vm_name=?", (name,)) == []
    assert [p.name for p in m.data.vms.iterdir()] == []


def test_missing_backing_file(mgr: VmManager, tmp_path: Path) -> None:
    req = parse_request({"name": "a", "spec": {"disks": [
        {"id": "d", "bootable": True, "backing_file": str(tmp_path / "nope.qcow2")}]}})
    with pytest.raises(SpecError) as exc:
        mgr.create(req)
    assert exc.value.field == "spec.disks[0].backing_file"
    assert "not found" in str(exc.value)
    nothing_left(mgr, "a")


def test_missing_cdrom_and_unknown_image(mgr: VmManager) -> None:
    with pytest.raises(SpecError, match=r"spec.cdroms\[0\].iso_path"):
        mgr.create(parse_request({"name": "a", "spec": {"cdroms": [
            {"id": "c", "iso_path": "/nonexistent.iso"}]}}))
    with pytest.raises(SpecError, match="spec.kernel.image"):
        mgr.create(parse_request({"name": "a", "spec": {"kernel": {"image": "nothere"}}}))
    nothing_left(mgr, "a")


def test_missing_ovmf_vars_is_a_spec_error(mgr: VmManager) -> None:
    req = parse_request({"name": "a", "spec": {"firmware": "uefi",
                                               "kernel": {"image": "minimal"}}})
    with pytest.raises(SpecError, match="spec.firmware"):
        mgr.create(req)
    nothing_left(mgr, "a")


def test_racing_creates_of_one_name(mgr: VmManager) -> None:
    req = parse_request({"name": "twin", "spec": {"kernel": {"image": "minimal"}}})
    results: list[object] = []

    def go() -> None:
        m = VmManager(mgr.data, host=fake_host())
        try:
            results.append(m.create(req).name)
        except VmExists as exc:
            results.append(exc)
    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("twin") == 1
    assert sum(isinstance(r, VmExists) for r in results) == 5
    assert [p.name for p in mgr.data.vms.iterdir()] == ["twin"]
    rec = mgr.get("twin")
    assert rec.state == "created"
    assert mgr.db.query("SELECT COUNT(*) FROM vm_images WHERE vm_name='twin'")[0][0] == 1


def test_created_vm_pins_its_image(mgr: VmManager) -> None:
    from vmforge.errors import ImageError
    mgr.create(parse_request({"name": "a", "spec": {"kernel": {"image": "minimal"}}}))
    with pytest.raises(ImageError, match="in use by VM a"):
        mgr.library.remove("minimal")
    asyncio.run(mgr.delete("a"))
    nothing_left(mgr, "a")
    mgr.library.remove("minimal")


def test_state_survives_a_new_manager(mgr: VmManager) -> None:
    mgr.create(parse_request({"name": "keep", "spec": {"kernel": {"image": "minimal"},
                                                       "memory_mib": 300}}))
    mgr.close()
    again = VmManager(mgr.data, host=fake_host())
    rec = again.get("keep")
    assert rec.state == "created" and rec.request.spec.memory_mib == 300
