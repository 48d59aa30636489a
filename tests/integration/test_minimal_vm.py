"""The minimal image boots for real under QEMU; lifecycle, crash detection, UEFI, cdroms."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from vmforge.errors import InvalidState
from vmforge.hypervisors.base import StopOutcome
from vmforge.hypervisors.qemu.driver import pid_alive
from vmforge.seed import Seed, write_iso

from .conftest import VmHelper

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]


def test_run_boots_to_agent_ready(vms: VmHelper) -> None:
    rec = vms.run("boot1")
    assert rec.state == "running" and rec.pid and rec.boot_seconds and rec.boot_seconds > 0
    hello = vms.call("boot1", lambda c: c.wait_ready(30))
    assert hello["vm_id"] == "boot1"
    res = vms.call("boot1", lambda c: c.exec(["uname", "-r"]))
    assert res.exit_code == 0 and res.stdout.decode().strip() == hello["kernel"]
    assert (rec.paths.console.read_text().count("vmforge: ready")) == 1


def test_stop_start_delete(vms: VmHelper) -> None:
    rec = vms.run("cycle")
    pid = rec.pid
    assert asyncio.run(vms.manager.stop("cycle", timeout=30)) is StopOutcome.AGENT
    rec = vms.manager.get("cycle")
    assert rec.state == "stopped" and rec.pid is None and not pid_alive(pid)
    assert not pid_alive(pid)
    with pytest.raises(InvalidState):
        asyncio.run(vms.manager.stop("cycle"))
    vms.manager.start("cycle")
    rec = asyncio.run(vms.manager.wait_ready("cycle", 240))
    assert rec.state == "running" and rec.pid != pid
    with pytest.raises(InvalidState, match="rm -f"):
        asyncio.run(vms.manager.delete("cycle"))
    asyncio.run(vms.manager.delete("cycle", force=True))
    assert not rec.dir.exists()
    assert [r.name for r in vms.manager.vms()] == []


def test_kill_9_of_qemu_shows_crashed(vms: VmHelper) -> None:
    rec = vms.run("victim")
    assert rec.pid
    os.kill(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(rec.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = vms.manager.get("victim")
    assert after.state == "crashed"
    assert after.last_error and "unexpectedly" in after.last_error
    vms.manager.start("victim")  # a crashed VM can be started again
    assert asyncio.run(vms.manager.wait_ready("victim", 240)).state == "running"


def test_acpi_powerdown_without_agent(vms: VmHelper) -> None:
    """No agent: readiness from the serial marker, stop through the ACPI power button."""
    rec = vms.run("acpi", agent={"enabled": False})
    assert rec.boot_seconds
    assert asyncio.run(vms.manager.stop("acpi", timeout=60)) is StopOutcome.ACPI


def test_uefi_boot_of_minimal_image(vms: VmHelper) -> None:
    rec = vms.run("uefi", firmware="FIRMWARE_UEFI")
    assert (rec.dir / "OVMF_VARS.fd").exists()
    res = vms.call("uefi", lambda c: c.exec(["ls", "/sys/firmware/efi"]))
    assert res.exit_code == 0, "guest did not boot through UEFI"


def test_cdrom_is_visible_in_guest(vms: VmHelper, tmp_path: object) -> None:
    from pathlib import Path
    iso = Path(str(tmp_path)) / "driver.iso"
    payload = b"#cloud-config\nhostname: from-the-iso\n"
    write_iso(Seed(b"instance-id: x\n", payload), iso)
    vms.run("cd", cdroms=[{"id": "drivers", "iso_path": str(iso)}])
    res = vms.call("cd", lambda c: c.exec(
        ["sh", "-c", "mkdir -p /mnt/cd && mount -t iso9660 -o ro /dev/sr0 /mnt/cd && "
                     "cat /mnt/cd/user-data"]))
    assert res.exit_code == 0, res.stderr
    assert res.stdout == payload


def test_two_vms_from_one_spec(vms: VmHelper) -> None:
    a, b = vms.run("twin-a"), vms.run("twin-b")
    assert a.pid != b.pid
    names = {r.name: r.state for r in vms.manager.vms()}
    assert names == {"twin-a": "running", "twin-b": "running"}


def test_two_phase_provisioning(vms: VmHelper, tmp_path: object) -> None:
    from pathlib import Path
    bundle = Path(str(tmp_path)) / "bundle"
    bundle.mkdir()
    (bundle / "app.conf").write_text("port=2280\n")
    vms.names.append("prov")
    req = vms.request("prov", provision=[
        {"copy": [str(bundle), "/etc/app"]},
        {"run": ["sh", "-c", "cat /etc/app/app.conf > /run/configured"]},
        {"wait_health": True, "timeout_s": 30}],
        health_checks=[{"command": ["test", "-f", "/run/configured"]}])
    asyncio.run(vms.manager.run(req, timeout=240))
    res = vms.call("prov", lambda c: c.exec(["cat", "/run/configured"]))
    assert res.stdout == b"port=2280\n"


def test_failing_provision_step_is_reported_and_cleaned_up(vms: VmHelper) -> None:
    from vmforge.errors import ProvisionError
    vms.names.append("badprov")
    req = vms.request("badprov", provision=[
        {"run": ["true"]},
        {"name": "configure app", "shell": "echo config missing >&2; exit 4",
         "timeout_s": 30}])
    with pytest.raises(ProvisionError) as exc:
        asyncio.run(vms.manager.run(req, timeout=240))
    assert exc.value.step == "configure app"
    assert "exit code 4" in str(exc.value) and "config missing" in exc.value.output
    assert [r.name for r in vms.manager.vms()] == []  # nothing left behind


def test_cli_run_example_on_an_empty_data_dir(tmp_path: object, repo_root: object) -> None:
    """What the README promises: `vmforge run -f examples/minimal.yaml` from nothing."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    data = Path(str(tmp_path)) / "fresh"
    base = [sys.executable, "-m", "vmforge", "--data-dir", str(data)]
    example = Path(str(repo_root)) / "examples" / "minimal.yaml"
    try:
        res = subprocess.run([*base, "run", "-f", str(example), "--json"], capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        rec = json.loads(res.stdout)[0]
        assert rec["state"] == "running" and rec["boot_seconds"] > 0
        assert "building" in res.stderr or "minimal" in res.stderr
        res = subprocess.run([*base, "exec", "minimal-demo", "--", "sh", "-c", "exit 5"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 5
        res = subprocess.run([*base, "image", "ls", "--json"], capture_output=True, text=True)
        assert json.loads(res.stdout)[0]["ref"] == "minimal:1"
    finally:
        subprocess.run([*base, "rm", "-f", "minimal-demo"], capture_output=True, timeout=120)
    res = subprocess.run([*base, "ls", "--json"], capture_output=True, text=True)
    assert json.loads(res.stdout) == []


def test_microvm_boots_with_agent_over_mmio(vms: VmHelper) -> None:
    rec = vms.run("micro", machine="microvm")
    assert rec.state == "running"
    res = vms.call("micro", lambda c: c.exec(["sh", "-c", "ls /sys/bus/virtio/devices | wc -l"]))
    assert int(res.stdout) >= 2  # virtio-mmio devices found through ACPI
