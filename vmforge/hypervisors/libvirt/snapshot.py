"""libvirt's part of memory snapshots (vmforge.node.snapshots, vmforge.node.restore): pure
helpers for libvirt's save image format and the XML documents the driver sends. No I/O here
beyond reading and writing the state files named by the caller.

What libvirt 9.0 (Debian 12, QEMU 7.2) does, measured on the real libvirtd here:

* ``virDomainSnapshotCreateXML`` with ``<memory snapshot='external' file=.../>`` and an external
  snapshot of each disk onto an overlay vmforge made (``REUSE_EXT``, ``NO_METADATA``; ``HALT``
  for ``--stop``) saves memory and device state and switches the disks in one call: ~0.1 s for
  a 256 MiB guest. QEMU opens the new overlay without reading the backing name in its header
  (libvirt attaches the running image as its backing), so that name may be a file that does
  not exist yet: the library path the old overlay will be stored at.
* The overlay must be a *new path*: reusing the disk's current path (after renaming a new
  overlay over it) fails at ``cont`` ("Failed to get shared write lock"). QEMU also reopens an
  image by the name it opened it with when the image becomes a read-only backing (on the next
  snapshot), so the name a running disk was switched to must keep naming it until then.
* The memory file is libvirt's save image: a 92-byte header (magic ``LibvirtQemudSave``, or
  ``LibvirtQemudPart`` while it is being written; version 2; the length of the XML + cookie
  area; was-running; format 0 = raw; the cookie's offset), the domain XML (migratable), the
  save cookie (the guest CPU), zero padding, then QEMU's migration stream (``QEVM``).
* ``virDomainRestoreFlags(file, dxml)`` refuses a ``dxml`` with another name or UUID ("Target
  domain uuid ... does not match source", "Target domain name ... does not match source"):
  libvirt's ABI check treats both as guest ABI, and ``virDomainSaveImageDefineXML`` applies
  the same check. A saved image therefore restores only as the domain that saved it. A clone
  is restored from a *copy* of the image whose header carries the clone's own XML (the saved
  XML with the clone's name, UUID, directory and files; every device, address and MAC as
  saved, so the guest ABI is exactly the saved one): ``write_clone_image`` (~0.04 s for
  100 MiB, in-kernel copy), then ``virDomainRestoreFlags(copy, NULL, SAVE_PAUSED)`` into a
  domain defined (persistent) under the clone's name and UUID just before. The UUID is guest
  visible only through SMBIOS, which the guest read at its boot; the name is not guest
  visible. libvirt gives every restored domain a new VM generation id (``<genid/>``).
"""

from __future__ import annotations

import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import VmError
from ..plan import MachinePlan
from .render import NS_VMFORGE

__all__ = ["SAVE_MAGIC", "PARTIAL_MAGIC", "HEADER_SIZE", "SaveImage", "read_save_image",
           "state_info", "write_clone_image", "clone_xml", "snapshot_xml", "disk_sources",
           "with_disk_sources", "genid", "RESTORE_PREFIX"]

SAVE_MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
SAVE_VERSION = 2
# magic[16], version, data_len, was_running, format, cookieOffset, unused[14]: little-endian
_HEADER = struct.Struct("<16s5I56x")
HEADER_SIZE = _HEADER.size  # 92
_QEVM = b"QEVM"
_QEVM_VERSION = 3
_SECTION_CONFIGURATION = 0x07
#: ``MachinePlan.incoming`` of a libvirt restore: this prefix and the saved image's path.
RESTORE_PREFIX = "libvirt-save:"


@dataclass(frozen=True)
class SaveImage:
    version: int
    data_len: int
    was_running: bool
    format: int
    xml: str
    cookie: str | None
    stream_offset: int  # where QEMU's migration stream starts


