"""Per-VM raw disks (Firecracker): a private copy of a raw image that keeps its holes, grows
on request, uses a reflink where the filesystem has them, and leaves nothing on failure."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vmforge.errors import ImageError
from vmforge.images import rawcopy
from vmforge.images.rawcopy import create_raw_copy

MIB = 1 << 20


def sparse_image(path: Path, size: int = 64 * MIB) -> dict[int, bytes]:
    """A file of ``size`` bytes, mostly holes, with data at a few offsets."""
    chunks = {0: b"boot sector" + bytes(500) + b"\x55\xaa",
              size // 8: os.urandom(3 * MIB + 7), size * 5 // 8 + 4096: b"tail data"}
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
    return chunks


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_copy_is_identical_and_sparse(tmp_path: Path) -> None:
    src, dst = tmp_path / "root.raw", tmp_path / "vm" / "disk-root.raw"
    dst.parent.mkdir()
    sparse_image(src)
    how = create_raw_copy(src, dst)
    assert how in ("reflink", "sparse")
    assert dst.read_bytes() == src.read_bytes()
    assert allocated(dst) < 8 * MIB  # 3 MiB of data in a 64 MiB file: holes stayed holes
    assert dst.stat().st_mode & 0o777 == 0o600
    dst.write_bytes(b"guest writes")  # private: the source is untouched
    assert src.read_bytes()[:11] == b"boot sector"


def test_copy_grows_to_the_requested_size_and_never_shrinks(tmp_path: Path) -> None:
    src = tmp_path / "root.raw"
    sparse_image(src, 16 * MIB)
    grown = tmp_path / "grown.raw"
    create_raw_copy(src, grown, 1 << 30)
    assert grown.stat().st_size == 1 << 30 and allocated(grown) < 8 * MIB
    with open(grown, "rb") as f:
        assert f.read(11) == b"boot sector"
    same = tmp_path / "same.raw"
    create_raw_copy(src, same, MIB)
    assert same.stat().st_size == 16 * MIB


def test_without_copy_file_range_or_seek_data_zero_blocks_stay_holes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort (an old kernel, a filesystem pair that refuses copy_file_range and
    SEEK_DATA): read/write, skipping all-zero blocks."""
    def refuse(*_a: object, **_k: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")
    real_lseek = os.lseek

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "unsupported")
        return real_lseek(fd, pos, how)
    monkeypatch.setattr(rawcopy.os, "copy_file_range", refuse)
    monkeypatch.setattr(rawcopy.os, "lseek", no_seek_data)
    monkeypatch.setattr(rawcopy, "_reflink", lambda _s, _d: False)
    src, dst = tmp_path / "root.raw", tmp_path / "copy.raw"
    sparse_image(src)
    assert create_raw_copy(src, dst) == "sparse"
    assert dst.read_bytes() == src.read_bytes()
    assert allocated(dst) < 8 * MIB


def test_reflink_is_tried_first_and_its_refusal_is_not_an_error(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"x" * 4096)
    with open(src, "rb") as s, open(dst, "wb") as d:
        # ext4 and tmpfs refuse FICLONE (EOPNOTSUPP/EXDEV/EINVAL); btrfs/XFS accept it.
        assert rawcopy._reflink(s.fileno(), d.fileno()) in (True, False)


def test_refusals_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qcow = tmp_path / "img.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(508))
    with pytest.raises(ImageError, match="qcow2 image; a raw copy needs a raw source"):
        create_raw_copy(qcow, tmp_path / "out.raw")
    with pytest.raises(ImageError, match="not found"):
        create_raw_copy(tmp_path / "missing.raw", tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()

    src = tmp_path / "root.raw"
    sparse_image(src, 8 * MIB)

    def fail(*_a: object, **_k: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rawcopy, "_reflink", lambda _s, _d: False)
    monkeypatch.setattr(rawcopy.os, "copy_file_range", fail)
    with pytest.raises(OSError, match="No space left"):
        create_raw_copy(src, tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").exists()
    existing = tmp_path / "taken.raw"
    existing.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        create_raw_copy(src, existing)
    assert existing.read_bytes() == b"mine"
