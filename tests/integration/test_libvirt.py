"""The libvirt driver on a real libvirtd: boots of the minimal image under TCG, through the
driver directly (the manager's use of it is tested with the manager).

A session fixture uses the libvirtd that answers at the URI ($VMFORGE_LIBVIRT_URI or
qemu:///system); if none does (no systemd here), it starts ``virtlogd -d`` and ``libvirtd -d``
with pid files of its own and stops them by those pids at the end, even on failure.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vmforge.agent.client import AgentClient
from vmforge.errors import HostError, LaunchError
from vmforge.hypervisors.base import (
    Accel,
    AgentEndpoint,
    Backend,
    EndpointKind,
    Liveness,
    StopOutcome,
)
from vmforge.hypervisors.libvirt import access
from vmforge.hypervisors.libvirt.driver import LibvirtDriver, is_system
from vmforge.hypervisors.plan import (
    AgentPlan,
    CdromPlan,
    DiskPlan,
    ForwardPlan,
    KernelPlan,
    MachinePlan,
    NicPlan,
)
from vmforge.images.library import Image
from vmforge.paths import DataDir
from vmforge.spec import Firmware, Machine

from ..fakes import fake_host
from ..golden import GOLDEN

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

HOST = fake_host()
RUN = Path("/run")


@pytest.fixture(scope="session")
def minimal(vm_data: DataDir) -> Image:
    from vmforge.builders.builtin import register_minimal
    from vmforge.node.manager import VmManager

    m = VmManager(vm_data)
    try:
        return register_minimal(m.library, vm_data.cache)
    finally:
        m.close()


@pytest.fixture
def driver(libvirt_uri: str) -> LibvirtDriver:
    return LibvirtDriver(uri=libvirt_uri)


def _path(img: Image, role: str) -> str:
    p = img.path(role)
    assert p is not None, role
    return str(p)


def vm_dir_for(data: DataDir, name: str) -> Path:
    d = data.vms / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o700, parents=True)
    return d


def direct_boot_plan(name: str, vm_dir: Path, img: Image, **changes: Any) -> MachinePlan:
    firmware = changes.get("firmware", Firmware.BIOS)
    plan = MachinePlan(
        name=name, vm_dir=str(vm_dir), run_dir=str(vm_dir), cpu_cores=1, memory_mib=256,
        machine=Machine.Q35, firmware=firmware, accel=Accel.TCG,
        console_log=str(vm_dir / "console.log"),
        kernel=KernelPlan(str(img.path(firmware.kernel_role()) or _path(img, "kernel")),
                          _path(img, "initrd"),
                          f"{img.cmdline or ''} vmforge.id={name}".strip()),
        agent=AgentPlan("virtio-serial", socket=str(vm_dir / "agent.sock")))
    return replace(plan, **changes)


def wait_hello(socket: str, timeout: float = 180) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with AgentClient(socket) as c:
            return await c.wait_ready(timeout)
    return asyncio.run(go())


def agent_exec(socket: str, argv: list[str]) -> tuple[int, str]:
    async def go() -> tuple[int, str]:
        async with AgentClient(socket) as c:
            res = await c.exec(argv, timeout=60)
            return res.exit_code, res.stdout.decode(errors="replace")
    return asyncio.run(go())


def wait_status(drv: LibvirtDriver, rt: Any, not_: Liveness, timeout: float = 20) -> Liveness:
    deadline = time.monotonic() + timeout
    live = drv.status(rt)
    while live is not_ and time.monotonic() < deadline:
        time.sleep(0.05)
        live = drv.status(rt)
    return live


def nothing_left(drv: LibvirtDriver, rt: Any, name: str, vm_dir: Path) -> None:
    assert drv.status(rt) is Liveness.GONE
    assert drv.find(name, vm_dir) is None
    if is_system(drv.uri):
        assert list(Path("/run/libvirt/qemu").glob(f"{name}.*")) == []
        assert not Path(f"/var/log/libvirt/qemu/{name}.log").exists()
        assert not Path(f"/etc/libvirt/qemu/{name}.xml").exists()
        assert not list(Path("/var/lib/libvirt/qemu/nvram").glob(f"{name}_*"))


QEMU_NOBODY = access.Principal(65534, 65534, frozenset({65534}))


def test_direct_kernel_boot_stop_restart_crash_and_cleanup(
        driver: LibvirtDriver, vm_data: DataDir, minimal: Image, tmp_path: Path) -> None:
    from vmforge.images.qcow2 import create_blank

    name = "lv-direct"
    vm_dir = vm_dir_for(vm_data, name)
    disk = create_blank(vm_dir / "disk-data.qcow2", 64 << 20)
    disk.chmod(0o600)
    plan = direct_boot_plan(name, vm_dir, minimal,
                            disks=(DiskPlan("data", str(disk), "qcow2"),))
    sock = str(vm_dir / "agent.sock")
    recorded: list[Any] = []
    rt = None
    try:
        t0 = time.monotonic()
        rt = driver.start(plan, HOST, recorded.append)
        started = time.monotonic()
        assert recorded == [rt]  # recorded once, before the guest ran
        assert rt.backend is Backend.LIBVIRT and rt.pid is None and rt.accel is Accel.TCG
        assert rt.agent == AgentEndpoint(EndpointKind.UNIX, path=sock)
        assert rt.extra == {"uri": driver.uri}
        hello = wait_hello(sock)
        ready = time.monotonic()
        assert hello["vm_id"] == name
        print(f"\nlibvirt timings: define {driver.last_timings['define']:.3f}s, create "
              f"{driver.last_timings['create']:.2f}s, start() {started - t0:.2f}s, "
              f"start->agent ready {ready - started:.2f}s")

        # what libvirt holds: virsh dumpxml
        xml = driver.domain_xml(rt)
        assert xml is not None
        root = ET.fromstring(xml)
        assert root.get("type") == "qemu" and root.findtext("name") == name
        assert [d.find("source").get("file") for d in root.iterfind("devices/disk")] == \
            [str(disk)]  # type: ignore[union-attr]
        assert root.find("devices/serial/source").get("path") == plan.console_log  # type: ignore[union-attr]
        assert root.find("devices/channel/source").get("path") == sock  # type: ignore[union-attr]
        assert root.findtext("os/kernel") == plan.kernel.kernel  # type: ignore[union-attr]
        assert driver.status(rt) is Liveness.RUNNING
        found = driver.find(name, vm_dir)
        assert found is not None and found.control == rt.control and found.agent == rt.agent
        assert driver.find(name, tmp_path) is None  # another VM directory: not ours

        # file access: nothing chowned, nothing opened to others
        assert disk.stat().st_uid == os.geteuid()
        assert stat.S_IMODE(vm_dir.stat().st_mode) & 0o007 == 0
        assert not access.has_access(disk, QEMU_NOBODY, access.READ)
        if is_system(driver.uri):
            assert "vmforge: ready" in Path(plan.console_log).read_text(errors="replace")

        # the power button: the guest powers off, libvirt says so
        outcome = asyncio.run(driver.stop(rt, 60))
        assert outcome is StopOutcome.ACPI
        assert driver.status(rt) is Liveness.POWERED_OFF
        assert driver.find(name, vm_dir) is not None  # still defined (persistent)

        # start again: the same domain (UUID kept), a new boot
        rt2 = driver.start(plan, HOST, lambda _r: None)
        assert rt2.control == rt.control
        again = wait_hello(sock)
        if "boot_id" in hello:
            assert again["boot_id"] != hello["boot_id"]

        # kill -9 of the domain's QEMU reads as a crash
        if is_system(driver.uri):
            pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
            status = dict(line.split(":", 1) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
            qemu_uid = int(status["Uid"].split()[1])
            if os.geteuid() == 0 and access.parse_label("libvirt-qemu:libvirt-qemu"):
                assert qemu_uid != 0 and int(status["CapEff"].strip(), 16) == 0
            os.kill(pid, signal.SIGKILL)
            assert wait_status(driver, rt, Liveness.RUNNING) is Liveness.CRASHED
        else:
            assert driver.kill(rt) is StopOutcome.KILLED

        driver.cleanup(rt, name, vm_dir)
        nothing_left(driver, rt, name, vm_dir)
        assert not Path(sock).exists()
        driver.cleanup(rt, name, vm_dir)  # idempotent
    finally:
        if rt is not None:
            driver.cleanup(rt, name, vm_dir)


def test_pc_machine_user_nics_passed_through_in_order(
        driver: LibvirtDriver, vm_data: DataDir, minimal: Image) -> None:
    """machine pc, two user NICs of which one forwards a port: both go through
    <qemu:commandline> at fixed slots; the guest sees them in the spec's order."""
    name = "lv-pcnet"
    vm_dir = vm_dir_for(vm_data, name)
    macs = ("52:54:00:00:10:01", "52:54:00:00:10:02")
    plan = direct_boot_plan(name, vm_dir, minimal, machine=Machine.PC, nics=(
        NicPlan("net0", macs[0]),
        NicPlan("net1", macs[1], (ForwardPlan("tcp", "127.0.0.1", 0, 22),))))
    sock = str(vm_dir / "agent.sock")
    rt = driver.start(plan, HOST, lambda _r: None)
    try:
        wait_hello(sock)
        code, out = agent_exec(sock, ["sh", "-c", "cat /sys/class/net/eth*/address"])
        assert code == 0 and out.split() == list(macs), out
    finally:
        driver.cleanup(rt, name, vm_dir)
    nothing_left(driver, rt, name, vm_dir)


