from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

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


# -- integrity: the cheap check on every use, the full re-hash of `image verify`

def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    path.chmod(0o444)
    if keep_mtime:  # a careful attacker (or a backup tool) restores the mtime
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_flipped_byte_is_refused_on_use(lib: Library, tmp_path: Path) -> None:
    img = lib.add("x", {"disk": blob(tmp_path, "a", b"disk bytes")}, kind="disk", format="raw")
    lib.check_intact(img)
    path = img.path("disk")
    assert path is not None
    flip_byte(path)
    with pytest.raises(ImageError, match=r"image x:1: its disk file .* changed") as exc:
        lib.check_intact(img)
    assert str(path) in exc.value.message
    assert "vmforge image verify x:1" in (exc.value.hint or "")
    checks = lib.verify([img])
    assert [(c.ref, c.role, c.status) for c in checks] == [("x:1", "disk", "corrupt")]


def test_verify_finds_what_the_cheap_check_cannot_and_marks_it(lib: Library,
                                                               tmp_path: Path) -> None:
    img = lib.add("x", {"disk": blob(tmp_path, "a", b"disk bytes")}, kind="disk", format="raw")
    path = img.path("disk")
    assert path is not None
    flip_byte(path, keep_mtime=True)
    lib.check_intact(img)  # same size, same mtime: only a re-hash can tell
    assert [c.status for c in lib.verify(lib.all())] == ["corrupt"]
    with pytest.raises(ImageError, match="failed verification"):  # refused from now on
        lib.check_intact(lib.resolve("x"))


def test_verify_accepts_an_intact_file_again(lib: Library, tmp_path: Path) -> None:
    """A data directory copied without preserving mtimes: verify re-hashes and re-records."""
    img = lib.add("x", {"disk": blob(tmp_path, "a", b"disk bytes")}, kind="disk", format="raw")
    path = img.path("disk")
    assert path is not None
    os.utime(path, ns=(0, 10**18))
    with pytest.raises(ImageError, match="changed since it was stored"):
        lib.check_intact(img)
    assert [c.status for c in lib.verify([img])] == ["ok"]
    lib.check_intact(img)


def test_missing_file_is_named(lib: Library, tmp_path: Path) -> None:
    img = lib.add("x", {"disk": blob(tmp_path, "a", b"d"), "kernel": blob(tmp_path, "k", b"k")},
                  kind="disk", format="raw")
    kernel = img.path("kernel")
    assert kernel is not None
    kernel.unlink()
    with pytest.raises(ImageError, match=r"image x:1: its kernel file .* is missing"):
        lib.check_intact(img)
    assert sorted((c.role, c.status) for c in lib.verify([img])) == [("disk", "ok"),
                                                                      ("kernel", "missing")]


def test_storing_the_same_content_again_repairs_a_damaged_file(lib: Library,
                                                               tmp_path: Path) -> None:
    img = lib.add("x", {"disk": blob(tmp_path, "a", b"disk bytes")}, kind="disk", format="raw")
    path = img.path("disk")
    assert path is not None
    flip_byte(path)
    lib.add("y", {"disk": blob(tmp_path, "b", b"disk bytes")}, kind="disk", format="raw")
    assert path.read_bytes() == b"disk bytes"
    lib.check_intact(lib.resolve("x"))  # re-recorded for every image that uses the file
    assert [c.status for c in lib.verify(lib.all())] == ["ok", "ok"]


def test_rows_recorded_before_stamps_still_load(lib: Library, tmp_path: Path) -> None:
    digest = lib.store_file(blob(tmp_path, "a", b"old"))
    with lib.db.tx() as c:
        c.execute("INSERT INTO images (name, version, kind, files, created_at) "
                  "VALUES ('old', 1, 'disk', ?, 0)", (json.dumps({"disk": digest}),))
    img = lib.resolve("old")
    assert img.files == {"disk": digest}
    path = img.path("disk")
    assert path is not None
    os.utime(path, ns=(0, 10**18))
    lib.check_intact(img)  # nothing recorded: not cheaply checked
    assert [c.status for c in lib.verify([img])] == ["ok"]  # ... until a verify records it
    flip_byte(path)
    with pytest.raises(ImageError, match="changed since it was stored"):
        lib.check_intact(img)
    assert lib.prune() == []


