"""Per-VM raw disks: a private, writable copy of a raw image, made as cheaply as the filesystem
allows (Firecracker boots raw block devices only, so it cannot use qcow2 overlays).

In order of preference:

1. **reflink** (``FICLONE``): btrfs, XFS with reflink, bcachefs, overlayfs on those. Instant,
   shares every block until the guest writes it.
2. **sparse copy**: only the source's data extents (``SEEK_DATA``/``SEEK_HOLE``) are copied,
   each with ``os.copy_file_range`` (an in-kernel copy that some filesystems turn into a
   reflink or a server-side copy), else read/write skipping all-zero blocks. Holes stay holes.

The copy can be grown (``size_bytes``): the tail is a hole, and the guest grows its
filesystem into it (cloud-init's ``resize_rootfs``, ``resize2fs``).

A qcow2 source is converted first (``create_raw_disk``): a library image once, into a cache
beside the library's blobs keyed by the blob's sha256 (the blob never changes, so neither does
its conversion), then copied as above for every VM; a user's own qcow2 file straight into the
VM's disk (it may change between two VMs).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..errors import ImageError

__all__ = ["create_raw_copy", "create_raw_disk", "raw_conversion", "flatten_to_raw",
           "raw_image_of", "FICLONE", "QCOW2_MAGIC"]

QCOW2_MAGIC = b"QFI\xfb"

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_CHUNK = 1 << 20
# Errors that mean "this filesystem (pair) cannot do it", so the next method is tried.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                errno.EBADF, errno.ETXTBSY, errno.EPERM}


def _reflink(src_fd: int, dst_fd: int) -> bool:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data regions; the whole file where SEEK_DATA is unsupported."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size) - start))
            pos = end
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        return [(0, size)] if size else []
    return out


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int, kernel: list[bool]) -> None:
    """Copy one extent. ``kernel[0]``: copy_file_range still worth trying (cleared on the first
    refusal so a filesystem that cannot is not asked again for every extent)."""
    end = offset + length
    pos = offset
    while pos < end and kernel[0]:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(end - pos, 1 << 30), pos, pos)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            kernel[0] = False
            break
        if n == 0:
            raise ImageError("the source image shrank while it was being copied")
        pos += n
    while pos < end:
        data = os.pread(src_fd, min(_CHUNK, end - pos), pos)
        if not data:
            raise ImageError("the source image shrank while it was being copied")
        if data.count(0) != len(data):  # all-zero blocks stay holes
            view = memoryview(data)
            written = 0
            while written < len(data):
                written += os.pwrite(dst_fd, view[written:], pos + written)
        pos += len(data)


def create_raw_copy(src: str | Path, dst: str | Path, size_bytes: int | None = None) -> str:
    """Make ``dst`` (new, owner-only) a private copy of the raw image ``src``, grown to
    ``size_bytes`` if that is larger. Returns how: ``"reflink"`` or ``"sparse"``.

    ``src`` must be raw (a qcow2 image needs converting first: ``qemu-img convert -O raw``).
    On failure ``dst`` does not exist.
    """
    src, dst = Path(src), Path(dst)
    try:
        src_fd = os.open(src, os.O_RDONLY)
    except FileNotFoundError:
        raise ImageError(f"source image not found: {src}") from None
    try:
        head = os.pread(src_fd, 4, 0)
        if head == QCOW2_MAGIC:
            raise ImageError(f"{src} is a qcow2 image; a raw copy needs a raw source",
                             hint="convert it first: qemu-img convert -O raw SRC DST")
        size = os.fstat(src_fd).st_size
        target = max(size, size_bytes or 0)
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if _reflink(src_fd, dst_fd):
                how = "reflink"
            else:
                how = "sparse"
                kernel = [True]
                for offset, length in _extents(src_fd, size):
                    _copy_range(src_fd, dst_fd, offset, length, kernel)
            os.ftruncate(dst_fd, target)  # trailing holes and the grown tail
        except BaseException:
            os.close(dst_fd)
            dst.unlink(missing_ok=True)
            raise
        os.close(dst_fd)
        return how
    finally:
        os.close(src_fd)


def raw_conversion(blob: str | Path, digest: str, cache_dir: str | Path) -> Path:
    """The raw conversion of the qcow2 library blob ``blob`` (content ``digest``), made once
    (``qemu-img convert``, sparse output) into ``cache_dir/<digest>.raw`` and reused after.
    The file appears whole or not at all (written aside, then renamed)."""
    from ..fsutil import atomic_path
    from . import qcow2
    cache = Path(cache_dir)
    out = cache / f"{digest}.raw"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_path(out) as tmp:
        qcow2.convert(blob, tmp, fmt="raw", src_format="qcow2")
        os.chmod(tmp, 0o400)  # read-only, as the blob it comes from
    return out


def create_raw_disk(src: str | Path, dst: str | Path, size_bytes: int | None = None, *,
                    cache: tuple[str, Path] | None = None) -> str:
    """Make ``dst`` a private raw disk with the content of ``src`` (raw or qcow2, a backing
    chain included), grown to ``size_bytes``. ``cache``: (sha256, cache directory) when
    ``src`` is a library blob, so a qcow2 one is converted only once. Returns how:
    ``"reflink"``, ``"sparse"`` (a raw source, or a cached conversion), ``"converted"``."""
    src, dst = Path(src), Path(dst)
    try:
        with open(src, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ImageError(f"source image not found: {src}") from None
    if head != QCOW2_MAGIC:
        return create_raw_copy(src, dst, size_bytes)
    if cache is not None:
        return create_raw_copy(raw_conversion(src, cache[0], cache[1]), dst, size_bytes)
    from . import qcow2
    qcow2.convert(src, dst, fmt="raw", src_format="qcow2")
    try:
        os.chmod(dst, 0o600)
        if size_bytes and size_bytes > dst.stat().st_size:
            os.truncate(dst, size_bytes)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return "converted"


def _overlay_facts(path: Path) -> tuple[int, Path | None, bool]:
    """(virtual size, backing file, has data of its own) of a qcow2 image."""
    import struct
    with open(path, "rb") as f:
        head = f.read(48)
        vsize = struct.unpack(">Q", head[24:32])[0]
        off, size = struct.unpack(">QI", head[8:20])
        backing = None
        if off:
            f.seek(off)
            name = f.read(size).decode()
            backing = Path(name) if Path(name).is_absolute() else path.parent / name
        l1_size, l1_off = struct.unpack(">IQ", head[36:48])
        f.seek(l1_off)
        own = any(f.read(l1_size * 8))
    return vsize, backing, own


def raw_image_of(path: str | Path, dst: str | Path) -> str:
    """Write ``dst`` (new) as a raw image with the content of the qcow2 image ``path``: an
    overlay with no data of its own over a raw image is a copy of that image (reflink or
    sparse, grown to the overlay's size); any other qcow2 image is converted (``qemu-img
    convert``). Returns how. On failure ``dst`` does not exist."""
    path, dst = Path(path), Path(dst)
    vsize, backing, own = _overlay_facts(path)
    raw_backing = False
    if backing is not None and not own:
        try:
            with open(backing, "rb") as f:
                raw_backing = f.read(4) != QCOW2_MAGIC
        except FileNotFoundError:
            raise ImageError(f"{path}: its backing file {backing} is missing") from None
    if raw_backing:
        assert backing is not None
        return create_raw_copy(backing, dst, vsize)
    from . import qcow2
    try:
        qcow2.convert(path, dst, fmt="raw")
        os.chmod(dst, 0o600)
        if vsize > dst.stat().st_size:
            os.truncate(dst, vsize)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return "converted"


def flatten_to_raw(path: str | Path) -> str | None:
    """Make a per-VM disk raw again where it is a qcow2 file (for a VMM that reads raw only,
    Firecracker: vmforge's snapshots and restores put a thin qcow2 overlay over a raw layer),
    with ``raw_image_of``; the file is replaced in one rename. Returns how, or None when it
    was raw already."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != QCOW2_MAGIC:
            return None
    tmp = path.with_name(f".{path.name}.raw-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        how = raw_image_of(path, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return how
