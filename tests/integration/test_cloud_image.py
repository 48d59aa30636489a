"""A real cloud image (Debian, built here) with real cloud-init, checked from inside the guest
through the agent and from outside with ssh through a forwarded port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import VmHelper, free_port, ssh_keypair

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

MAC = "52:54:00:12:34:56"


def test_cloud_init_seed_end_to_end(vms: VmHelper, debian_image: str, tmp_path: Path) -> None:
    key, pub = ssh_keypair(tmp_path)
    port = free_port()
    user_data = "\n".join([
        "#cloud-config",
        "hostname: cloudy",
        "users:",
        "  - name: alice",
        "    sudo: ALL=(ALL) NOPASSWD:ALL",
        "    shell: /bin/bash",
        f"    ssh_authorized_keys: ['{pub}']",
        "write_files:",
        "  - path: /etc/vmforge-test",
        "    content: written by cloud-init",
        "runcmd:",
        "  - [sh, -c, 'echo ran > /var/tmp/runcmd-marker']",
        ""])
    network = "\n".join(["version: 2", "ethernets:", "  eth0:",
                         f"    match: {{macaddress: '{MAC}'}}", "    set-name: eth0",
                         "    dhcp4: true", ""])
    rec = vms.run("cloudy", kernel=None, memory_mib=1024, cpu_cores=2,
                  disks=[{"id": "root", "size_gib": 4, "bootable": True,
                          "image": debian_image}],
                  nics=[{"id": "net0", "mac": MAC,
                         "forwards": [{"host_port": port, "guest_port": 22}]}],
                  cloud_init={"user_data": user_data, "network_config": network})
    assert rec.state == "running"

    def sh(cmd: str) -> str:
        res = vms.call("cloudy", lambda c: c.exec(["sh", "-c", cmd], timeout=120))
        assert res.exit_code == 0, (cmd, res.stdout, res.stderr)
        return res.stdout.decode()

    status = sh("cloud-init status --wait --long")
    assert "status: done" in status and "error" not in status.lower(), status
    assert sh("hostname").strip() == "cloudy"
    assert "alice:x:" in sh("cat /etc/passwd")
    assert sh("cat /etc/vmforge-test") == "written by cloud-init"
    assert sh("cat /var/tmp/runcmd-marker") == "ran\n"
    assert "eth0" in sh("ip -br link") and "10.0.2.15" in sh("ip -br addr show eth0")
    assert int(sh("df --output=size -B1M / | tail -1")) > 3500  # grown to the overlay size
    out = subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30",
         "alice@127.0.0.1", "hostname && sudo -n cat /etc/vmforge-test"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "cloudy\nwritten by cloud-init"


def test_default_seed_when_no_cloud_init(vms: VmHelper, debian_image: str,
                                         monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """No cloud_init given: a default with the hostname and the invoking user's key."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key, pub = ssh_keypair(home / ".ssh")
    monkeypatch.setenv("HOME", str(home))
    for var in ("LOGNAME", "USER"):
        monkeypatch.setenv(var, "bob")
    monkeypatch.delenv("SUDO_USER", raising=False)
    port = free_port()
    vms.run("defaulted", kernel=None, memory_mib=1024, cpu_cores=2,
            disks=[{"id": "root", "bootable": True, "image": debian_image}],
            nics=[{"id": "net0", "forwards": [{"host_port": port, "guest_port": 22}]}])
    res = vms.call("defaulted", lambda c: c.exec(["sh", "-c", "hostname; id -un 1000"]))
    assert res.stdout.decode().split() == ["defaulted", "bob"]
    out = subprocess.run(["ssh", "-i", str(key), "-p", str(port), "-o",
                          "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                          "-o", "BatchMode=yes", "bob@127.0.0.1", "sudo -n true && echo ok"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_boots_from_its_own_bootloader_like_a_stock_image(vms: VmHelper,
                                                         debian_image: str) -> None:
    """boot_mode firmware: SeaBIOS -> GRUB in the image's MBR -> kernel; the partition grows."""
    vms.run("grubby", kernel=None, boot_mode="firmware", memory_mib=1024, cpu_cores=2,
            disks=[{"id": "root", "size_gib": 5, "bootable": True, "image": debian_image}],
            cloud_init={"user_data": "#cloud-config\nhostname: grubby\n"})
    res = vms.call("grubby", lambda c: c.exec(["sh", "-c",
                   "cat /proc/cmdline; lsblk -bno SIZE /dev/vda1; hostname"]))
    cmdline, part_size, hostname = res.stdout.decode().strip().splitlines()
    assert "BOOT_IMAGE=/boot/vmlinuz" in cmdline  # GRUB booted it, not -kernel
    assert int(part_size) > 4.5 * 1024**3  # growpart grew vda1 to the overlay's size
    assert hostname == "grubby"