def test_cli_verify(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vmforge.cli.main import app

    data = tmp_path / "data"
    lib = Library(Database(data / "state.db"), data / "images")
    lib.add("a", {"disk": blob(tmp_path, "a", b"aaaa")}, kind="disk", format="raw")
    b = lib.add("b", {"disk": blob(tmp_path, "b", b"bbbb")}, kind="disk", format="raw")
    d = ["--data-dir", str(data)]
    res = CliRunner().invoke(app, [*d, "image", "verify"])
    assert res.exit_code == 0, res.output
    assert "a:1" in res.output and "b:1" in res.output and "corrupt" not in res.output
    path = b.path("disk")
    assert path is not None
    flip_byte(path)
    res = CliRunner().invoke(app, [*d, "image", "verify", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert {(r["ref"], r["status"]) for r in doc} == {("a:1", "ok"), ("b:1", "corrupt")}
    res = CliRunner().invoke(app, [*d, "image", "verify", "a"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*d, "image", "verify", "b:1"])
    assert res.exit_code == 1 and "b:1" in res.output and "corrupt" in res.output


def test_attach_keeps_the_recorded_files_checked(lib: Library, tmp_path: Path) -> None:
    img = lib.add("x", {"disk": blob(tmp_path, "a", b"disk")}, kind="disk", format="raw")
    img = lib.attach(img, {"kernel": blob(tmp_path, "k", b"kernel"),
                           "initrd": blob(tmp_path, "i", b"initrd")}, cmdline="root=/dev/vda")
    assert sorted(img.files) == ["disk", "initrd", "kernel"] and img.cmdline == "root=/dev/vda"
    assert sorted(img.stamps) == ["disk", "initrd", "kernel"] and img.size == 4 + 6 + 6
    lib.check_intact(img)
    kernel = img.path("kernel")
    assert kernel is not None
    flip_byte(kernel)
    with pytest.raises(ImageError, match="its kernel file"):
        lib.check_intact(img)


def test_copies_left_by_dead_stores_are_swept(lib: Library, tmp_path: Path) -> None:
    lib.tmp.mkdir(parents=True)
    dead = lib.tmp / "in-999999999-1"  # no such process
    dead.write_bytes(b"half a copy")
    live = lib.tmp / f"in-{os.getpid()}-1"  # a store in progress (here: this process)
    live.write_bytes(b"in progress")
    lib.add("x", {"disk": blob(tmp_path, "a", b"1")}, kind="disk", format="raw")
    assert sorted(p.name for p in lib.tmp.iterdir()) == [live.name]


# -- concurrency: locks and the built-in images

def test_lock_excludes_and_leaves_nothing(lib: Library) -> None:
    inside: list[int] = []
    overlaps: list[int] = []

    def worker(i: int) -> None:
        with lib.lock("k"):
            inside.append(i)
            if len(inside) > 1:
                overlaps.append(i)
            time.sleep(0.01)
            inside.remove(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert list(lib.locks.iterdir()) == []


def fake_minimal_build(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the minimal image's build with a slow fake; returns the list of its calls."""
    from vmforge.builders import minimal

    builds: list[int] = []

    def fake_build(cache: Path, recipe: object = None, events: object = None) -> object:
        builds.append(1)
        time.sleep(0.2)  # the window in which the others used to start their own build
        cache.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(dir=cache))
        files = {n: blob(out, n, n.encode() * 10) for n in ("vmlinuz", "vmlinux", "initrd")}
        return SimpleNamespace(key="k1", recipe=lambda: {"key": "k1"}, cmdline="console=ttyS0",
                               **files)

    monkeypatch.setattr(minimal, "build_minimal", fake_build)
    return builds


def test_builtin_image_built_once_under_concurrency(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight first uses of `minimal` at once: one build, one version, the same image."""
    from vmforge.builders import builtin

    builds = fake_minimal_build(monkeypatch)
    data = tmp_path / "data"
    Database(data / "state.db").close()
    got: list[int] = []
    errors: list[BaseException] = []

    def use() -> None:
        lib = Library(Database(data / "state.db"), data / "images")
        try:
            img = builtin.ensure_builtin(lib, tmp_path / "cache", "minimal")
            assert img is not None
            got.append(img.id)
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)
        finally:
            lib.db.close()

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lib = Library(Database(data / "state.db"), data / "images")
    assert [i.ref for i in lib.all()] == ["minimal:1"]
    assert len(builds) == 1 and len(set(got)) == 1
    assert builtin.ensure_builtin(lib, tmp_path / "cache", "minimal:1") is None  # pinned: no-op


def test_building_a_damaged_builtin_again_repairs_it(lib: Library, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from vmforge.builders.builtin import register_minimal

    fake_minimal_build(monkeypatch)
    img = register_minimal(lib, tmp_path / "cache")
    initrd = img.path("initrd")
    assert initrd is not None
    flip_byte(initrd)
    assert not lib.is_intact(img)
    again = register_minimal(lib, tmp_path / "cache")
    assert again.ref == "minimal:1" and lib.is_intact(again)
    assert [c.status for c in lib.verify([again])] == ["ok"] * 3


# -- errors from the operating system

def test_missing_source_is_an_image_error(lib: Library, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found") as exc:
        lib.add("x", {"disk": tmp_path / "nope.img"}, kind="disk", format="raw")
    assert str(tmp_path / "nope.img") in exc.value.message
    assert lib.all() == []


def test_unusable_store_directory_is_an_image_error(tmp_path: Path) -> None:
    (tmp_path / "images").write_text("not a directory")
    lib = Library(Database(tmp_path / "state.db"), tmp_path / "images")
    with pytest.raises(ImageError) as exc:
        lib.add("x", {"disk": blob(tmp_path, "a", b"1")}, kind="disk", format="raw")
    assert str(tmp_path / "images") in exc.value.message and exc.value.hint
    assert lib.all() == []


def test_catalog_failure_leaves_no_blob(lib: Library, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    keep = lib.add("keep", {"disk": blob(tmp_path, "k", b"kept")}, kind="disk", format="raw")

    @contextmanager
    def full_tx() -> Iterator[None]:
        raise sqlite3.OperationalError("database or disk is full")
        yield

    monkeypatch.setattr(lib.db, "tx", full_tx)
    with pytest.raises(ImageError, match="database or disk is full") as exc:
        lib.add("x", {"disk": blob(tmp_path, "a", b"new"), "kernel": blob(tmp_path, "b", b"kept")},
                kind="disk", format="raw")
    assert str(lib.db.path) in exc.value.message
    monkeypatch.undo()
    assert [p.name for p in lib.blobs.iterdir()] == [keep.files["disk"]]  # only what is used
    assert [i.ref for i in lib.all()] == ["keep:1"]
    assert list(lib.tmp.iterdir()) == []
