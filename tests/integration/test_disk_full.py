"""The data directory on a small, full filesystem: clear errors, nothing half-made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.subprocess]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def vf(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMFORGE_HOME=str(data), NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "vmforge", *args], env=env, text=True,
                          capture_output=True, timeout=120)


def fill(path: Path, leave: int) -> None:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\1" * max(0, free - leave))


def test_create_on_a_full_disk_is_a_clear_error_and_leaves_nothing(small_fs: Path,
                                                                   tmp_path: Path) -> None:
    data = small_fs / "data"
    assert vf(data, "ls").returncode == 0  # the state file exists
    disk = tmp_path / "base.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
        f.write(b"\x55\xaa")
    spec = tmp_path / "vm.yaml"
    spec.write_text(json.dumps({"name": "full", "spec": {
        "disks": [{"id": "root", "bootable": True, "backing_file": str(disk)},
                  {"id": "data", "size_gib": 1, "format": "raw"}],
        "cloud_init": {"user_data": "#cloud-config\nwrite_files: [{path: /x, content: '"
                                    + "y" * 200_000 + "'}]\n"}}}))
    fill(small_fs, 64 * 1024)
    res = vf(data, "create", "-f", str(spec))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert "disk is full" in res.stderr, res.stderr
    assert not [p for p in (data / "vms").iterdir()], "half-made VM directory left"
    (small_fs / "filler").unlink()
    res = vf(data, "ls", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []


def test_ls_on_a_completely_full_disk(small_fs: Path) -> None:
    data = small_fs / "data"
    assert vf(data, "ls").returncode == 0
    fill(small_fs, 0)
    res = vf(data, "ls", "--json")
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 0 or "disk is full" in res.stderr, res.stderr
