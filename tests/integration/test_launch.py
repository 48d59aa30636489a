"""`vmforge launch` with flags only (no spec file), `info --format json` and the aliases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmforge.paths import DataDir

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]


def vf(data: DataDir, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMFORGE_HOME=str(data.root), NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "vmforge", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_launch_minimal_with_flags(vm_data: DataDir) -> None:
    try:
        res = vf(vm_data, "launch", "minimal", "--name", "l-min", "--memory", "256M",
                 "--cpus", "2", "--json")
        assert res.returncode == 0, res.stderr
        rec = json.loads(res.stdout)
        assert rec["state"] == "running" and rec["memory_mib"] == 256 and rec["cpu_cores"] == 2
        spec = json.loads(vf(vm_data, "inspect", "l-min", "--json").stdout)["spec"]
        assert spec["kernel"]["image"].startswith("minimal:")  # the spec it used is kept
        info = json.loads(vf(vm_data, "info", "l-min", "--format", "json").stdout)
        d = info["info"]["l-min"]
        assert d["state"] == "running" and d["cpu_count"] == 2 and d["memory_mib"] == 256
        assert d["release"] and "kernel=minimal" in d["image"]
        listed = json.loads(vf(vm_data, "list", "--json").stdout)
        assert [r["name"] for r in listed] == ["l-min"]
    finally:
        res = vf(vm_data, "delete", "-f", "l-min")
    assert res.returncode == 0, res.stderr
    assert json.loads(vf(vm_data, "ls", "--json").stdout) == []


def test_launch_bad_flags_leave_nothing(vm_data: DataDir, tmp_path: Path) -> None:
    res = vf(vm_data, "launch", "minimal", "--name", "l-bad", "--memory", "lots")
    assert res.returncode == 2 and "spec.memory_mib" in res.stderr, res.stderr
    res = vf(vm_data, "launch", "minimal", "--name", "l-bad", "--forward", "80")
    assert res.returncode == 2 and "--forward" in res.stderr, res.stderr
    res = vf(vm_data, "launch", str(tmp_path / "nope.qcow2"), "--name", "l-bad")
    assert res.returncode == 2 and "IMAGE" in res.stderr, res.stderr
    assert json.loads(vf(vm_data, "ls", "--json").stdout) == []
    assert not (vm_data.vms / "l-bad").exists()


def test_launch_debian_cloud_image_with_flags(vm_data: DataDir, debian_image: str,
                                              tmp_path: Path) -> None:
    ud = tmp_path / "ud.yaml"
    ud.write_text("#cloud-config\nwrite_files:\n  - {path: /etc/launched, content: 'yes'}\n")
    try:
        res = vf(vm_data, "launch", debian_image, "--name", "l-deb", "--cpus", "2",
                 "--memory", "1G", "--disk", "4G", "--cloud-init", str(ud), "--json",
                 timeout=900)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["state"] == "running"
        res = vf(vm_data, "exec", "l-deb", "--", "sh", "-c",
                 "cat /etc/launched; df -BG --output=size / | tail -1")
        assert res.returncode == 0, res.stderr
        launched, size = res.stdout.split()
        assert launched == "yes" and int(size.rstrip("G")) >= 3  # grown to --disk
        d = json.loads(vf(vm_data, "info", "l-deb", "--format", "json").stdout)
        assert "Debian" in (d["info"]["l-deb"]["release"] or "")
    finally:
        vf(vm_data, "rm", "-f", "l-deb")
