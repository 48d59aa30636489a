from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from vmforge.errors import ChecksumError, ImageError
from vmforge.images.library import Library, parse_ref
from vmforge.state import Database


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    return Library(Database(tmp_path / "state.db"), tmp_path / "images")


def blob(tmp_path: Path, name: str, content: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


def test_versions_and_latest(lib: Library, tmp_path: Path) -> None:
    a = lib.add("base", {"disk": blob(tmp_path, "a", b"one")}, kind="disk", format="raw")
    b = lib.add("base", {"disk": blob(tmp_path, "b", b"two")}, kind="disk", format="raw")
    assert (a.ref, b.ref) == ("base:1", "base:2")
    assert lib.resolve("base").id == b.id
    assert lib.resolve("base:latest").id == b.id
    assert lib.resolve("base:1").id == a.id


def test_content_addressed_and_read_only(lib: Library, tmp_path: Path) -> None:
    img = lib.add("x", {"disk": blob(tmp_path, "a", b"hello")}, kind="disk", format="raw")
    path = img.path("disk")
    assert path is not None
    assert path.name == hashlib.sha256(b"hello").hexdigest()
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    again = lib.add("y", {"disk": blob(tmp_path, "b", b"hello")}, kind="disk", format="raw")
    assert again.path("disk") == path  # stored once


def test_checksum_mismatch_leaves_nothing(lib: Library, tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        lib.store_file(blob(tmp_path, "a", b"data"), expected_sha256="0" * 64)
    assert not any(lib.blobs.iterdir())
    assert not any(lib.tmp.iterdir())
    assert lib.all() == []


def test_rm_refused_while_child_image_uses_it(lib: Library, tmp_path: Path) -> None:
    base = lib.add("base", {"disk": blob(tmp_path, "a", b"1")}, kind="disk", format="raw")
    lib.add("golden", {"disk": blob(tmp_path, "b", b"2")}, kind="disk", format="qcow2",
            parent=base)
    with pytest.raises(ImageError, match="in use by image golden:1"):
        lib.remove("base")
    assert lib.lineage(lib.resolve("golden")) == ["base:1"]
    lib.remove("golden")
    lib.remove("base")
    assert lib.all() == [] and not any(lib.blobs.iterdir())


def test_unknown_image_hint_lists_names(lib: Library, tmp_path: Path) -> None:
    lib.add("debian", {"disk": blob(tmp_path, "a", b"1")}, kind="disk", format="raw")
    with pytest.raises(ImageError) as exc:
        lib.resolve("ubuntu")
    assert "debian" in (exc.value.hint or "")


@pytest.mark.parametrize("ref", ["", "a:b:c", "../x", "a:-1", "a b"])
def test_bad_refs(ref: str) -> None:
    with pytest.raises(ImageError):
        parse_ref(ref)


def test_prune_removes_unreferenced(lib: Library, tmp_path: Path) -> None:
    lib.store_file(blob(tmp_path, "orphan", b"orphan"))
    assert len(lib.prune()) == 1


def test_overlay_header_layout() -> None:
    import struct

    from vmforge.images.qcow2 import overlay_bytes
    head, length = overlay_bytes("/img/base.qcow2", "qcow2", 10 * 1024**3)
    assert head[:4] == b"QFI\xfb" and struct.unpack(">I", head[4:8])[0] == 3
    assert struct.unpack(">Q", head[24:32])[0] == 10 * 1024**3
    off, n = struct.unpack(">QI", head[8:20])
    assert head[off:off + n] == b"/img/base.qcow2"
    assert b"qcow2" in head[104:off] and length == 4 * 65536