def read_save_image(path: str | Path) -> SaveImage:
    """libvirt's header of a saved image; VmError (saying what is wrong) for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                raise VmError(f"{path} is not a libvirt saved state (only {len(head)} bytes)")
            magic, version, data_len, running, fmt, cookie_off = _HEADER.unpack(head)
            if magic == PARTIAL_MAGIC:
                raise VmError(f"{path} is an incomplete libvirt saved state (libvirt was "
                              "still writing it)")
            if magic != SAVE_MAGIC:
                raise VmError(f"{path} is not a libvirt saved state (no LibvirtQemudSave "
                              "header)")
            if version != SAVE_VERSION:
                raise VmError(f"{path}: libvirt save image version {version}, this driver "
                              f"reads {SAVE_VERSION}")
            if fmt != 0:
                raise VmError(f"{path}: a compressed libvirt saved state (format {fmt}); "
                              "vmforge writes raw ones")
            if not 0 < data_len < 64 << 20 or cookie_off > data_len:
                raise VmError(f"{path}: damaged libvirt save header (data length "
                              f"{data_len}, cookie at {cookie_off})")
            data = f.read(data_len)
    except OSError as exc:
        raise VmError(f"cannot read the saved state {path}: {exc.strerror}") from exc
    if len(data) < data_len:
        raise VmError(f"{path} is truncated inside its libvirt header")
    xml_len = cookie_off or data_len
    xml = data[:xml_len].split(b"\0", 1)[0].decode(errors="replace")
    cookie = data[xml_len:].split(b"\0", 1)[0].decode(errors="replace") if cookie_off \
        else None
    return SaveImage(version, data_len, bool(running), fmt, xml, cookie,
                     HEADER_SIZE + data_len)


def state_info(path: str | Path) -> dict[str, Any]:
    """What a libvirt saved state says about itself: libvirt's header, the machine type of
    its domain XML and of QEMU's stream after it (they must agree), the stream's format."""
    img = read_save_image(path)
    try:
        root = ET.fromstring(img.xml)
    except ET.ParseError as exc:
        raise VmError(f"{path}: the domain XML in its libvirt header is damaged: {exc}") \
            from exc
    os_type = root.find("os/type")
    xml_machine = os_type.get("machine") if os_type is not None else None
    try:
        with open(path, "rb") as f:
            f.seek(img.stream_offset)
            head = f.read(4 + 4 + 1 + 4 + 256)
    except OSError as exc:
        raise VmError(f"cannot read the saved state {path}: {exc.strerror}") from exc
    if len(head) < 8 or head[:4] != _QEVM:
        raise VmError(f"{path}: no QEMU migration stream after libvirt's header (the file "
                      "is truncated or damaged)")
    version = struct.unpack(">I", head[4:8])[0]
    if version != _QEVM_VERSION:
        raise VmError(f"{path}: QEMU state format {version}, this QEMU reads {_QEVM_VERSION}")
    machine = None
    if len(head) > 13 and head[8] == _SECTION_CONFIGURATION:
        n = struct.unpack(">I", head[9:13])[0]
        machine = head[13:13 + n].decode(errors="replace")
    if machine and xml_machine and machine != xml_machine:
        raise VmError(f"{path}: libvirt's header is for machine {xml_machine}, QEMU's "
                      f"stream for {machine}")
    return {"version": version, "machine": machine or xml_machine,
            "libvirt_save_version": img.version, "was_running": img.was_running,
            "domain": root.findtext("name")}


def write_clone_image(src: str | Path, dest: str | Path, xml: str) -> None:
    """A copy of the saved image ``src`` whose header carries ``xml`` (and the same save
    cookie and run state); QEMU's stream is copied in the kernel (``sendfile``)."""
    img = read_save_image(src)
    body = xml.encode() + b"\0"
    cookie_off = 0
    if img.cookie is not None:
        cookie_off = len(body)
        body += img.cookie.encode() + b"\0"
    data_len = len(body) + 64 * 1024  # libvirt's own padding, room to edit the XML
    header = _HEADER.pack(SAVE_MAGIC, img.version, data_len, int(img.was_running),
                          img.format, cookie_off)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(src, "rb") as fi:
            size = os.fstat(fi.fileno()).st_size
            os.write(fd, header + body + b"\0" * (data_len - len(body)))
            offset = img.stream_offset
            while offset < size:
                sent = os.sendfile(fd, fi.fileno(), offset, min(size - offset, 1 << 30))
                if sent == 0:
                    break
                offset += sent
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(dest).unlink(missing_ok=True)
        raise
    os.close(fd)


def _owner_dir(root: ET.Element) -> str | None:
    el = root.find(f"metadata/{{{NS_VMFORGE}}}vm")
    return el.get("vm-dir") if el is not None else None


