"""Backing files are checked from their header at create (issue 14 §5): no process needed."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmforge.errors import SpecError
from vmforge.images.probe import check_disk_image
from vmforge.images.qcow2 import create_overlay

FIELD = "spec.disks[0].backing_file"
MIB = 2 ** 20


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    p = tmp_path / "base.raw"
    with open(p, "wb") as f:
        f.write(b"\xeb\x63\x90" + b"\0" * 507 + b"\x55\xaa")  # a boot sector, then zeros
        f.truncate(8 * MIB)
    return p


@pytest.fixture
def qcow2(tmp_path: Path, raw: Path) -> Path:
    return create_overlay(raw, tmp_path / "disk.qcow2", 16 * MIB)


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(SpecError) as exc:
        check_disk_image(str(path), FIELD)
    assert exc.value.field == FIELD
    msg = str(exc.value)
    assert exc.value.hint, msg
    for w in words:
        assert w in msg, msg
    return msg


def _copy(src: Path, dst: Path, data: bytes | None = None, size: int | None = None) -> Path:
    content = src.read_bytes() if data is None else data
    dst.write_bytes(content[:size] if size is not None else content)
    return dst


def test_valid_images(raw: Path, qcow2: Path) -> None:
    assert check_disk_image(str(qcow2), FIELD) == "qcow2"
    assert check_disk_image(str(raw), FIELD) == "raw"


def test_missing_and_empty_files(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.qcow2", "not found")
    (tmp_path / "empty.img").write_bytes(b"")
    _refused(tmp_path / "empty.img", "empty")
    (tmp_path / "dir.img").mkdir()
    _refused(tmp_path / "dir.img", "not a regular file")


def test_text_files_are_not_disk_images(tmp_path: Path) -> None:
    spec = tmp_path / "vm.yaml"
    spec.write_text("name: a\nspec:\n  cpu_cores: 1\n" * 200)
    _refused(spec, "text")
    small = tmp_path / "notes.txt"
    small.write_text("hello\n")
    _refused(small, "text")


@pytest.mark.parametrize("keep", [3, 48, 100, 200, 65536, 3 * 65536, 3 * 65536 + 4])
def test_truncated_qcow2_is_refused(qcow2: Path, tmp_path: Path, keep: int) -> None:
    bad = _copy(qcow2, tmp_path / "trunc.qcow2", size=keep)
    _refused(bad, "qcow2")


def _patched(qcow2: Path, tmp_path: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(qcow2.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    return _copy(qcow2, tmp_path / "bad.qcow2", bytes(data))


@pytest.mark.parametrize("offset,fmt,value,words", [
    (4, ">I", 7, "version 7"),                          # version
    (20, ">I", 5, "cluster"),                           # cluster_bits too small
    (20, ">I", 30, "cluster"),                          # cluster_bits too large
    (24, ">Q", 0, "size"),                              # virtual size 0
    (32, ">I", 1, "encrypted"),                         # crypt_method
    (36, ">I", 2 ** 30, "L1"),                          # l1_size absurd
    (40, ">Q", 10 * 65536, "L1"),                       # L1 table beyond the end
    (40, ">Q", 65536 + 3, "L1"),                        # L1 table not cluster aligned
    (8, ">Q", 10 * 2 ** 20, "backing file name"),       # backing name beyond the end
    (16, ">I", 5000, "backing file name"),              # backing name absurdly long
    (72, ">Q", 2, "corrupt"),                           # incompatible bit 1: corrupt
    (72, ">Q", 1 << 40, "incompatible"),                # unknown incompatible feature
    (100, ">I", 50, "header"),                          # header_length too small for v3
])
def test_corrupt_qcow2_headers_are_refused(qcow2: Path, tmp_path: Path, offset: int, fmt: str,
                                           value: int, words: str) -> None:
    _refused(_patched(qcow2, tmp_path, offset, fmt, value), words)


def test_qcow2_v2_header_is_accepted(tmp_path: Path) -> None:
    cluster = 65536
    header = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 2, 0, 0, 16, 20 * MIB, 0, 1,
                         3 * cluster, cluster, 1, 0, 0)
    p = tmp_path / "v2.qcow2"
    p.write_bytes(header.ljust(4 * cluster, b"\0"))
    assert check_disk_image(str(p), FIELD) == "qcow2"


@pytest.mark.parametrize("magic,name", [
    (b"KDMV", "VMDK"), (b"conectix", "VHD"), (b"vhdxfile", "VHDX"), (b"QED\0", "QED"),
    (b"LUKS\xba\xbe", "LUKS"),
])
def test_other_formats_are_named(tmp_path: Path, magic: bytes, name: str) -> None:
    p = tmp_path / "disk.img"
    p.write_bytes(magic.ljust(MIB, b"\0"))
    _refused(p, name, "qemu-img convert")


def test_no_process_is_started(qcow2: Path) -> None:
    # the autouse fixture forbids processes; the probe reads the header itself
    assert check_disk_image(str(qcow2), FIELD) == "qcow2"


def test_vdi_is_named(tmp_path: Path) -> None:
    p = tmp_path / "disk.vdi"
    p.write_bytes(b"<<< QEMU VM Virtual Disk Image >>>\n".ljust(64, b"\0") + b"\x7f\x10\xda\xbe"
                  + b"\0" * 956)
    _refused(p, "VDI", "qemu-img convert")


def _with_data(qcow2: Path, tmp_path: Path) -> Path:
    """The overlay plus one L2 table (cluster 4) mapping guest cluster 0 to cluster 5."""
    cluster = 65536
    data = bytearray(qcow2.read_bytes())
    data += b"\0" * (2 * cluster)
    struct.pack_into(">Q", data, 3 * cluster, (1 << 63) | 4 * cluster)  # L1[0] -> L2
    struct.pack_into(">Q", data, 4 * cluster, (1 << 63) | 5 * cluster)  # L2[0] -> data
    data[5 * cluster:6 * cluster] = b"\xab" * cluster
    return _copy(qcow2, tmp_path / "data.qcow2", bytes(data))


def test_qcow2_cut_short_after_its_header_is_refused(qcow2: Path, tmp_path: Path) -> None:
    full = _with_data(qcow2, tmp_path)
    assert check_disk_image(str(full), FIELD) == "qcow2"
    cluster = 65536
    _refused(_copy(full, tmp_path / "a.qcow2", size=5 * cluster), "past the end", "truncated")
    _refused(_copy(full, tmp_path / "b.qcow2", size=4 * cluster + 100), "L2 table", "outside")
