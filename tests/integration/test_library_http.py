"""The image library against a real HTTP server on loopback: verify, resume, refuse, race."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.integration.imageserver import IMAGE, SHA, Server
from vmforge.cli.main import app
from vmforge.errors import ChecksumError, ImageError
from vmforge.images.fetch import pull
from vmforge.images.importing import import_disk
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir
from vmforge.spec import parse_request

pytestmark = pytest.mark.subprocess


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


@pytest.fixture
def mgr(tmp_path: Path) -> Iterator[VmManager]:
    m = VmManager(DataDir(tmp_path / "data"))
    yield m
    m.close()


def stored_files(m: VmManager) -> list[str]:
    """Everything the library holds on disk besides the catalog (temporary files, locks)."""
    lib = m.library
    return sorted(p.name for d in (lib.blobs, lib.tmp, lib.locks) if d.exists()
                  for p in d.iterdir())


def test_pull_verifies_and_stores_read_only(server: Server, mgr: VmManager) -> None:
    img = pull(mgr.library, server.url + "/disk.img", "base", sha256=SHA)
    assert img.ref == "base:1" and img.format == "raw" and img.files["disk"] == SHA
    path = img.path("disk")
    assert path is not None and path.read_bytes() == IMAGE
    assert path.stat().st_mode & 0o222 == 0
    again = pull(mgr.library, server.url + "/disk.img", "base", sha256=SHA)
    assert again.id == img.id and server.full_gets() == 1  # it is already that: no download
    other = pull(mgr.library, server.url + "/disk.img", "other", sha256=SHA)
    assert other.ref == "other:1" and other.path("disk") == path  # content-addressed
    assert stored_files(mgr) == [SHA]


def test_sha256_mismatch_never_enters_the_library(server: Server, mgr: VmManager) -> None:
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        pull(mgr.library, server.url + "/disk.img", "bad", sha256="a" * 64)
    assert mgr.library.all() == []
    assert stored_files(mgr) == []


def test_sha256sums_file(server: Server, mgr: VmManager) -> None:
    img = pull(mgr.library, server.url + "/disk.img", "sums",
               sha256sums_url=server.url + "/SHA256SUMS")
    assert img.files["disk"] == SHA


def test_cut_download_resumes(server: Server, mgr: VmManager) -> None:
    server.cut_next = 1
    progress: list[int] = []
    img = pull(mgr.library, server.url + "/disk.img", "resumed", sha256=SHA,
               progress=lambda done, total: progress.append(done))
    assert img.files["disk"] == SHA
    first, second = server.ranges[0], server.ranges[1]
    assert first is None and second is not None
    resumed_at = int(second.split("=")[1].rstrip("-"))
    assert 0 < resumed_at < len(IMAGE)  # the second request asked only for the rest
    assert progress[-1] == len(IMAGE)


def test_missing_url_is_a_clear_error(server: Server, mgr: VmManager) -> None:
    with pytest.raises(ImageError, match="HTTP 404"):
        pull(mgr.library, server.url + "/nope.img", "x", sha256=SHA)
    assert stored_files(mgr) == []


def test_rm_refused_while_a_vm_uses_it(server: Server, mgr: VmManager) -> None:
    pull(mgr.library, server.url + "/disk.img", "base", sha256=SHA)
    mgr.create(parse_request({"name": "user1", "spec": {
        "agent": {"enabled": False},
        "disks": [{"id": "root", "bootable": True, "image": "base", "size_gib": 1}]}}))
    with pytest.raises(ImageError, match="in use by VM user1"):
        mgr.library.remove("base")
    asyncio.run(mgr.delete("user1"))
    mgr.library.remove("base")
    assert mgr.library.all() == [] and stored_files(mgr) == []


def test_cli_pull_ls_inspect_rm(server: Server, tmp_path: Path) -> None:
    run = CliRunner()
    d = ["--data-dir", str(tmp_path / "cli")]
    res = run.invoke(app, [*d, "image", "pull", server.url + "/disk.img", "--name", "web",
                           "--sha256", SHA])
    assert res.exit_code == 0, res.output
    res = run.invoke(app, [*d, "image", "ls", "--json"])
    assert '"ref": "web:1"' in res.stdout
    res = run.invoke(app, [*d, "image", "inspect", "web", "--json"])
    assert '"used_by_vms": []' in res.stdout and '"format": "raw"' in res.stdout
    res = run.invoke(app, [*d, "image", "verify", "web"])
    assert res.exit_code == 0 and "ok" in res.stdout
    res = run.invoke(app, [*d, "image", "rm", "web:1"])
    assert res.exit_code == 0
    res = run.invoke(app, [*d, "image", "pull", server.url + "/disk.img", "--name", "w2",
                           "--sha256", "0" * 64])
    assert res.exit_code == 1 and "sha256 mismatch" in res.output


def test_pulling_a_damaged_image_again_repairs_it(server: Server, mgr: VmManager) -> None:
    img = pull(mgr.library, server.url + "/disk.img", "base", sha256=SHA)
    path = img.path("disk")
    assert path is not None
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(b"\0" * 16 if IMAGE[:16] != b"\0" * 16 else b"\1" * 16)
    with pytest.raises(ImageError, match="changed since it was stored"):
        mgr.library.check_intact(img)
    again = pull(mgr.library, server.url + "/disk.img", "base", sha256=SHA)
    assert again.id == img.id and path.read_bytes() == IMAGE
    mgr.library.check_intact(again)
    assert stored_files(mgr) == [SHA]


# -- concurrent pulls (issue 14: two pulls shared one .part and stored a wrong image)

def test_concurrent_pulls_store_what_was_hashed(server: Server, tmp_path: Path) -> None:
    server.rate = 6 * 1024 * 1024  # ~0.5 s per transfer: the pulls overlap
    data = DataDir(tmp_path / "data")
    VmManager(data).close()
    results: dict[int, object] = {}

    def one(i: int, name: str) -> None:
        m = VmManager(data)
        try:
            results[i] = pull(m.library, server.url + "/disk.img", name, sha256=SHA)
        except Exception as exc:  # reported by the assertion below
            results[i] = exc
        finally:
            m.close()

    threads = [threading.Thread(target=one, args=(i, n))
               for i, n in enumerate(["base", "base", "other"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in results.values() if isinstance(r, Exception)], results
    m = VmManager(data)
    try:
        imgs = m.library.all()
        assert [i.ref for i in imgs] == ["base:1", "other:1"]
        assert {i.files["disk"] for i in imgs} == {SHA}
        path = imgs[0].path("disk")
        assert path is not None and hashlib.sha256(path.read_bytes()).hexdigest() == SHA
        assert [c.status for c in m.library.verify(imgs)] == ["ok", "ok"]
        assert server.full_gets() == 2  # the second pull of `base` found it stored
        assert stored_files(m) == [SHA]
    finally:
        m.close()


# -- completeness without a checksum

@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_pull_without_checksum_records_the_sha256(mode: str, mgr: VmManager) -> None:
    with Server(mode=mode) as server:
        img = pull(mgr.library, server.url + "/disk.img", "base")
    assert img.files["disk"] == SHA
    assert stored_files(mgr) == [SHA]


def test_cut_without_length_or_checksum_is_refused(mgr: VmManager) -> None:
    """A body that just stops (no Content-Length, not chunked) may be cut: not stored."""
    url = ""
    with Server(mode="close") as server:
        url = server.url + "/disk.img"
        server.cut_next = 1
        with pytest.raises(ImageError) as exc:
            pull(mgr.library, url, "base")
    assert url in exc.value.message and "--sha256" in (exc.value.hint or "")
    assert mgr.library.all() == [] and stored_files(mgr) == []


def test_no_length_with_checksum_is_fine(mgr: VmManager) -> None:
    with Server(mode="close") as server:
        img = pull(mgr.library, server.url + "/disk.img", "base", sha256=SHA)
    assert img.files["disk"] == SHA and stored_files(mgr) == [SHA]


def test_cut_chunked_transfer_resumes(mgr: VmManager) -> None:
    with Server(mode="chunked") as server:
        server.cut_next = 1
        img = pull(mgr.library, server.url + "/disk.img", "base")
        assert server.ranges[0] is None and server.ranges[1] is not None
    assert img.files["disk"] == SHA and stored_files(mgr) == [SHA]


def test_transfer_cut_too_often_names_the_url_and_resumes_later(server: Server,
                                                                mgr: VmManager) -> None:
    server.cut_next = 10
    url = server.url + "/disk.img"
    with pytest.raises(ImageError) as exc:
        pull(mgr.library, url, "base")
    assert url in exc.value.message and "resumes" in (exc.value.hint or "")
    assert mgr.library.all() == [] and not mgr.library.blobs.exists() or \
        not any(mgr.library.blobs.iterdir())
    server.cut_next = 0
    server.ranges.clear()
    img = pull(mgr.library, url, "base")
    assert img.files["disk"] == SHA and server.ranges[0] is not None  # resumed
    assert stored_files(mgr) == [SHA]


# -- leftovers of pulls that died

def leftover(m: VmManager, url: str, pid: int, data: bytes) -> Path:
    key = "pull-" + hashlib.sha256(url.encode()).hexdigest()[:24]
    m.library.tmp.mkdir(parents=True, exist_ok=True)
    p = m.library.tmp / f"{key}-{pid}.part"
    p.write_bytes(data)
    return p


def test_partial_file_of_a_dead_pull_is_resumed(server: Server, mgr: VmManager) -> None:
    url = server.url + "/disk.img"
    leftover(mgr, url, 999_999_991, IMAGE[:1000])
    leftover(mgr, url, 999_999_992, IMAGE[:1 << 20])
    img = pull(mgr.library, url, "base", sha256=SHA)
    assert img.files["disk"] == SHA and server.ranges == [f"bytes={1 << 20}-"]
    assert stored_files(mgr) == [SHA]


def test_partial_file_of_other_content_starts_again(server: Server, mgr: VmManager) -> None:
    url = server.url + "/disk.img"
    leftover(mgr, url, 999_999_991, os.urandom(1 << 20))  # the file changed on the server
    img = pull(mgr.library, url, "base", sha256=SHA)
    assert img.files["disk"] == SHA and server.ranges == [f"bytes={1 << 20}-", None]
    assert stored_files(mgr) == [SHA]


def test_complete_partial_file_is_stored_without_downloading(server: Server,
                                                             mgr: VmManager) -> None:
    url = server.url + "/disk.img"
    leftover(mgr, url, 999_999_991, IMAGE)  # the pull died right before storing
    img = pull(mgr.library, url, "base", sha256=SHA)
    assert img.files["disk"] == SHA and server.ranges == []
    assert stored_files(mgr) == [SHA]


# -- a full disk (a real small tmpfs)

@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_pull_and_import_leave_nothing(small_fs: Path, tmp_path: Path) -> None:
    m = VmManager(DataDir(small_fs / "data"))
    try:
        with Server(image=os.urandom(6 << 20)) as big:
            with pytest.raises(ImageError) as exc:
                pull(m.library, big.url + "/disk.img", "big")
        assert "No space left on device" in exc.value.message
        assert str(m.library.tmp) in exc.value.message
        assert "free space" in (exc.value.hint or "")
        assert m.library.all() == [] and stored_files(m) == []

        src = tmp_path / "big.img"
        src.write_bytes(os.urandom(5 << 20))
        with pytest.raises(ImageError) as exc:
            import_disk(m.library, src, "big", source="file:big.img")
        assert "No space left on device" in exc.value.message
        assert str(small_fs) in exc.value.message and "free space" in (exc.value.hint or "")
        assert m.library.all() == [] and stored_files(m) == []

        with Server() as server:  # the space was given back: a smaller image fits
            img = pull(m.library, server.url + "/disk.img", "small", sha256=SHA)
        assert img.files["disk"] == SHA and stored_files(m) == [SHA]
    finally:
        m.close()
