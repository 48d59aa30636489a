"""The image library against a real HTTP server on loopback: verify, resume, refuse."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vmforge.cli.main import app
from vmforge.errors import ChecksumError, ImageError
from vmforge.images.fetch import pull
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir
from vmforge.spec import parse_request

pytestmark = pytest.mark.subprocess

IMAGE = os.urandom(3 * 1024 * 1024 + 123)  # a raw disk image
SHA = hashlib.sha256(IMAGE).hexdigest()


class Server:
    def __init__(self) -> None:
        self.ranges: list[str | None] = []
        self.cut_next = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.ranges.append(self.headers.get("Range"))
                if self.path == "/SHA256SUMS":
                    body = f"{'0' * 64}  other.img\n{SHA} *disk.img\n".encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path != "/disk.img":
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(IMAGE) - 1}/{len(IMAGE)}")
                else:
                    self.send_response(200)
                body = IMAGE[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_next:
                    outer.cut_next -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the network dies mid-download
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def mgr(tmp_path: Path) -> Iterator[VmManager]:
    m = VmManager(DataDir(tmp_path / "data"))
    yield m
    m.close()


def stored_files(m: VmManager) -> list[str]:
    return sorted(p.name for d in (m.library.blobs, m.library.tmp) if d.exists()
                  for p in d.iterdir())


def test_pull_verifies_and_stores_read_only(server: Server, mgr: VmManager) -> None:
    img = pull(mgr.library, server.url + "/disk.img", "base", sha256=SHA)
    assert img.ref == "base:1" and img.format == "raw" and img.files["disk"] == SHA
    path = img.path("disk")
    assert path is not None and path.read_bytes() == IMAGE
    assert not os.access(path, os.W_OK) or os.geteuid() == 0
    assert path.stat().st_mode & 0o222 == 0
    again = pull(mgr.library, server.url + "/disk.img", "base", sha256=SHA)
    assert again.ref == "base:2" and again.path("disk") == path  # content-addressed


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
    mgr.delete("user1")
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
    res = run.invoke(app, [*d, "image", "rm", "web:1"])
    assert res.exit_code == 0
    res = run.invoke(app, [*d, "image", "pull", server.url + "/disk.img", "--name", "w2",
                           "--sha256", "0" * 64])
    assert res.exit_code == 1 and "sha256 mismatch" in res.output
