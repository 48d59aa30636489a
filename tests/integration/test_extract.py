"""Kernel and initrd taken out of disk images at rest (no boot, no mount)."""

from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path

import pytest

from vmforge.images import qcow2
from vmforge.images.extract import attach_kernel, extract_kernel, find_partitions
from vmforge.images.importing import import_disk
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir

pytestmark = pytest.mark.subprocess


def make_partitioned(tmp: Path) -> Path:
    root = tmp / "root"
    (root / "boot").mkdir(parents=True)
    (root / "etc").mkdir()
    for rel in ("5.10.0-1", "6.1.0-2"):
        (root / "boot" / f"vmlinuz-{rel}").write_bytes(f"kernel {rel}".encode())
        (root / "boot" / f"initrd.img-{rel}").write_bytes(f"initrd {rel}".encode())
    fs = tmp / "fs.raw"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(root), "-L", "r", str(fs), "32M"], check=True)
    disk = tmp / "disk.raw"
    start = 2048
    with open(disk, "wb") as f:
        mbr = bytearray(512)
        struct.pack_into("<B3xB3xII", mbr, 446, 0x80, 0x83, start, fs.stat().st_size // 512)
        mbr[510:512] = b"\x55\xaa"
        f.write(mbr)
        f.seek(start * 512)
        f.write(fs.read_bytes())
    return disk


def test_partitioned_disk_newest_kernel(tmp_path: Path) -> None:
    disk = make_partitioned(tmp_path)
    q = qcow2.convert(disk, tmp_path / "disk.qcow2", src_format="raw")
    parts = find_partitions(disk.read_bytes()[: 34 * 512])
    assert parts[0].offset == 2048 * 512
    kernel, initrd, cmdline = extract_kernel(q, "qcow2", tmp_path / "out")
    assert kernel.read_bytes() == b"kernel 6.1.0-2" and initrd.read_bytes() == b"initrd 6.1.0-2"
    assert cmdline.startswith("root=UUID=")


@pytest.mark.vm
def test_debian_image_kernel_matches_the_build(debian_image: str, vm_data: DataDir,
                                               tmp_path: Path) -> None:
    m = VmManager(vm_data)
    try:
        built = m.library.resolve(debian_image)
        bare = import_disk(m.library, built.path("disk"), "bare-debian",  # type: ignore[arg-type]
                           source="test")
        assert bare.path("kernel") is None
        img = attach_kernel(m.library, bare, tmp_path / "k")
        assert img.files["kernel"] == built.files["kernel"]
        assert img.files["initrd"] == built.files["initrd"]
        assert img.cmdline and "root=UUID=" in img.cmdline
        kernel = img.path("kernel")
        assert kernel is not None
        assert hashlib.sha256(kernel.read_bytes()).hexdigest() == built.files["kernel"]
        m.library.remove(img.ref)
    finally:
        m.close()