def _iso(path: Path, volume: str) -> Path:
    from vmforge.seed.iso9660 import build_iso
    path.write_bytes(build_iso([("readme.txt", f"{volume}\n".encode())], volume_id=volume))
    path.chmod(0o600)
    return path


def test_uefi_two_cdroms_seen_by_the_guest_and_nvram_removed(
        driver: LibvirtDriver, vm_data: DataDir, minimal: Image) -> None:
    """UEFI + direct kernel boot (OVMF loads the kernel itself, so the cdroms' boot order is
    not exercised here: see the next test) with two cdroms; the agent reads both."""
    name = "lv-uefi"
    vm_dir = vm_dir_for(vm_data, name)
    isos = vm_dir / "isos"
    isos.mkdir(mode=0o700)
    plan = direct_boot_plan(
        name, vm_dir, minimal, firmware=Firmware.UEFI, nvram=str(vm_dir / "OVMF_VARS.fd"),
        cdroms=(CdromPlan("installer", str(_iso(isos / "installer.iso", "INSTALLER")), 1),
                CdromPlan("drivers", str(_iso(isos / "drivers.iso", "DRIVERS")))))
    sock = str(vm_dir / "agent.sock")
    rt = driver.start(plan, HOST, lambda _r: None)
    try:
        t = time.monotonic()
        wait_hello(sock, 240)
        print(f"\nlibvirt UEFI: start->agent ready {time.monotonic() - t:.2f}s")
        assert Path(plan.nvram or "").is_file()  # the driver made the VM's own copy
        assert agent_exec(sock, ["ls", "/sys/firmware/efi"])[0] == 0, "not booted by UEFI"
        labels = set()
        for dev in ("/dev/sr0", "/dev/sr1"):
            code, out = agent_exec(sock, ["dd", f"if={dev}", "bs=2048", "skip=16", "count=1"])
            assert code == 0, out
            labels |= {v for v in ("INSTALLER", "DRIVERS") if v in out}
        assert labels == {"INSTALLER", "DRIVERS"}
        xml = driver.domain_xml(rt)
        assert xml is not None
        root = ET.fromstring(xml)
        assert root.findtext("os/loader", "").endswith("OVMF_CODE_4M.fd")
        assert root.findtext("os/nvram") == plan.nvram
        boots = {d.find("source").get("file"): d.find("boot")  # type: ignore[union-attr]
                 for d in root.iterfind("devices/disk")}
        assert boots[str(isos / "installer.iso")] is not None
        assert boots[str(isos / "installer.iso")].get("order") == "1"  # type: ignore[union-attr]
        assert boots[str(isos / "drivers.iso")] is None
    finally:
        driver.cleanup(rt, name, vm_dir)
    nothing_left(driver, rt, name, vm_dir)
    assert not Path(plan.nvram or "").exists()  # undefined with its NVRAM


