"""Disk images: overlays (written directly), and qemu-img for blank disks, info, convert.

A backing image is only ever opened read-only: overlays name it with an explicit backing
format, so QEMU never probes (or writes) it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import run
from ..errors import ImageError
from ..fsutil import atomic_path

__all__ = ["ImageInfo", "image_info", "create_overlay", "create_blank", "convert", "GIB",
           "set_backing_name",
           "probe_format", "overlay_bytes"]

GIB = 1024 ** 3


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    backing_format: str | None
    chain: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "virtual_size": self.virtual_size,
                "actual_size": self.actual_size, "backing_file": self.backing_file,
                "backing_format": self.backing_format, "chain": list(self.chain)}


def _qemu_img() -> str:
    return run.require_binary("qemu-img", "qemu-utils")


def image_info(path: str | Path) -> ImageInfo:
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    res = run.run([_qemu_img(), "info", "--backing-chain", "--output=json", "-U", str(path)],
                  what="qemu-img info")
    data = json.loads(res.stdout)
    chain = data if isinstance(data, list) else [data]
    top = chain[0]
    return ImageInfo(
        path=str(path), format=top["format"], virtual_size=int(top["virtual-size"]),
        actual_size=int(top.get("actual-size", 0)),
        backing_file=top.get("full-backing-filename") or top.get("backing-filename"),
        backing_format=top.get("backing-filename-format"),
        chain=tuple(c["filename"] for c in chain),
    )


_QCOW2_MAGIC = b"QFI\xfb"
_CLUSTER_BITS = 16
_EXT_BACKING_FORMAT = 0xE2792ACA


def probe_format(path: str | Path) -> tuple[str, int]:
    """(format, virtual size) of a qcow2 or raw file, read from its header."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head[:4] == _QCOW2_MAGIC:
            return "qcow2", struct.unpack(">Q", head[24:32])[0]
        f.seek(0, os.SEEK_END)
        return "raw", f.tell()


def overlay_bytes(backing: str, backing_format: str, size: int) -> tuple[bytes, int]:
    """Header cluster and total file length of an empty qcow2 v3 overlay.

    The layout is the one qemu-img makes for a new image: header and backing name in
    cluster 0, the refcount table in cluster 1, one refcount block in cluster 2, the L1
    table from cluster 3. Everything after the header cluster is zero except two words.
    """
    cluster = 1 << _CLUSTER_BITS
    l2_entries = cluster // 8
    l1_size = max(1, -(-size // (cluster * l2_entries)))
    l1_clusters = -(-l1_size * 8 // cluster)
    total_clusters = 3 + l1_clusters
    fmt = backing_format.encode()
    ext = struct.pack(">II", _EXT_BACKING_FORMAT, len(fmt)) + fmt
    ext += b"\0" * (-len(ext) % 8) + struct.pack(">II", 0, 0)
    name = backing.encode()
    header_len = 104
    backing_off = header_len + len(ext)
    if backing_off + len(name) > cluster:
        raise ImageError(f"backing file path too long: {backing}")
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII", _QCOW2_MAGIC, 3, backing_off, len(name), _CLUSTER_BITS,
        size, 0, l1_size, 3 * cluster, cluster, 1, 0, 0, 0, 0, 0, 4, header_len)
    assert len(header) == header_len
    return header + ext + name, total_clusters * cluster


def create_overlay(backing: str | Path, path: str | Path, size_bytes: int | None = None,
                   backing_format: str | None = None) -> Path:
    """A thin qcow2 overlay on ``backing``, grown to ``size_bytes`` if that is larger.

    Written directly (no qemu-img process): the backing image is only read for its format
    and size, and the overlay names the backing format so QEMU never probes it.
    """
    backing = Path(backing).resolve()
    path = Path(path)
    if not backing.is_file():
        raise ImageError(f"backing image not found: {backing}")
    probed, vsize = probe_format(backing)
    fmt = backing_format or probed
    size = max(size_bytes or 0, vsize)
    size += -size % 512
    head, length = overlay_bytes(str(backing), fmt, size)
    cluster = 1 << _CLUSTER_BITS
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.pwrite(fd, head, 0)
        os.pwrite(fd, struct.pack(">Q", 2 * cluster), cluster)  # refcount table -> block
        os.pwrite(fd, struct.pack(">HHHH", 1, 1, 1, 1), 2 * cluster)  # clusters 0-3 in use
        if length > 4 * cluster:  # a very large disk: more L1 clusters, all referenced
            n = length // cluster
            os.pwrite(fd, struct.pack(f">{n}H", *([1] * n)), 2 * cluster)
        os.ftruncate(fd, length)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def create_blank(path: str | Path, size_bytes: int, fmt: str = "qcow2") -> Path:
    run.run([_qemu_img(), "create", "-q", "-f", fmt, str(path), str(size_bytes)],
            what="qemu-img create")
    return Path(path)


def convert(src: str | Path, dst: str | Path, *, fmt: str = "qcow2", compress: bool = False,
            src_format: str | None = None) -> Path:
    """Flatten ``src`` (and its backing chain) into a standalone image, atomically."""
    dst = Path(dst)
    argv = [_qemu_img(), "convert", "-O", fmt]
    if src_format:
        argv += ["-f", src_format]
    if compress:
        argv.append("-c")
    with atomic_path(dst) as tmp:
        run.run(argv + [str(src), str(tmp)], what="qemu-img convert")
    return dst


def set_backing_name(path: Path, backing: str) -> None:
    """Name ``backing`` as the backing file in a qcow2 image's header, in place. The name
    lives in the header cluster (as vmforge's overlays lay it out, and qemu-img's); a longer
    one must still fit there."""
    name = backing.encode()
    with open(path, "r+b") as f:
        head = f.read(24)
        if head[:4] != b"QFI\xfb":
            raise ImageError(f"{path} is not a qcow2 image")
        off, size, cluster_bits = struct.unpack(">QII", head[8:24])
        if not off:
            raise ImageError(f"{path} has no backing file to rename")
        if off + max(len(name), size) > 1 << cluster_bits:
            raise ImageError(f"{path}: the backing file name {backing} does not fit its header")
        f.seek(off)
        f.write(name + b"\0" * max(0, size - len(name)))
        f.seek(16)
        f.write(struct.pack(">I", len(name)))
        f.flush()
        os.fsync(f.fileno())
