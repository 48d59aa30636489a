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
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..errors import ImageError

__all__ = ["create_raw_copy", "FICLONE"]

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
        if head == b"QFI\xfb":
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
