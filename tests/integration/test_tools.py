"""Seeds, overlays and host probes against the real tools (isoinfo, mtools, qemu-img, qemu)."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vmforge.cli.main import app
from vmforge.hypervisors.host import probe_kvm, probe_qemu
from vmforge.images import qcow2
from vmforge.seed import Seed, write_iso, write_vfat

pytestmark = pytest.mark.subprocess

USER = gzip.compress(b"#cloud-config\nhostname: exact\n", mtime=0)


def test_iso_label_and_exact_bytes(tmp_path: Path) -> None:
    iso = write_iso(Seed(b"instance-id: a\n", USER, b"version: 2\n"), tmp_path / "s.iso")
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True,
                          check=True).stdout
    assert "Volume id: cidata" in info
    assert "Joliet" in info and "Rock Ridge" in info
    got = subprocess.run(["isoinfo", "-J", "-x", "/user-data", "-i", str(iso)],
                         capture_output=True, check=True).stdout
    assert got == USER
    names = subprocess.run(["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True,
                           text=True, check=True).stdout.split()
    assert sorted(names) == ["/meta-data", "/network-config", "/user-data"]


def test_vfat_seed(tmp_path: Path) -> None:
    img = write_vfat(Seed(b"instance-id: a\n", USER, None, b""), tmp_path / "s.img")
    fsck = subprocess.run(["fsck.vfat", "-n", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run(["mdir", "-b", "-i", str(img), "::"], capture_output=True,
                             text=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    assert sorted(listing.stdout.split()) == ["::/meta-data", "::/user-data", "::/vendor-data"]
    blkid = subprocess.run(["blkid", "-o", "export", str(img)], capture_output=True,
                           text=True).stdout
    assert "LABEL=CIDATA" in blkid.upper() and "TYPE=vfat" in blkid
    got = subprocess.run(["mtype", "-i", str(img), "::user-data"], capture_output=True,
                         check=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
                         ).stdout
    assert got == USER


def test_seed_build_cli_validates_first(tmp_path: Path) -> None:
    bad = tmp_path / "ud"
    bad.write_text("#cloud-config\nusers: [\n")
    res = CliRunner().invoke(app, ["seed", "build", str(tmp_path / "o.iso"),
                                   "--user-data", str(bad)])
    assert res.exit_code == 2 and "line 3" in res.output
    assert not (tmp_path / "o.iso").exists()
    good = tmp_path / "good"
    good.write_text("#cloud-config\nhostname: a\n")
    for fmt in ("iso", "vfat"):
        res = CliRunner().invoke(app, ["seed", "build", str(tmp_path / f"o.{fmt}"),
                                       "--user-data", str(good), "--format", fmt])
        assert res.exit_code == 0, res.output
        assert (tmp_path / f"o.{fmt}").stat().st_size > 0


def test_overlay_is_thin_and_never_writes_backing(tmp_path: Path) -> None:
    base = qcow2.create_blank(tmp_path / "base.qcow2", 64 * 1024**2)
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    ov = qcow2.create_overlay(base, tmp_path / "ov.qcow2", 2 * qcow2.GIB)
    info = qcow2.image_info(ov)
    assert info.backing_file == str(base.resolve()) and info.backing_format == "qcow2"
    assert info.virtual_size == 2 * qcow2.GIB
    assert ov.stat().st_size < 1024 * 1024
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 1M", str(ov)], check=True,
                   capture_output=True)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before
    check = subprocess.run(["qemu-img", "check", "--output=json", str(ov)],
                           capture_output=True, text=True)
    assert json.loads(check.stdout).get("check-errors", 0) == 0


def test_kvm_probe_gives_a_reason(tmp_path: Path) -> None:
    qemu, version = probe_qemu()
    bogus = tmp_path / "not-a-kernel"
    bogus.write_bytes(b"\0" * 4096)
    verdict = probe_kvm(qemu, version, str(bogus), tmp_path, timeout=8)
    assert not verdict.works and verdict.reason  # /dev/kvm alone proves nothing


def test_doctor_and_help_cli(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["--data-dir", str(tmp_path), "doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert checks["qemu"]["status"] == "ok"
    assert checks["kvm"]["detail"]  # says why KVM is or is not used
    assert "minimal image" in checks


@pytest.mark.parametrize("fmt,size", [("raw", 64 * 1024**2), ("qcow2", 6 * 1024**4)])
def test_overlay_formats_and_huge_sizes(tmp_path: Path, fmt: str, size: int) -> None:
    base = qcow2.create_blank(tmp_path / f"base.{fmt}", 64 * 1024**2, fmt)
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 64k", str(base)], check=True,
                   capture_output=True)
    ov = qcow2.create_overlay(base, tmp_path / "ov.qcow2", size)
    info = qcow2.image_info(ov)
    assert info.backing_format == fmt and info.virtual_size == size
    check = subprocess.run(["qemu-img", "check", str(ov)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    read = subprocess.run(["qemu-io", "-c", "read -P 0x5a 0 64k", str(ov)], capture_output=True,
                          text=True)
    assert "Pattern verification failed" not in read.stdout and read.returncode == 0
