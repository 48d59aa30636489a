"""Check a disk image from its header before a VM is built on it (no process, no qemu-img).

A truncated or corrupt qcow2, a text file, or an image in a format vmforge does not pass to
QEMU would otherwise get as far as the hypervisor and fail there with a message that names
no field. :func:`check_disk_image` reads the header (and ``stat``) only, so it is cheap
enough for every ``create``. The qcow2 checks follow QEMU's own when it opens an image
(``block/qcow2.c``: version, cluster size, L1 and refcount table placement, backing file
name, incompatible feature bits), and then every L1 and L2 entry must point inside the
file, which is what finds a qcow2 cut short by an interrupted copy or download (the header
of such a file is intact). See docs/interop/qcow2.txt in QEMU for the layout.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import BinaryIO

from ..errors import SpecError

__all__ = ["check_disk_image", "QCOW2_MAGIC"]

QCOW2_MAGIC = b"QFI\xfb"
_MIN_CLUSTER_BITS, _MAX_CLUSTER_BITS = 9, 21     # QEMU's limits (512 B .. 2 MiB)
_MAX_L1_BYTES = 32 * 1024 * 1024                 # QCOW_MAX_L1_SIZE
_MAX_BACKING_NAME = 1023
_KNOWN_INCOMPATIBLE = 0b11111  # dirty, corrupt, external data file, compression, extended L2
_CORRUPT_BIT = 1 << 1
_HEAD = 4096
_MAX_TABLE_READ = 64 * 1024 * 1024  # L1 + L2 tables read at most; past that, unchecked
_OFFSET_MASK = 0x00FFFFFFFFFFFE00   # bits 9-55: host offset of an L2 table or data cluster
_COMPRESSED = 1 << 62
_EXTERNAL_DATA_BIT = 1 << 2
_EXTENDED_L2_BIT = 1 << 4
_CONVERT = "convert it with 'qemu-img convert -O qcow2 SRC DST' and give DST"

# Formats QEMU can read but vmforge does not hand it: (magic, offset, name)
_OTHER_FORMATS = (
    (b"KDMV", 0, "VMDK"), (b"# Disk DescriptorFile", 0, "VMDK (descriptor)"),
    (b"conectix", 0, "VHD"), (b"vhdxfile", 0, "VHDX"), (b"QED\0", 0, "QED"),
    (b"\x7f\x10\xda\xbe", 64, "VDI"), (b"LUKS\xba\xbe", 0, "LUKS"),
    (b"WithoutFreeSpace", 0, "Parallels"), (b"WithouFreSpacExt", 0, "Parallels"),
)


def check_disk_image(path: str, field: str) -> str:
    """The format of the disk image at ``path``: ``"qcow2"`` or ``"raw"``.

    Raises SpecError(field=field) with a hint when the file is missing, unreadable, empty,
    text, in another format, or a qcow2 whose header is corrupt or points past the end of
    the file (truncated).
    """
    def refuse(problem: str, hint: str) -> SpecError:
        return SpecError(f"{path}: {problem}", field=field, hint=hint)

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
            raise refuse("not a regular file", "give the path of a disk image file")
        with open(path, "rb") as f:
            size = st.st_size if stat.S_ISREG(st.st_mode) else f.seek(0, os.SEEK_END)
            f.seek(0)
            head = f.read(_HEAD)
            problem = None
            if head[:4] == QCOW2_MAGIC:
                problem = _qcow2_problem(head, size) or _qcow2_tables_problem(f, head, size)
    except FileNotFoundError:
        raise refuse("not found", "check the path (relative paths are relative to the spec "
                                  "file)") from None
    except OSError as exc:
        raise refuse(f"cannot read: {exc.strerror}", "check the file's permissions") from None
    if size == 0 or not head:
        raise refuse("the file is empty", "give a disk image (qcow2 or raw)")
    if head[:4] == QCOW2_MAGIC:
        if problem:
            raise refuse(f"not a usable qcow2 image: {problem}",
                         "the file is truncated or corrupt; copy or download it again "
                         "('qemu-img check' tells more)")
        return "qcow2"
    for magic, offset, name in _OTHER_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            raise refuse(f"is a {name} image; vmforge takes qcow2 or raw", _CONVERT)
    if _looks_like_text(head):
        raise refuse("looks like a text file, not a disk image",
                     "give a qcow2 or raw disk image (is this a spec or a script?)")
    return "raw"


def _looks_like_text(head: bytes) -> bool:
    """Disk images have zeros near the start (boot sector padding, superblock gaps)."""
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a character cut at the end of the sample
    return True


def _qcow2_problem(head: bytes, size: int) -> str | None:
    if len(head) < 72:
        return f"the header is cut short ({len(head)} bytes; truncated)"
    (_, version, backing_off, backing_len, cluster_bits, vsize, crypt, l1_size, l1_off,
     rc_off, rc_clusters, nb_snap, snap_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", head)
    if version not in (2, 3):
        return f"version {version} (only 2 and 3 exist)"
    header_len = 72
    if version == 3:
        if len(head) < 104:
            return f"the version 3 header is cut short ({len(head)} bytes; truncated)"
        incompatible, = struct.unpack_from(">Q", head, 72)
        header_len, = struct.unpack_from(">I", head, 100)
        if header_len < 104 or header_len % 8:
            return f"header length {header_len} is invalid (at least 104, a multiple of 8)"
        if incompatible & _CORRUPT_BIT:
            return "it is marked corrupt (a QEMU found inconsistent metadata)"
        if incompatible & ~_KNOWN_INCOMPATIBLE:
            return f"unknown incompatible feature bits {incompatible & ~_KNOWN_INCOMPATIBLE:#x}"
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        return f"cluster_bits {cluster_bits} is out of range ({_MIN_CLUSTER_BITS}-" \
               f"{_MAX_CLUSTER_BITS})"
    cluster = 1 << cluster_bits
    if header_len > cluster:
        return f"header length {header_len} exceeds the cluster size {cluster}"
    if vsize == 0:
        return "the virtual size is 0"
    if crypt:
        return f"it is encrypted (method {crypt}); vmforge cannot pass it a key"
    if l1_size * 8 > _MAX_L1_BYTES:
        return f"the L1 table ({l1_size} entries) is larger than QEMU accepts"
    per_l1 = cluster * (cluster // 8)  # bytes of guest disk one L1 entry maps
    if l1_size < -(-vsize // per_l1):
        return f"the L1 table ({l1_size} entries) is too small for {vsize} bytes"
    if l1_size:
        if l1_off % cluster or l1_off == 0:
            return f"the L1 table offset {l1_off} is not cluster-aligned"
        if l1_off + l1_size * 8 > size:
            return (f"the L1 table ends at byte {l1_off + l1_size * 8}, past the end of the "
                    f"file ({size} bytes; truncated)")
    if rc_clusters == 0 or rc_off == 0 or rc_off % cluster:
        return f"the refcount table (offset {rc_off}, {rc_clusters} clusters) is invalid"
    if rc_off >= size:
        return f"the refcount table starts at byte {rc_off}, past the end of the file " \
               f"({size} bytes; truncated)"
    if backing_off:
        if backing_len > _MAX_BACKING_NAME:
            return f"the backing file name is {backing_len} bytes long (at most 1023)"
        end = backing_off + backing_len
        if end > cluster or end > size:
            return (f"the backing file name (bytes {backing_off}-{end}) lies outside the "
                    f"header cluster or the file (truncated?)")
        if end <= len(head):
            try:
                head[backing_off:end].decode("utf-8")
            except UnicodeDecodeError:
                return "the backing file name is not text"
    if nb_snap and (snap_off == 0 or snap_off % cluster or snap_off >= size):
        return f"the snapshot table offset {snap_off} is invalid or past the end of the file"
    return None


def _qcow2_tables_problem(f: BinaryIO, head: bytes, size: int) -> str | None:
    """Every L2 table and data cluster the image maps must start inside the file."""
    cluster_bits, = struct.unpack_from(">I", head, 20)
    l1_size, = struct.unpack_from(">I", head, 36)
    l1_off, = struct.unpack_from(">Q", head, 40)
    version, = struct.unpack_from(">I", head, 4)
    incompatible = struct.unpack_from(">Q", head, 72)[0] if version == 3 else 0
    cluster = 1 << cluster_bits
    f.seek(l1_off)
    l1 = f.read(l1_size * 8)
    budget = _MAX_TABLE_READ - len(l1)
    entry_bytes = 16 if incompatible & _EXTENDED_L2_BIT else 8
    check_data = not incompatible & _EXTERNAL_DATA_BIT
    # compressed cluster descriptors keep their host offset in the low 62-(cluster_bits-8) bits
    compressed_mask = (1 << (62 - (cluster_bits - 8))) - 1
    for i, (entry,) in enumerate(struct.iter_unpack(">Q", l1)):
        l2_off = entry & _OFFSET_MASK
        if not l2_off:
            continue
        if l2_off % cluster or l2_off + cluster > size:
            return (f"L1 entry {i} points to an L2 table at byte {l2_off}, outside the file "
                    f"({size} bytes; truncated?)")
        if not check_data or budget < cluster:
            continue
        budget -= cluster
        f.seek(l2_off)
        l2 = f.read(cluster)
        for j in range(0, len(l2), entry_bytes):
            e, = struct.unpack_from(">Q", l2, j)
            host = e & compressed_mask if e & _COMPRESSED else e & _OFFSET_MASK
            if host and host >= size:
                return (f"guest data (L2 table {i}, entry {j // entry_bytes}) is mapped to "
                        f"byte {host}, past the end of the file ({size} bytes; truncated)")
    return None
