"""libvirt backend, pure part: golden domain XML for each shape (validated against libvirt's
schema), capabilities as data, URI handling, the ownership marker, file-access decisions."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from vmforge.errors import SpecError
from vmforge.hypervisors.base import Accel, Backend
from vmforge.hypervisors.libvirt import access
from vmforge.hypervisors.libvirt.render import (
    NS_QEMU,
    NS_VMFORGE,
    dev_name,
    domain_xml,
    parse_owner,
)
from vmforge.hypervisors.plan import (
    AgentPlan,
    CdromPlan,
    DiskPlan,
    ForwardPlan,
    KernelPlan,
    MachinePlan,
    NicPlan,
)
from vmforge.spec import DiskFormat, Firmware, Machine

from ..fakes import fake_host
from ..golden import GOLDEN, check_golden

HOST = fake_host()
VM = "/data/vms/vm1"
RUN = "/run/vmforge/vm1"
LABEL = "+64055:+64055"


def base_plan(**changes: object) -> MachinePlan:
    plan = MachinePlan(name="vm1", vm_dir=VM, run_dir=RUN, cpu_cores=1, memory_mib=256,
                       machine=Machine.Q35, firmware=Firmware.BIOS, accel=Accel.TCG,
                       console_log=f"{VM}/console.log",
                       agent=AgentPlan("virtio-serial", socket=f"{RUN}/agent.sock"))
    return replace(plan, **changes)  # type: ignore[arg-type]


MINIMAL = base_plan(kernel=KernelPlan("/lib/blobs/vmlinux", "/lib/blobs/initrd",
                                      "console=ttyS0 quiet vmforge.id=vm1"))

CLOUD = base_plan(
    cpu_cores=2, memory_mib=1024,
    disks=(DiskPlan("boot", f"{VM}/disk-boot.qcow2", "qcow2", None),),
    seed=f"{VM}/seed.iso",
    kernel=KernelPlan("/lib/blobs/vmlinuz", "/lib/blobs/initrd.img",
                      "root=LABEL=cloudimg-rootfs ro console=ttyS0 vmforge.id=vm1"),
    nics=(NicPlan("net0", "52:54:00:12:34:56",
                  (ForwardPlan("tcp", "127.0.0.1", 2222, 22),
                   ForwardPlan("udp", "0.0.0.0", 5353, 53))),))

INSTALLER = base_plan(
    cpu_cores=2, memory_mib=2048, firmware=Firmware.UEFI, nvram=f"{VM}/OVMF_VARS.fd",
    disks=(DiskPlan("root", f"{VM}/disk-root.qcow2", "qcow2", 2),
           DiskPlan("data", f"{VM}/disk-data.raw", "raw", None)),
    cdroms=(CdromPlan("installer", "/isos/installer.iso", 1),
            CdromPlan("drivers", "/isos/drivers.iso", None)),
    nics=(NicPlan("net0", "52:54:00:00:00:01"),))

PC_NETBOOT = base_plan(
    machine=Machine.PC, net_bootindex=1,
    disks=(DiskPlan("root", f"{VM}/disk-root.qcow2", "qcow2", 2),),
    cdroms=(CdromPlan("a", "/isos/a.iso", 3), CdromPlan("b", "/isos/b.iso", None),
            CdromPlan("c", "/isos/c.iso", None)),
    nics=(NicPlan("net0"), NicPlan("net1", "52:54:00:00:00:02",
                                   (ForwardPlan("tcp", "127.0.0.1", 8080, 80),))))

KVM_VSOCK = replace(MINIMAL, accel=Accel.KVM, cpu_cores=4,
                    agent=AgentPlan("vsock", cid=1234567))


@dataclass(frozen=True)
class FutureNic(NicPlan):
    """NicPlan as it will be once the spec has libvirt networks and host bridges."""
    network: str | None = None
    bridge: str | None = None


NETWORKS = replace(MINIMAL, nics=(FutureNic("lan", "52:54:00:00:00:0a", network="default"),
                                  FutureNic("br", "52:54:00:00:00:0b", bridge="br0"),
                                  NicPlan("user0")))

SHAPES = {
    "domain-minimal.xml": (MINIMAL, None),
    "domain-cloud.xml": (CLOUD, LABEL),
    "domain-installer-uefi.xml": (INSTALLER, LABEL),
    "domain-pc-netboot.xml": (PC_NETBOOT, None),
    "domain-kvm-vsock.xml": (KVM_VSOCK, None),
    "domain-networks.xml": (NETWORKS, None),
}


def xml_of(plan: MachinePlan, label: str | None = None) -> ET.Element:
    return ET.fromstring(domain_xml(plan, HOST, dac_label=label))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_golden_domain_xml(name: str) -> None:
    plan, label = SHAPES[name]
    check_golden(name, domain_xml(plan, HOST, dac_label=label))


def test_minimal_direct_kernel_boot() -> None:
    root = xml_of(MINIMAL)
    assert root.get("type") == "qemu"  # TCG
    assert root.findtext("os/kernel") == "/lib/blobs/vmlinux"
    assert root.findtext("os/initrd") == "/lib/blobs/initrd"
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet vmforge.id=vm1"
    assert root.find("os").get("firmware") is None  # type: ignore[union-attr]
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == f"{VM}/console.log"  # type: ignore[union-attr]
    channel = root.find("devices/channel")
    assert channel is not None and channel.get("type") == "unix"
    assert channel.find("source").attrib == {"mode": "bind", "path": f"{RUN}/agent.sock"}  # type: ignore[union-attr]
    assert channel.find("target").attrib == {"type": "virtio", "name": "org.vmforge.agent.0"}  # type: ignore[union-attr]
    assert root.find("features/acpi") is not None  # else `poweroff` only halts
    assert root.find("devices/rng").get("model") == "virtio"  # type: ignore[union-attr]
    assert root.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    assert root.find("devices/panic").get("model") == "isa"  # type: ignore[union-attr]
    assert root.findtext("on_crash") == "destroy"  # a panic shuts it off as "crashed"
    assert root.find("seclabel") is None
    assert root.find(f"{{{NS_QEMU}}}commandline") is None
    assert root.findtext("cpu/model") == "qemu64"
    assert root.find("cpu/topology").get("cores") == "1"  # type: ignore[union-attr]


def test_ownership_metadata_round_trip() -> None:
    meta = xml_of(MINIMAL).find(f"metadata/{{{NS_VMFORGE}}}vm")
    assert meta is not None and meta.get("vm-dir") == VM
    assert parse_owner(ET.tostring(meta, encoding="unicode")) == VM
    assert parse_owner("<other xmlns='urn:x' vm-dir='/x'/>") is None
    assert parse_owner("not xml") is None


def test_cloud_overlay_seed_and_forwards() -> None:
    root = xml_of(CLOUD, LABEL)
    disks = root.findall("devices/disk")
    overlay, seed = disks
    assert overlay.find("driver").attrib == {"name": "qemu", "type": "qcow2", "discard": "unmap"}  # type: ignore[union-attr]
    assert overlay.find("source").get("file") == f"{VM}/disk-boot.qcow2"  # type: ignore[union-attr]
    assert overlay.findtext("serial") == "boot"
    assert seed.get("device") == "cdrom" and seed.find("readonly") is not None
    assert seed.find("target").attrib == {"dev": "sda", "bus": "scsi"}  # type: ignore[union-attr]
    assert root.find("devices/controller[@type='scsi']").get("model") == "virtio-scsi"  # type: ignore[union-attr]
    assert root.findall("devices/interface") == []  # passed through: it has forwards
    args = [a.get("value") for a in root.iter(f"{{{NS_QEMU}}}arg")]
    assert args[:2] == ["-netdev", "user,id=vmforge-net0,hostfwd=tcp:127.0.0.1:2222-:22,"
                                   "hostfwd=udp:0.0.0.0:5353-:53"]
    device = json.loads(args[3] or "")
    assert device == {"driver": "virtio-net-pci", "netdev": "vmforge-net0",
                      "id": "vmforge-nic-net0", "bus": "pcie.0", "addr": "0x1b",
                      "mac": "52:54:00:12:34:56"}
    sec = root.find("seclabel")
    assert sec is not None and sec.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert sec.findtext("label") == LABEL


def test_installer_uefi_two_cdroms_and_boot_order() -> None:
    root = xml_of(INSTALLER)
    os_el = root.find("os")
    assert os_el is not None and os_el.get("firmware") == "efi"
    assert {f.get("name"): f.get("enabled") for f in os_el.iterfind("firmware/feature")} == \
        {"secure-boot": "no", "enrolled-keys": "no"}
    assert os_el.findtext("nvram") == f"{VM}/OVMF_VARS.fd"
    assert os_el.find("kernel") is None and os_el.find("boot") is None  # per-device order
    order = {}
    for disk in root.iterfind("devices/disk"):
        boot = disk.find("boot")
        order[disk.find("source").get("file")] = boot.get("order") if boot is not None else None  # type: ignore[union-attr]
    assert order == {f"{VM}/disk-root.qcow2": "2", f"{VM}/disk-data.raw": None,
                     "/isos/installer.iso": "1", "/isos/drivers.iso": None}
    cdroms = [d for d in root.iterfind("devices/disk") if d.get("device") == "cdrom"]
    assert [c.find("target").attrib for c in cdroms] == [  # type: ignore[union-attr]
        {"dev": "sda", "bus": "sata"}, {"dev": "sdb", "bus": "sata"}]
    assert root.find("devices/disk[2]/driver").get("type") == "raw"  # type: ignore[union-attr]
    iface = root.find("devices/interface")
    assert iface is not None and iface.get("type") == "user"
    assert iface.find("mac").get("address") == "52:54:00:00:00:01"  # type: ignore[union-attr]


def test_pc_machine_ide_cdroms_and_network_boot_through_passthrough() -> None:
    root = xml_of(PC_NETBOOT)
    assert root.find("os/type").get("machine") == "pc"  # type: ignore[union-attr]
    cdroms = [d.find("target").attrib for d in root.iterfind("devices/disk")  # type: ignore[union-attr]
              if d.get("device") == "cdrom"]
    assert cdroms == [{"dev": "hda", "bus": "ide"}, {"dev": "hdb", "bus": "ide"},
                      {"dev": "hdc", "bus": "ide"}]
    # one NIC has forwards: both user NICs go through, in order, with the boot index
    args = [a.get("value") or "" for a in root.iter(f"{{{NS_QEMU}}}arg")]
    devices = [json.loads(a) for a in args if a.startswith("{")]
    assert [(d["id"], d["bus"], d["addr"], d.get("bootindex")) for d in devices] == [
        ("vmforge-nic-net0", "pci.0", "0x1c", 1), ("vmforge-nic-net1", "pci.0", "0x1d", None)]
    with pytest.raises(SpecError, match=r"spec\.cdroms\[4\]"):
        domain_xml(replace(PC_NETBOOT, cdroms=tuple(CdromPlan(f"c{i}", f"/i{i}.iso")
                                                     for i in range(5))), HOST)


def test_kvm_and_vsock() -> None:
    root = xml_of(KVM_VSOCK)
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert root.find("cpu/topology").get("cores") == "4"  # type: ignore[union-attr]
    assert root.find("devices/vsock/cid").attrib == {"auto": "no", "address": "1234567"}  # type: ignore[union-attr]
    assert root.find("devices/channel") is None  # one transport, not two


def test_networks_and_bridges_by_name() -> None:
    ifaces = xml_of(NETWORKS).findall("devices/interface")
    assert [(i.get("type"), i.find("source").attrib if i.find("source") is not None else None)
            for i in ifaces] == [("network", {"network": "default"}),
                                 ("bridge", {"bridge": "br0"}), ("user", None)]


def test_microvm_is_refused_with_the_field() -> None:
    with pytest.raises(SpecError, match="spec.machine: libvirt does not support machine "
                                        "microvm"):
        domain_xml(replace(MINIMAL, machine=Machine.MICROVM), HOST)


def test_too_many_forwarded_nics() -> None:
    nics = tuple(NicPlan(f"n{i}", forwards=(ForwardPlan("tcp", "127.0.0.1", 2000 + i, 22),))
                 for i in range(5))
    with pytest.raises(SpecError, match="spec.nics"):
        domain_xml(replace(MINIMAL, nics=nics), HOST)


def test_uuid_is_kept_when_redefining() -> None:
    uuid = "d792c509-beb4-4f9d-bb2d-b5710cd7866e"
    assert ET.fromstring(domain_xml(MINIMAL, HOST, uuid=uuid)).findtext("uuid") == uuid


def test_dev_names() -> None:
    assert [dev_name("vd", i) for i in (0, 1, 25, 26, 27, 701, 702)] == \
        ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]


def test_capabilities_are_data() -> None:
    from vmforge.hypervisors.libvirt.driver import LibvirtDriver
    caps = LibvirtDriver(uri="test:///default").capabilities()
    assert caps.backend is Backend.LIBVIRT
    assert caps.machines == frozenset({Machine.Q35, Machine.PC})  # microvm refused
    assert caps.firmware == frozenset(Firmware) and caps.disk_formats == frozenset(DiskFormat)
    assert caps.cdroms and caps.user_net_forwards and caps.survives_vmforge
    assert not caps.needs_kvm
    assert caps.agent_transports == frozenset({"virtio-serial", "vsock"})
    json.dumps(caps.to_json())


def test_capability_check_refuses_microvm_for_libvirt() -> None:
    from vmforge.hypervisors.libvirt.driver import LibvirtDriver
    from vmforge.node import plan as planmod
    from vmforge.spec import parse_request
    req = parse_request({"name": "vm1", "spec": {"machine": "microvm",
                                                 "kernel": {"image": "minimal"}}})
    with pytest.raises(SpecError, match="spec.machine"):
        planmod.check_capabilities(req, LibvirtDriver().capabilities())


def test_uri_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmforge.hypervisors.libvirt.driver import (
        LibvirtDriver,
        is_local,
        is_system,
        start_hint,
    )
    monkeypatch.delenv("VMFORGE_LIBVIRT_URI", raising=False)
    assert LibvirtDriver().uri == "qemu:///system"
    monkeypatch.setenv("VMFORGE_LIBVIRT_URI", "qemu:///session")
    assert LibvirtDriver().uri == "qemu:///session"
    remote = "qemu+ssh://root@node7/system?keyfile=/k&no_verify=1"
    assert LibvirtDriver(uri=remote).uri == remote  # passed through untouched
    assert is_system("qemu:///system") and is_system("qemu+unix:///system")
    assert not is_system("qemu:///session") and is_local("qemu:///session")
    assert not is_local(remote) and not is_system(remote)
    assert "virtlogd -d && libvirtd -d" in start_hint("qemu:///system") or \
        "systemctl" in start_hint("qemu:///system")
    assert f"virsh -c {remote} version" in start_hint(remote)


def test_render_through_the_driver_sets_the_label_only_for_system() -> None:
    from vmforge.hypervisors.libvirt.driver import LibvirtDriver
    for uri in ("qemu:///session", "qemu+ssh://h/system"):
        xml = LibvirtDriver(uri=uri).render(MINIMAL, HOST).domain_xml
        assert xml is not None and "<seclabel" not in xml
    system = LibvirtDriver(uri="qemu:///system").render(MINIMAL, HOST).domain_xml
    assert system is not None
    if access.parse_label("libvirt-qemu:libvirt-qemu") is not None:  # Debian's account
        assert "<seclabel" in system and "relabel=\"no\"" in system


def test_state_mapping() -> None:
    from vmforge.hypervisors.base import Liveness
    from vmforge.hypervisors.libvirt.driver import _map_state
    assert _map_state(1, 1) is Liveness.RUNNING
    assert _map_state(5, 3) is Liveness.CRASHED      # shut off: crashed (kill -9 of QEMU)
    assert _map_state(5, 1) is Liveness.POWERED_OFF  # shut off: the guest shut down
    assert _map_state(5, 2) is Liveness.POWERED_OFF  # destroyed
    assert _map_state(5, 0) is Liveness.GONE         # defined, never ran
    assert _map_state(3, 1) is Liveness.PAUSED
    assert _map_state(3, 10) is Liveness.CRASHED     # paused after a guest panic
    assert _map_state(6, 0) is Liveness.CRASHED


@pytest.mark.subprocess
def test_the_binding_is_imported_only_when_used() -> None:
    code = ("import sys, vmforge.hypervisors.libvirt.driver as d; "
            "from tests.fakes import fake_host; from tests.unit.test_libvirt_render import "
            "MINIMAL; drv = d.LibvirtDriver(); drv.capabilities(); drv.render(MINIMAL, "
            "fake_host()); print('libvirt' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert res.stdout.strip() == "False"


# -- file access (no processes: modes and ACLs are read, setfacl is not run)

QEMU = access.Principal(64055, 64055, frozenset({64055, 107}))


def test_grants_cover_owner_only_directories_and_files(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs files owned by another user than the principal")
    top = tmp_path / "data"
    (top / "vms" / "vm1").mkdir(parents=True)
    (top / "blobs").mkdir()
    for d in (top, top / "vms", top / "vms" / "vm1", top / "blobs"):
        d.chmod(0o700)
    disk = top / "vms" / "vm1" / "disk.qcow2"
    kernel = top / "blobs" / "kernel"
    public = top / "blobs" / "public"
    for f, mode in ((disk, 0o600), (kernel, 0o400), (public, 0o444)):
        f.write_bytes(b"x")
        f.chmod(mode)
    grants = access.needed_grants(QEMU, read=[kernel, public], write=[disk])
    assert grants["rw"] == [disk]
    assert grants["r"] == [kernel]  # world-readable already: untouched
    assert top in grants["x"] and top / "vms" / "vm1" in grants["x"]
    assert Path("/") not in grants["x"]
    assert stat.S_IMODE(kernel.stat().st_mode) == 0o400  # deciding changes nothing


def test_has_access_reads_acl_entries(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setfacl") is None:
        pytest.skip("needs root and setfacl")
    f = tmp_path / "f"
    f.write_bytes(b"x")
    f.chmod(0o600)
    assert not access.has_access(f, QEMU, access.READ)
    # setting the xattr directly (what setfacl does), so no process is started
    import struct
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, 64055), (0x04, 0, 0xFFFFFFFF),
               (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    os.setxattr(f, "system.posix_acl_access",
                struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))
    assert access.has_access(f, QEMU, access.READ)
    assert not access.has_access(f, QEMU, access.READ | access.WRITE)
    other = access.Principal(1234, 1234, frozenset({1234}))
    assert not access.has_access(f, other, access.READ)


def test_backing_chain_from_qcow2_headers(tmp_path: Path) -> None:
    from vmforge.images.qcow2 import create_overlay
    base = tmp_path / "lib" / "base.raw"
    base.parent.mkdir()
    base.write_bytes(b"\0" * 1024 * 1024)
    mid = create_overlay(base, tmp_path / "mid.qcow2", backing_format="raw")
    (tmp_path / "vm").mkdir()
    top = create_overlay(mid, tmp_path / "vm" / "top.qcow2", backing_format="qcow2")
    assert access.backing_chain(top) == [mid.resolve(), base.resolve()]
    assert access.backing_chain(base) == []


def test_parse_label() -> None:
    assert access.parse_label("+64055:+107") == (64055, 107)
    assert access.parse_label("+0:+0") == (0, 0)
    assert access.parse_label("garbage") is None
    assert access.Principal(1, 2, frozenset()).label == "+1:+2"


# -- the oracle: libvirt's own schema

def _validator() -> list[str] | None:
    if shutil.which("virt-xml-validate"):
        return ["virt-xml-validate"]
    return None


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_goldens_pass_virt_xml_validate(name: str) -> None:
    tool = _validator()
    if tool is None:
        pytest.skip("virt-xml-validate not installed (apt-get install libvirt-clients)")
    path = GOLDEN / name
    assert path.exists(), f"run the golden test first: {name}"
    res = subprocess.run([*tool, str(path), "domain"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# -- the driver's I/O logic on libvirt's in-process test driver (no daemon, no process)

@pytest.fixture
def test_driver(tmp_path: Path) -> tuple[object, Path]:
    pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    from vmforge.hypervisors.libvirt.driver import LibvirtDriver
    node = tmp_path / "node.xml"
    node.write_text("<node/>\n")  # a private test:// host per test (test:///default is shared)
    vm_dir = tmp_path / "vm1"
    vm_dir.mkdir()
    return LibvirtDriver(uri=f"test://{node}"), vm_dir


def _plan_in(vm_dir: Path, **changes: object) -> MachinePlan:
    return replace(MINIMAL, vm_dir=str(vm_dir), run_dir=str(vm_dir),  # type: ignore[arg-type]
                   console_log=str(vm_dir / "console.log"),
                   agent=AgentPlan("virtio-serial", socket=str(vm_dir / "agent.sock")),
                   **changes)


def test_driver_lifecycle_on_the_test_driver(test_driver: tuple[object, Path]) -> None:
    import asyncio

    from vmforge.hypervisors.base import AgentEndpoint, EndpointKind, Liveness, StopOutcome
    from vmforge.hypervisors.libvirt.driver import LibvirtDriver
    drv, vm_dir = test_driver
    assert isinstance(drv, LibvirtDriver)
    plan = _plan_in(vm_dir)
    recorded: list[object] = []
    rt = drv.start(plan, HOST, recorded.append)
    assert recorded == [rt] and rt.pid is None and rt.extra == {"uri": drv.uri}
    assert rt.agent == AgentEndpoint(EndpointKind.UNIX, path=str(vm_dir / "agent.sock"))
    assert drv.status(rt) is Liveness.RUNNING
    found = drv.find("vm1", vm_dir)
    assert found is not None and (found.control, found.agent) == (rt.control, rt.agent)
    assert drv.find("vm1", vm_dir / "elsewhere") is None and drv.find("nope", vm_dir) is None
    again = drv.start(plan, HOST, lambda _r: None)  # running already: adopted, not doubled
    assert again.control == rt.control
    assert drv.kill(rt) is StopOutcome.KILLED and drv.status(rt) is Liveness.POWERED_OFF
    assert drv.kill(rt) is StopOutcome.NOT_RUNNING
    assert asyncio.run(drv.stop(rt, 0)) is StopOutcome.NOT_RUNNING
    rt2 = drv.start(plan, HOST, lambda _r: None)  # redefined: the same domain (UUID kept)
    assert rt2.control == rt.control and drv.status(rt2) is Liveness.RUNNING
    assert asyncio.run(drv.stop(rt2, 0)) is StopOutcome.KILLED
    drv.cleanup(rt2, "vm1", vm_dir)
    assert drv.status(rt2) is Liveness.GONE and drv.find("vm1", vm_dir) is None
    drv.cleanup(rt2, "vm1", vm_dir)  # idempotent
    drv.cleanup(None, "vm1", vm_dir)


def test_a_foreign_domain_is_neither_adopted_nor_removed(
        test_driver: tuple[object, Path]) -> None:
    from vmforge.errors import VmExists
    from vmforge.hypervisors.libvirt.driver import LibvirtDriver
    drv, vm_dir = test_driver
    assert isinstance(drv, LibvirtDriver)
    conn = drv._conn()
    conn.defineXML("<domain type='test'><name>vm1</name><memory>65536</memory>"
                   "<os><type>hvm</type></os></domain>")
    with pytest.raises(VmExists, match="not this vmforge VM's"):
        drv.start(_plan_in(vm_dir), HOST, lambda _r: None)
    assert drv.find("vm1", vm_dir) is None
    drv.cleanup(None, "vm1", vm_dir)
    assert conn.lookupByName("vm1") is not None  # still there
    other = vm_dir.parent / "other"
    other.mkdir()
    drv.start(_plan_in(other, name="vm2"), HOST, lambda _r: None)
    drv.cleanup(None, "vm2", vm_dir)  # vm2 belongs to another VM directory: untouched
    assert drv.find("vm2", other) is not None
