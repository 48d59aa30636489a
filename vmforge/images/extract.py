"""Take the kernel and initrd out of a disk image at rest, for direct kernel boot.

No mounting and no booting: partitions are read from the MBR or GPT, each ext2/3/4 file
system is sliced out with ``qemu-img convert --image-opts driver=raw,offset=...`` and read
with ``debugfs``. The root is named by file-system UUID in the suggested command line.
"""

from __future__ import annotations

import json
import re
import struct
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import run
from ..errors import ImageError
from .library import Image, Library

__all__ = ["Partition", "find_partitions", "ext_filesystems", "list_dir", "read_file",
           "extract_kernel", "attach_kernel"]

SECTOR = 512


@dataclass(frozen=True)
class Partition:
    offset: int
    size: int | None  # None: to the end of the disk


def _read(disk: Path, fmt: str, offset: int, length: int) -> bytes:
    """Read bytes from any image format through qemu-img (handles qcow2 chains)."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "chunk"
        opts = (f"driver=raw,offset={offset},size={length},file.driver={fmt},"
                f"file.file.filename={disk}")
        run.run(["qemu-img", "convert", "-q", "-O", "raw", "--image-opts", opts, str(out)],
                what="qemu-img convert (read)")
        return out.read_bytes()


def find_partitions(head: bytes) -> list[Partition]:
    """Partitions from the first 34 sectors (MBR, or GPT behind a protective MBR)."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return [Partition(0, None)]
    entries = [struct.unpack_from("<B3xB3xII", head, 446 + 16 * i) for i in range(4)]
    if any(e[1] == 0xEE for e in entries) and head[SECTOR:SECTOR + 8] == b"EFI PART":
        lba, count, size = struct.unpack_from("<QII", head, SECTOR + 72)
        parts = []
        for i in range(min(count, 128)):
            off = lba * SECTOR + i * size
            if off + size > len(head):
                break
            first, last = struct.unpack_from("<QQ", head, off + 32)
            if head[off:off + 16] != b"\0" * 16:
                parts.append(Partition(first * SECTOR, (last - first + 1) * SECTOR))
        return parts
    return [Partition(e[2] * SECTOR, e[3] * SECTOR) for e in entries if e[1] and e[3]]


def _ext_uuid(sb: bytes) -> str | None:
    if len(sb) >= 2048 and struct.unpack_from("<H", sb, 1024 + 56)[0] == 0xEF53:
        return str(uuid.UUID(bytes=sb[1024 + 104:1024 + 120]))
    return None


def _version_key(name: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", name)]


@contextmanager
def ext_filesystems(disk: Path, fmt: str) -> Iterator[list[tuple[str, Path]]]:
    """(uuid, raw file system file) for each ext2/3/4 file system in the image."""
    run.require_binary("debugfs", "e2fsprogs")
    head = _read(disk, fmt, 0, 34 * SECTOR)
    size = json.loads(run.run(["qemu-img", "info", "--output=json", "-U", str(disk)]).stdout
                      )["virtual-size"]
    with tempfile.TemporaryDirectory() as td:
        found = []
        for i, part in enumerate(find_partitions(head)):
            fs_uuid = _ext_uuid(_read(disk, fmt, part.offset, 2048))
            if fs_uuid is None:
                continue
            fs = Path(td) / f"fs{i}.raw"
            length = part.size or size - part.offset
            opts = (f"driver=raw,offset={part.offset},size={length},file.driver={fmt},"
                    f"file.file.filename={disk}")
            run.run(["qemu-img", "convert", "-q", "-O", "raw", "--image-opts", opts, str(fs)],
                    what="qemu-img convert (slice)", timeout=1800)
            found.append((fs_uuid, fs))
        yield found


def list_dir(fs: Path, path: str) -> list[str]:
    listing = run.run(["debugfs", "-R", f"ls -p {path}", str(fs)], check=False).text
    return [f.split("/")[5] for f in listing.splitlines() if f.count("/") >= 6]


def read_file(fs: Path, path: str) -> bytes | None:
    res = run.run(["debugfs", "-R", f"cat {path}", str(fs)], check=False)
    names = list_dir(fs, str(Path(path).parent))
    return res.stdout if Path(path).name in names else None


def extract_kernel(disk: Path, fmt: str, dest: Path) -> tuple[Path, Path, str]:
    """(kernel, initrd, cmdline) found in the image's ext file systems."""
    root_uuid = None
    found: tuple[Path, Path] | None = None
    with ext_filesystems(disk, fmt) as filesystems:
        for fs_uuid, fs in filesystems:
            for bootdir in ("/boot", "/"):
                names = list_dir(fs, bootdir)
                kernels = sorted((n for n in names if n.startswith("vmlinuz-")),
                                 key=_version_key)
                for k in reversed(kernels):
                    initrd = f"initrd.img-{k.removeprefix('vmlinuz-')}"
                    if initrd in names and found is None:
                        dest.mkdir(parents=True, exist_ok=True)
                        kpath, ipath = dest / "vmlinuz", dest / "initrd.img"
                        for src, out in ((k, kpath), (initrd, ipath)):
                            run.run(["debugfs", "-R",
                                     f"dump {bootdir.rstrip('/')}/{src} {out}", str(fs)])
                        found = (kpath, ipath)
            if "etc" in list_dir(fs, "/"):
                root_uuid = root_uuid or fs_uuid
    if found is None:
        raise ImageError(f"{disk.name}: no /boot/vmlinuz-* with a matching initrd found",
                         hint="the image needs an ext2/3/4 file system holding its kernel")
    root = f"root=UUID={root_uuid}" if root_uuid else "root=/dev/vda1"
    return found[0], found[1], f"{root} ro console=ttyS0"


def attach_kernel(library: Library, image: Image, workdir: Path) -> Image:
    """Store the image's own kernel and initrd beside it (for direct kernel boot)."""
    disk = image.path("disk")
    if disk is None:
        raise ImageError(f"{image.ref} has no disk")
    kernel, initrd, cmdline = extract_kernel(disk, image.format or "qcow2", workdir)
    return library.attach(image, {"kernel": kernel, "initrd": initrd}, cmdline=cmdline)