def clone_xml(saved_xml: str, plan: MachinePlan, uuid: str) -> str:
    """The live XML of a clone restored from a saved image: the saved domain (every device,
    address, MAC and the CPU as saved: the guest ABI) with the clone's name, UUID, ownership
    metadata and files (disks matched by serial, the seed, console log, agent socket,
    NVRAM). Anything else naming the source VM's directory is moved to the clone's."""
    root = ET.fromstring(saved_xml)
    old_dir = _owner_dir(root)
    name = root.find("name")
    if name is None:
        raise VmError("the saved domain XML has no name")
    name.text = plan.name
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = ET.Element("uuid")
        root.insert(list(root).index(name) + 1, uuid_el)
    uuid_el.text = uuid
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for el in meta.findall(f"{{{NS_VMFORGE}}}vm"):
        meta.remove(el)
    ET.SubElement(meta, f"{{{NS_VMFORGE}}}vm", {"name": plan.name, "vm-dir": plan.vm_dir})
    by_serial = {d.id[:20]: d.path for d in plan.disks}
    seen: set[str] = set()
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        if source is None:
            continue
        if disk.get("device") == "disk":
            serial = disk.findtext("serial") or ""
            if serial not in by_serial:
                raise VmError(f"the saved domain has a disk {serial!r} the clone does not")
            source.set("file", by_serial[serial])
            seen.add(serial)
            for backing in disk.findall("backingStore"):
                disk.remove(backing)
        elif old_dir and plan.seed and source.get("file", "").startswith(old_dir + "/") \
                and source.get("file", "").endswith("seed.iso"):
            source.set("file", plan.seed)
    if seen != set(by_serial):
        raise VmError("the clone has disks the saved domain does not: "
                      + ", ".join(sorted(set(by_serial) - seen)))
    for tag in ("devices/serial", "devices/console"):
        for dev in root.iterfind(tag):
            source = dev.find("source")
            if source is not None and source.get("path"):
                source.set("path", plan.console_log)
    if plan.agent is not None and plan.agent.socket:
        for channel in root.iterfind("devices/channel"):
            source = channel.find("source")
            target = channel.find("target")
            if source is not None and target is not None and \
                    target.get("name", "").startswith("org.vmforge.agent"):
                source.set("path", plan.agent.socket)
    nvram = root.find("os/nvram")
    if nvram is not None and plan.nvram:
        nvram.text = plan.nvram
    if old_dir:  # anything else of the source's directory (none today): the clone's
        for el in root.iter():
            for key, value in el.attrib.items():
                if value.startswith(old_dir + "/"):
                    el.set(key, plan.vm_dir + value[len(old_dir):])
    return ET.tostring(root, encoding="unicode")


def snapshot_xml(name: str, state: str | Path, overlays: Mapping[str, str]) -> str:
    """``<domainsnapshot>``: memory to ``state``, each disk (by target, ``vda``) to its
    overlay; disks not named (cdroms, the seed) are left out of the snapshot."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", snapshot="external", file=str(state))
    disks = ET.SubElement(root, "disks")
    for target, path in overlays.items():
        disk = ET.SubElement(disks, "disk", name=target, snapshot="external", type="file")
        ET.SubElement(disk, "driver", type="qcow2")
        ET.SubElement(disk, "source", file=path)
    return ET.tostring(root, encoding="unicode")


def disk_sources(domain_xml: str) -> dict[str, tuple[str, str]]:
    """Each disk's (target dev, source file), keyed by its serial (vmforge's disk id)."""
    out = {}
    for disk in ET.fromstring(domain_xml).iterfind("devices/disk"):
        if disk.get("device") != "disk":
            continue
        target = disk.find("target")
        source = disk.find("source")
        serial = disk.findtext("serial")
        if target is not None and source is not None and serial:
            out[serial] = (target.get("dev", ""), source.get("file", ""))
    return out


def with_disk_sources(domain_xml: str, sources: Mapping[str, str]) -> str:
    """The domain XML with the disks of these serials on these files (backing chains left to
    libvirt to read from the images again)."""
    root = ET.fromstring(domain_xml)
    for disk in root.iterfind("devices/disk"):
        serial = disk.findtext("serial")
        source = disk.find("source")
        if disk.get("device") == "disk" and serial is not None and serial in sources \
                and source is not None:
            source.set("file", sources[serial])
            for backing in disk.findall("backingStore"):
                disk.remove(backing)
    return ET.tostring(root, encoding="unicode")


def genid(domain_xml: str) -> str | None:
    text = ET.fromstring(domain_xml).findtext("genid")
    return text.strip() if text and text.strip() else None
