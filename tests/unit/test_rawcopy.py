"""Per-VM raw disks (Firecracker): a private copy of a raw image that keeps its holes, grows
on request, uses a reflink where the filesystem has them, and leaves nothing on failure."""

from __future__ import annotations

import asyncio
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


# ---------------------------------------------------------------- qcow2 sources, and create

def qcow2_of(raw: Path, out: Path) -> Path:
    from vmforge import run
    run.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
            what="qemu-img convert")
    return out


@pytest.mark.subprocess
def test_a_qcow2_library_blob_is_converted_once(tmp_path: Path) -> None:
    raw = tmp_path / "root.raw"
    sparse_image(raw, 16 * MIB)
    blob = qcow2_of(raw, tmp_path / "blob")
    cache = tmp_path / "raw-cache"
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    assert rawcopy.create_raw_disk(blob, a, 32 * MIB, cache=("d1g35t", cache)) in (
        "reflink", "sparse")
    converted = cache / "d1g35t.raw"
    first = converted.stat()
    assert converted.read_bytes() == raw.read_bytes() and first.st_mode & 0o777 == 0o400
    rawcopy.create_raw_disk(blob, b, None, cache=("d1g35t", cache))
    again = converted.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # reused
    assert a.read_bytes()[:16 * MIB] == raw.read_bytes() and a.stat().st_size == 32 * MIB
    assert b.read_bytes() == raw.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["d1g35t.raw"]  # no temporary left


@pytest.mark.subprocess
def test_a_user_qcow2_file_is_converted_into_the_vm_disk(tmp_path: Path) -> None:
    raw = tmp_path / "root.raw"
    sparse_image(raw, 8 * MIB)
    mine = qcow2_of(raw, tmp_path / "mine.qcow2")
    dst = tmp_path / "disk.raw"
    assert rawcopy.create_raw_disk(mine, dst, 16 * MIB) == "converted"
    assert dst.read_bytes()[:8 * MIB] == raw.read_bytes() and dst.stat().st_size == 16 * MIB
    assert dst.stat().st_mode & 0o777 == 0o600
    raw_dst = tmp_path / "copy.raw"
    assert rawcopy.create_raw_disk(raw, raw_dst) in ("reflink", "sparse")  # raw: a copy
    with pytest.raises(ImageError, match="not found"):
        rawcopy.create_raw_disk(tmp_path / "gone.qcow2", tmp_path / "x.raw")


def test_a_qcow2_overlay_whose_backing_file_is_gone_is_refused_for_firecracker(
        tmp_path: Path) -> None:
    from vmforge.errors import SpecError
    from vmforge.hypervisors.firecracker.driver import FirecrackerDriver
    from vmforge.images import qcow2
    from vmforge.node import plan as planmod
    from vmforge.spec import parse_request
    base = tmp_path / "base.raw"
    sparse_image(base, MIB)
    overlay = qcow2.create_overlay(base, tmp_path / "overlay.qcow2")
    req = parse_request({"name": "vm1", "spec": {
        "hypervisor": "firecracker", "machine": "microvm", "kernel": {"kernel": "/k"},
        "disks": [{"id": "root", "backing_file": str(overlay)}]}})
    caps = FirecrackerDriver().capabilities()
    planmod.check_capabilities(req, caps)  # a chain that is all there converts
    base.unlink()
    with pytest.raises(SpecError, match=r"^spec\.disks\[0\]\.backing_file: firecracker boots "
                                        r"raw disks only, so vmforge makes a raw copy of .*"
                                        r"overlay\.qcow2; but it is a qcow2 overlay whose "
                                        r"backing file .*base\.raw is missing\n  hint: give a "
                                        r"standalone image"):
        planmod.check_capabilities(req, caps)


@pytest.mark.subprocess
def test_firecracker_create_makes_raw_copies_of_library_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the manager: a qcow2 library image becomes a raw per-VM disk (converted once
    for both VMs), a raw one a copy; the plan says raw; QEMU still gets overlays."""
    from vmforge.hypervisors.base import Accel
    from vmforge.images.probe import check_disk_image
    from vmforge.node.manager import VmManager
    from vmforge.paths import DataDir
    from vmforge.spec import parse_request

    from ..fakes import fake_host
    # KVM does not work here; create refuses KVM-only backends without it. The copies are
    # what is tested, not the accelerator: this manager believes KVM works.
    monkeypatch.setattr(VmManager, "accel_for", lambda self, req, host=None:
                        (Accel.KVM, "test: KVM assumed"))
    m = VmManager(DataDir(tmp_path / "data"), host=fake_host())
    raw = tmp_path / "root.raw"
    sparse_image(raw, 16 * MIB)
    k = tmp_path / "vmlinux"
    k.write_bytes(b"kernel")
    m.library.add("rootq", {"disk": qcow2_of(raw, tmp_path / "root.qcow2"), "vmlinux": k,
                            "kernel": k}, kind="disk", format="qcow2")
    m.library.add("rootr", {"disk": raw, "vmlinux": k, "kernel": k}, kind="disk",
                  format="raw")

    def spec(image: str, backend: str = "firecracker") -> dict[str, object]:
        return {"hypervisor": backend, "machine": "microvm", "agent": {"enabled": False},
                "disks": [{"id": "root", "image": image, "bootable": True, "size_gib": 0.03125}]}
    for name, image in (("fq1", "rootq"), ("fq2", "rootq"), ("fr1", "rootr")):
        req = parse_request({"name": name, "spec": spec(image)})
        rec = m.create(req)
        disk = rec.paths.disk("root")
        assert check_disk_image(str(disk), "d") == "raw"
        assert disk.read_bytes()[:16 * MIB] == raw.read_bytes()
        assert disk.stat().st_size == 32 * MIB  # grown to size_gib
        assert m.plan(parse_request({"name": name + "x", "spec": spec(image)}))[
            "requests"][3]["body"]["path_on_host"].endswith("disk-root.qcow2")
    cache = m.data.images / "raw-cache"
    assert len(list(cache.iterdir())) == 1  # one conversion, for two VMs
    q = m.create(parse_request({"name": "q1", "spec": {**spec("rootq", "qemu"),
                                                        "machine": "q35"}}))
    assert check_disk_image(str(q.paths.disk("root")), "d") == "qcow2"
    assert cache == m.library.raw_cache
    # the conversion goes with the last image of its blob (and a dead conversion's leftover)
    (cache / ".stale.raw.tmp1").write_bytes(b"x")
    os.utime(cache / ".stale.raw.tmp1", (0, 0))
    for name in ("fq1", "fq2", "fr1", "q1"):
        asyncio.run(m.delete(name, force=True))
    m.library.remove("rootr")
    assert len(list(cache.iterdir())) == 1
    m.library.remove("rootq")
    assert list(cache.iterdir()) == []
    m.close()