def _bootable_efi_iso(path: Path, efi_binary: str, work: Path) -> Path:
    """An El Torito (EFI, no emulation) ISO whose ESP holds the minimal image's EFI-stub
    kernel as \\EFI\\BOOT\\BOOTX64.EFI."""
    import pycdlib  # test dependency

    esp = work / "esp.img"
    size_kib = (os.path.getsize(efi_binary) // 1024) + 2048
    subprocess.run(["mkfs.vfat", "-C", "-n", "EFIBOOT", str(esp), str(size_kib)], check=True,
                   capture_output=True)
    subprocess.run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], check=True)
    subprocess.run(["mcopy", "-i", str(esp), efi_binary, "::/EFI/BOOT/BOOTX64.EFI"],
                   check=True)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="VMFBOOT")
    data = esp.read_bytes()
    iso.add_fp(io.BytesIO(data), len(data), "/ESP.IMG;1")
    iso.add_eltorito("/ESP.IMG;1", bootcatfile="/BOOT.CAT;1", efi=True, media_name="noemul")
    iso.write(str(path))
    iso.close()
    esp.unlink()
    path.chmod(0o600)
    return path


def test_uefi_firmware_boots_from_the_cdrom_first(
        driver: LibvirtDriver, vm_data: DataDir, minimal: Image, tmp_path: Path) -> None:
    """No kernel: OVMF follows the boot order. The bootable cdrom (order 1) comes before the
    disk (order 2) and the other cdrom (none); OVMF's boot manager says what it starts."""
    from vmforge.images.qcow2 import create_blank

    for tool in ("mkfs.vfat", "mmd", "mcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (dosfstools, mtools)")
    name = "lv-cdboot"
    vm_dir = vm_dir_for(vm_data, name)
    disk = create_blank(vm_dir / "disk-root.qcow2", 64 << 20)
    plan = MachinePlan(
        name=name, vm_dir=str(vm_dir), run_dir=str(vm_dir), cpu_cores=1, memory_mib=256,
        machine=Machine.Q35, firmware=Firmware.UEFI, accel=Accel.TCG,
        console_log=str(vm_dir / "console.log"), nvram=str(vm_dir / "OVMF_VARS.fd"),
        disks=(DiskPlan("root", str(disk), "qcow2", 2),),
        cdroms=(CdromPlan("other", str(_iso(vm_dir / "other.iso", "OTHER"))),
                CdromPlan("installer", str(_bootable_efi_iso(
                    vm_dir / "installer.iso", _path(minimal, "kernel"), tmp_path)), 1)))
    rt = driver.start(plan, HOST, lambda _r: None)
    try:
        deadline = time.monotonic() + 240
        text = ""
        while time.monotonic() < deadline:
            text = Path(plan.console_log).read_text(errors="replace")
            if "BdsDxe: starting" in text:
                break
            time.sleep(0.5)
        first = next((line for line in text.splitlines() if "BdsDxe: loading" in line), "")
        # the installer is the second cdrom: SATA port 1
        assert "DVD-ROM" in first and "Sata(0x1," in first, text[-2000:]
        assert "BdsDxe: starting Boot" in text
    finally:
        driver.cleanup(rt, name, vm_dir)
    nothing_left(driver, rt, name, vm_dir)


