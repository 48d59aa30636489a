"""One spec file, `hypervisor: qemu` or `hypervisor: libvirt` and nothing else changed, through
the real `vmforge` command line against a real libvirtd (started by the `libvirt_uri` fixture
when none answers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vmforge.paths import DataDir

from .conftest import ssh_keypair

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]


class Vf:
    def __init__(self, data: DataDir, uri: str) -> None:
        self.data, self.uri = data, uri

    def __call__(self, *args: str, failpoint: str | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, VMFORGE_HOME=str(self.data.root), NO_COLOR="1",
                   VMFORGE_LIBVIRT_URI=self.uri)
        env.pop("VMFORGE_FAILPOINT", None)
        if failpoint:
            env["VMFORGE_FAILPOINT"] = failpoint
        return subprocess.run([sys.executable, "-m", "vmforge", *args], env=env, text=True,
                              capture_output=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 600) -> str:
        res = self(*args, timeout=timeout)
        assert res.returncode == 0, (args, res.stderr)
        return res.stdout

    def state(self, name: str) -> dict[str, object]:
        return {r["name"]: r for r in json.loads(self.ok("ls", "--json"))}.get(name, {})

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=60)


@pytest.fixture
def vf(vm_data: DataDir, libvirt_uri: str) -> Vf:
    return Vf(vm_data, libvirt_uri)


def spec_file(tmp: Path, name: str, hypervisor: str, spec: dict[str, object]) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "spec": {**spec, "hypervisor": hypervisor}}))
    return p


def nothing_left(vf: Vf, name: str) -> None:
    assert vf.state(name) == {}
    assert vf.virsh("dominfo", name).returncode != 0, "domain left behind"
    assert not (vf.data.vms / name).exists()
    assert not list(Path("/var/lib/libvirt/qemu/nvram").glob(f"{name}_*"))
    assert not Path(f"/run/libvirt/qemu/{name}.pid").exists()


def test_minimal_on_both_backends_then_crash_and_rm(vf: Vf, tmp_path: Path) -> None:
    base = {"memory_mib": 256, "kernel": {"image": "minimal"}}
    for hv in ("qemu", "libvirt"):
        name = f"both-{hv}"
        try:
            rec = json.loads(vf.ok("run", "-f", str(spec_file(tmp_path, name, hv, base)),
                                   "--json"))[0]
            assert rec["state"] == "running" and rec["backend"] == hv
            assert vf.ok("exec", name, "--", "cat", "/proc/cmdline").find(
                f"vmforge.id={name}") >= 0
            if hv == "libvirt":
                xml = vf.virsh("dumpxml", name).stdout
                assert "org.vmforge.agent.0" in xml and str(vf.data.vms / name) in xml
                assert "<memory unit='KiB'>262144</memory>" in xml
                pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
                os.kill(pid, signal.SIGKILL)  # the domain's QEMU dies
                deadline = time.monotonic() + 30
                while vf.state(name).get("state") == "running" and \
                        time.monotonic() < deadline:
                    time.sleep(0.2)
                assert vf.state(name)["state"] == "crashed"
        finally:
            vf("rm", "-f", name)
        nothing_left(vf, name) if hv == "libvirt" else None
        assert vf.state(name) == {}


def test_vmforge_killed_mid_run_under_libvirt(vf: Vf, tmp_path: Path) -> None:
    """libvirt owns the domain: vmforge dying mid-run stops nothing, and the next command
    finds the domain and makes the state agree with it."""
    spec = spec_file(tmp_path, "lvm-crash", "libvirt",
                     {"memory_mib": 256, "kernel": {"image": "minimal"}})
    for point, expect in (("start.recorded", "stopped"), ("start.launched", "running"),
                          ("wait.agent", "running")):
        res = vf("run", "-f", str(spec), failpoint=f"{point}:kill")
        assert res.returncode != 0
        row = vf.state("lvm-crash")
        assert row.get("state") == expect, (point, row)
        active = "running" in vf.virsh("domstate", "lvm-crash").stdout
        assert active == (expect == "running"), point
        if expect == "running":  # usable as it is, and not started twice
            assert vf.ok("exec", "lvm-crash", "--", "true") == ""
            res = vf("start", "lvm-crash")
            assert res.returncode != 0 and "running" in res.stderr
        vf.ok("rm", "-f", "lvm-crash")
        nothing_left(vf, "lvm-crash")


def test_cloud_image_with_cloud_init_under_libvirt(vf: Vf, debian_image: str,
                                                   tmp_path: Path) -> None:
    _, pub = ssh_keypair(tmp_path)
    user_data = "\n".join([
        "#cloud-config", "hostname: lvcloud", "users:", "  - name: alice",
        "    shell: /bin/bash", f"    ssh_authorized_keys: ['{pub}']",
        "write_files:", "  - {path: /etc/vmforge-test, content: written by cloud-init}", ""])
    spec = spec_file(tmp_path, "lvm-cloud", "libvirt", {
        "cpu_cores": 2, "memory_mib": 1024,
        "disks": [{"id": "root", "size_gib": 4, "bootable": True, "image": debian_image}],
        "cloud_init": {"user_data": user_data}})
    try:
        rec = json.loads(vf.ok("run", "-f", str(spec), "--json", timeout=900))[0]
        assert rec["state"] == "running" and rec["backend"] == "libvirt"

        def sh(cmd: str) -> str:
            return vf.ok("exec", "lvm-cloud", "--", "sh", "-c", cmd)
        assert "status: done" in sh("cloud-init status --long")
        assert sh("hostname").strip() == "lvcloud"
        assert pub in sh("cat /home/alice/.ssh/authorized_keys")
        assert sh("cat /etc/vmforge-test") == "written by cloud-init"
        xml = vf.virsh("dumpxml", "lvm-cloud").stdout
        assert "disk-root.qcow2" in xml and "seed.iso" in xml
    finally:
        vf("rm", "-f", "lvm-cloud")
    nothing_left(vf, "lvm-cloud")
