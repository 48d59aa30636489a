"""libvirt snapshots, pure part: libvirt's save image header, the clone's XML, the snapshot
document (no daemon; the real libvirtd is in tests/integration/test_libvirt_snapshots.py)."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmforge.errors import VmError
from vmforge.hypervisors.base import Accel
from vmforge.hypervisors.libvirt import snapshot as lvsnap
from vmforge.hypervisors.libvirt.render import NS_VMFORGE
from vmforge.hypervisors.plan import AgentPlan, DiskPlan, MachinePlan
from vmforge.spec import Firmware, Machine

SAVED = f"""<domain type='qemu'>
  <name>src</name>
  <uuid>aa7a4b0f-cc51-45c1-a94b-b5639f5ad938</uuid>
  <genid>0f8b2b4a-1111-2222-3333-444455556666</genid>
  <metadata><vmforge:vm xmlns:vmforge="{NS_VMFORGE}" name="src" vm-dir="/d/vms/src"/></metadata>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><kernel>/d/images/blobs/k</kernel></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/d/vms/src/.disk-data.top-1.qcow2'/>
      <backingStore type='file'><source file='/d/vms/src/disk-data.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/><serial>data</serial>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></disk>
    <disk type='file' device='cdrom'><source file='/d/vms/src/seed.iso'/>
      <target dev='sda' bus='scsi'/><readonly/></disk>
    <interface type='user'><mac address='52:54:00:81:87:8e'/><model type='virtio'/></interface>
    <serial type='file'><source path='/d/vms/src/console.log'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind' path='/tmp/vmforge-0/abc/agent.sock'/>
      <target type='virtio' name='org.vmforge.agent.0'/></channel>
  </devices>
</domain>"""


def image(tmp_path: Path, xml: str = SAVED, stream: bytes = b"", cookie: str | None = "<c/>",
          magic: bytes = lvsnap.SAVE_MAGIC) -> Path:
    body = xml.encode() + b"\0"
    off = 0
    if cookie is not None:
        off = len(body)
        body += cookie.encode() + b"\0"
    data_len = len(body) + 100
    head = struct.pack("<16s5I56x", magic, 2, data_len, 1, 0, off)
    qevm = b"QEVM" + struct.pack(">I", 3) + b"\x07" + struct.pack(">I", 10) + b"pc-q35-7.2"
    path = tmp_path / "state"
    path.write_bytes(head + body + bytes(100) + (stream or qevm + bytes(1000)))
    return path


def plan() -> MachinePlan:
    return MachinePlan(name="clone1", vm_dir="/d/vms/clone1", run_dir="/d/vms/clone1",
                       cpu_cores=1, memory_mib=256, machine=Machine.Q35,
                       firmware=Firmware.BIOS, accel=Accel.TCG,
                       console_log="/d/vms/clone1/console.log",
                       disks=(DiskPlan("data", "/d/vms/clone1/disk-data.qcow2", "qcow2",
                                       None),),
                       seed="/d/vms/clone1/seed.iso",
                       agent=AgentPlan("virtio-serial", socket="/tmp/vmforge-0/def/agent.sock"))


def test_save_image_header_and_state_info(tmp_path: Path) -> None:
    path = image(tmp_path)
    img = lvsnap.read_save_image(path)
    assert lvsnap.HEADER_SIZE == 92 and img.cookie == "<c/>" and img.was_running
    assert img.xml.startswith("<domain") and img.stream_offset == 92 + img.data_len
    info = lvsnap.state_info(path)
    assert info["machine"] == "pc-q35-7.2" and info["domain"] == "src"
    assert info["version"] == 3
    with pytest.raises(VmError, match="incomplete libvirt saved state"):
        lvsnap.state_info(image(tmp_path, magic=lvsnap.PARTIAL_MAGIC))
    (tmp_path / "x").write_bytes(b"QEVM" + bytes(200))
    with pytest.raises(VmError, match="not a libvirt saved state"):
        lvsnap.state_info(tmp_path / "x")
    with pytest.raises(VmError, match="no QEMU migration stream"):
        lvsnap.state_info(image(tmp_path, stream=b"junk" * 10))
    other = image(tmp_path, SAVED.replace("pc-q35-7.2", "pc-i440fx-7.2"))
    with pytest.raises(VmError, match="header is for machine pc-i440fx-7.2, QEMU's stream"):
        lvsnap.state_info(other)


def test_clone_xml_keeps_the_guest_abi_and_moves_the_files() -> None:
    out = lvsnap.clone_xml(SAVED, plan(), "11111111-2222-3333-4444-555555555555")
    root = ET.fromstring(out)
    assert root.findtext("name") == "clone1"
    assert root.findtext("uuid") == "11111111-2222-3333-4444-555555555555"
    meta = root.find(f"metadata/{{{NS_VMFORGE}}}vm")
    assert meta is not None and meta.get("vm-dir") == "/d/vms/clone1"
    disk = root.find("devices/disk")
    assert disk is not None and disk.find("backingStore") is None
    assert lvsnap.disk_sources(out) == {"data": ("vda", "/d/vms/clone1/disk-data.qcow2")}
    assert "/d/vms/clone1/seed.iso" in out and "/d/vms/clone1/console.log" in out
    assert "/tmp/vmforge-0/def/agent.sock" in out and "/d/vms/src" not in out
    for kept in ("52:54:00:81:87:8e", "bus='0x03'", "/d/images/blobs/k",
                 "0f8b2b4a-1111-2222-3333-444455556666"):
        assert kept in out.replace('"', "'"), kept
    with pytest.raises(VmError, match="disk 'data' the clone does not"):
        lvsnap.clone_xml(SAVED, MachinePlan(**{**plan().__dict__, "disks": ()}), "u")


def test_clone_image_is_the_saved_stream_under_new_xml(tmp_path: Path) -> None:
    src = image(tmp_path, stream=b"QEVM" + struct.pack(">I", 3) + bytes(5000) + b"END")
    dest = tmp_path / "clone.state"
    lvsnap.write_clone_image(src, dest, "<domain><name>clone1</name></domain>")
    a, b = lvsnap.read_save_image(src), lvsnap.read_save_image(dest)
    assert b.xml == "<domain><name>clone1</name></domain>" and b.cookie == a.cookie
    assert b.was_running == a.was_running
    assert dest.read_bytes()[b.stream_offset:] == src.read_bytes()[a.stream_offset:]


def test_snapshot_document_and_disk_sources() -> None:
    doc = ET.fromstring(lvsnap.snapshot_xml("vmforge-x", "/s/state", {"vda": "/v/t.qcow2"}))
    mem = doc.find("memory")
    assert mem is not None and mem.attrib == {"snapshot": "external", "file": "/s/state"}
    disk = doc.find("disks/disk")
    assert disk is not None and disk.get("name") == "vda"
    assert doc.find("disks/disk/source").get("file") == "/v/t.qcow2"  # type: ignore[union-attr]
    moved = lvsnap.with_disk_sources(SAVED, {"data": "/d/vms/src/disk-data.qcow2"})
    assert lvsnap.disk_sources(moved)["data"] == ("vda", "/d/vms/src/disk-data.qcow2")
    assert "backingStore" not in moved
    assert lvsnap.genid(SAVED) == "0f8b2b4a-1111-2222-3333-444455556666"