def test_libvirt_accepts_every_golden_domain(libvirt_uri: str) -> None:
    """virt-xml-validate checks the schema; defining checks what this libvirt supports."""
    import libvirt

    conn = libvirt.open(libvirt_uri)
    kvm = "<domain type='kvm'" in conn.getCapabilities()
    try:
        for path in sorted(GOLDEN.glob("domain-*.xml")):
            root = ET.fromstring(path.read_text())
            if root.get("type") == "kvm" and not kvm:
                continue
            name = f"vmforge-golden-{path.stem}"
            root.find("name").text = name  # type: ignore[union-attr]
            dom = conn.defineXMLFlags(ET.tostring(root, encoding="unicode"),
                                      libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            try:
                assert dom.name() == name
            finally:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()


def test_a_domain_that_cannot_start_is_a_launch_error_and_leaves_nothing(
        driver: LibvirtDriver, vm_data: DataDir, minimal: Image) -> None:
    name = "lv-broken"
    vm_dir = vm_dir_for(vm_data, name)
    plan = direct_boot_plan(name, vm_dir, minimal,
                            disks=(DiskPlan("gone", str(vm_dir / "missing.qcow2"), "qcow2"),))
    with pytest.raises(LaunchError, match="libvirt could not start VM lv-broken: .*missing"):
        driver.start(plan, HOST, lambda _r: None)
    assert driver.find(name, vm_dir) is None
    if is_system(driver.uri):
        assert not Path(f"/var/log/libvirt/qemu/{name}.log").exists()


def test_foreign_domain_of_the_same_name_is_not_touched(
        driver: LibvirtDriver, libvirt_uri: str, vm_data: DataDir, minimal: Image) -> None:
    import libvirt

    from vmforge.errors import VmExists

    name = "lv-foreign"
    conn = libvirt.open(libvirt_uri)
    dom = conn.defineXML(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64"
                         "</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>"
                         "</domain>")
    try:
        vm_dir = vm_dir_for(vm_data, name)
        with pytest.raises(VmExists, match="not this vmforge VM's"):
            driver.start(direct_boot_plan(name, vm_dir, minimal), HOST, lambda _r: None)
        assert driver.find(name, vm_dir) is None
        driver.cleanup(None, name, vm_dir)
        assert conn.lookupByName(name).UUIDString() == dom.UUIDString()  # still there
    finally:
        dom.undefine()
        conn.close()


def test_probe_and_unreachable_daemon(driver: LibvirtDriver) -> None:
    status = driver.probe()
    assert status.available and "libvirt " in status.detail and driver.uri in status.detail
    dead = LibvirtDriver(uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    down = dead.probe()
    assert not down.available and "does not answer" in down.detail and down.hint
    with pytest.raises(HostError, match="does not answer"):
        dead.find("x", Path("/nonexistent"))


def test_cloud_image_overlay_with_cidata_cdrom_and_forwarded_port(
        driver: LibvirtDriver, vm_data: DataDir, debian_image: str) -> None:
    """The private cloud's shape: a qcow2 overlay on a library image (read-only backing blob),
    the ``cidata`` ISO as a cdrom, a user-mode NIC with a port forward. Real cloud-init."""
    import socket

    from vmforge.agent import guest
    from vmforge.images.qcow2 import create_overlay
    from vmforge.node.manager import VmManager
    from vmforge.seed import build_seed, inject_agent, write_iso
    from vmforge.spec import CloudInit

    from .conftest import free_port

    m = VmManager(vm_data)
    try:
        img = m.library.find(debian_image)
    finally:
        m.close()
    assert img is not None
    name = "lv-cloud"
    mac = "52:54:00:12:34:58"
    vm_dir = vm_dir_for(vm_data, name)
    overlay = create_overlay(_path(img, "disk"), vm_dir / "disk-root.qcow2", 4 << 30,
                             backing_format=img.format)
    overlay.chmod(0o600)
    user_data = "\n".join(["#cloud-config", "hostname: lvcloud", "write_files:",
                           "  - path: /etc/vmforge-test", "    content: via libvirt", ""])
    network = "\n".join(["version: 2", "ethernets:", "  eth0:",
                         f"    match: {{macaddress: '{mac}'}}", "    set-name: eth0",
                         "    dhcp4: true", ""])
    seed = build_seed(name, CloudInit(user_data=user_data, network_config=network))
    seed = inject_agent(seed, Path(guest.__file__).read_bytes())
    write_iso(seed, vm_dir / "seed.iso")
    (vm_dir / "seed.iso").chmod(0o600)
    port = free_port()
    plan = replace(
        direct_boot_plan(name, vm_dir, img, memory_mib=1024, cpu_cores=2),
        disks=(DiskPlan("root", str(overlay), "qcow2"),), seed=str(vm_dir / "seed.iso"),
        nics=(NicPlan("net0", mac, (ForwardPlan("tcp", "127.0.0.1", port, 22),)),))
    sock = str(vm_dir / "agent.sock")
    blob = Path(_path(img, "disk"))
    blob_mode = blob.stat().st_mode
    rt = driver.start(plan, HOST, lambda _r: None)
    try:
        t = time.monotonic()
        wait_hello(sock, 600)
        print(f"\nlibvirt Debian cloud image: start->agent ready {time.monotonic() - t:.1f}s")

        def sh(cmd: str) -> str:
            code, out = agent_exec(sock, ["sh", "-c", cmd])
            assert code == 0, (cmd, out)
            return out

        status = sh("cloud-init status --wait --long")
        assert "status: done" in status, status
        assert sh("hostname").strip() == "lvcloud"
        assert sh("cat /etc/vmforge-test") == "via libvirt"
        assert "sr0" in sh("ls /sys/block")  # the seed, as a cdrom
        assert "10.0.2.15" in sh("ip -br addr show eth0")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.settimeout(30)
            assert conn.recv(64).startswith(b"SSH-2.0")  # sshd through the forward
        assert blob.stat().st_uid == os.geteuid() and blob.stat().st_mode == blob_mode
    finally:
        driver.cleanup(rt, name, vm_dir)
    nothing_left(driver, rt, name, vm_dir)
