from __future__ import annotations

import pytest

from vmforge.errors import HostError
from vmforge.hypervisors.base import Accel
from vmforge.hypervisors.host import HostFacts
from vmforge.hypervisors.plan import MachinePlan
from vmforge.hypervisors.qemu.render import qemu_argv
from vmforge.images.library import Image
from vmforge.node.plan import Inputs, machine_plan
from vmforge.paths import VmPaths
from vmforge.spec import VmRequest, parse_request

from ..fakes import fake_host
from ..golden import check_golden

HOST = fake_host(tsc_khz=2600000)
MINIMAL = Image(id=1, name="minimal", version=1, kind="kernel", format=None,
                files={"kernel": "k", "vmlinux": "v", "initrd": "i"}, cmdline="console=ttyS0",
                parent_id=None, source=None, recipe={"agent": True}, size=0, virtual_size=None,
                created_at=0, paths={"kernel": "/lib/blobs/k", "vmlinux": "/lib/blobs/v",  # type: ignore[dict-item]
                                     "initrd": "/lib/blobs/i"})
PATHS = VmPaths(__import__("pathlib").Path("/data/vms/vm1"))


def launch_plan(req: VmRequest, inputs: Inputs, paths: VmPaths, host: HostFacts,
                accel: Accel = Accel.TCG) -> MachinePlan:
    return machine_plan(req, inputs, paths, host, accel)


def plan_for(spec: dict[str, object], kernel_image: Image | None = None,
             accel: Accel = Accel.TCG) -> MachinePlan:
    req = parse_request({"name": "vm1", "spec": spec})
    return launch_plan(req, Inputs({}, kernel_image), PATHS, HOST, accel)


def golden_argv(name: str, plan: MachinePlan, host: HostFacts = HOST) -> list[str]:
    argv = qemu_argv(plan, host)
    check_golden(name, "\n".join(argv) + "\n")
    return argv


def test_minimal_bios_pvh() -> None:
    argv = golden_argv("argv-minimal.txt", plan_for({"kernel": {"image": "minimal"}}, MINIMAL))
    assert argv[argv.index("-kernel") + 1] == "/lib/blobs/v"  # PVH vmlinux
    assert "console=ttyS0 vmforge.id=vm1" in argv
    assert "-daemonize" in argv


def test_minimal_uefi_uses_efi_stub_kernel_and_vars_copy() -> None:
    argv = golden_argv("argv-minimal-uefi.txt",
                       plan_for({"firmware": "FIRMWARE_UEFI", "kernel": {"image": "minimal"}},
                                MINIMAL))
    assert argv[argv.index("-kernel") + 1] == "/lib/blobs/k"
    assert "if=pflash,format=raw,unit=1,file=/data/vms/vm1/OVMF_VARS.fd" in argv


def test_installer_with_cdroms_and_boot_order() -> None:
    argv = golden_argv("argv-installer.txt", plan_for({
        "firmware": "FIRMWARE_UEFI", "boot_order": ["BOOT_DEVICE_CDROM", "BOOT_DEVICE_DISK"],
        "disks": [{"id": "root", "size_gib": 20, "bootable": True}],
        "cdroms": [{"id": "installer", "iso_path": "/isos/inst.iso", "bootable": True},
                   {"id": "drivers", "iso_path": "/isos/drv.iso"}]}))
    joined = " ".join(argv)
    assert "ide-cd,drive=installer,bus=ide.0,bootindex=1" in joined
    assert "drive=root,serial=root,bootindex=2" in joined
    assert "ide-cd,drive=drivers,bus=ide.1 " in joined + " "  # present, not bootable


def test_cloud_disk_with_forwards_and_mac() -> None:
    argv = golden_argv("argv-cloud.txt", plan_for({
        "cpu_cores": 2, "memory_mib": 1024,
        "disks": [{"id": "boot", "size_gib": 10, "bootable": True,
                   "backing_file": "/img/debian.qcow2"}],
        "nics": [{"id": "net0", "mac": "52:54:00:12:34:56",
                  "forwards": [{"host_port": 2222, "guest_port": 22}]}]}))
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22" in argv
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56" in argv


def test_microvm_uses_mmio_and_tsc_hint() -> None:
    argv = golden_argv("argv-microvm.txt", plan_for({"machine": "microvm",
                                                     "kernel": {"image": "minimal"}}, MINIMAL))
    assert any(a.startswith("microvm,x-option-roms=off") for a in argv)
    assert any(a.startswith("virtio-serial-device") for a in argv)
    assert any("tsc_early_khz=2600000" in a for a in argv)


def test_kvm_uses_host_cpu() -> None:
    argv = qemu_argv(plan_for({}, accel=Accel.KVM), HOST)
    assert argv[argv.index("-machine") + 1] == "q35,accel=kvm"
    assert argv[argv.index("-cpu") + 1] == "host"


def test_uefi_without_ovmf_is_a_host_error() -> None:
    no_ovmf = fake_host(ovmf_code=None, ovmf_vars=None)
    with pytest.raises(HostError, match="ovmf"):
        qemu_argv(plan_for({"firmware": "uefi", "kernel": {"image": "minimal"}}, MINIMAL),
                  no_ovmf)


def test_pc_machine() -> None:
    argv = golden_argv("argv-pc.txt", plan_for({"machine": "pc", "cdroms": [
        {"id": "a", "iso_path": "/a.iso"}, {"id": "b", "iso_path": "/b.iso"},
        {"id": "c", "iso_path": "/c.iso"}]}))
    assert argv[argv.index("-machine") + 1] == "pc,accel=tcg"
    assert "ide-cd,drive=c,bus=ide.1,unit=0" in argv  # two per IDE bus on pc


def test_vsock_transport_when_the_host_has_vhost_vsock() -> None:
    from vmforge.node.plan import agent_vsock_cid
    vsock_host = fake_host(vsock=True)
    req = parse_request({"name": "vm1", "spec": {"kernel": {"image": "minimal"}}})
    plan = launch_plan(req, Inputs({}, MINIMAL), PATHS, vsock_host)
    argv = golden_argv("argv-vsock.txt", plan, vsock_host)
    cid = agent_vsock_cid(req, vsock_host)
    assert cid is not None and cid >= 3
    assert f"vhost-vsock-pci,guest-cid={cid}" in argv
    assert not any("virtserialport" in a for a in argv)  # one transport, not two
    assert agent_vsock_cid(req, HOST) is None  # no /dev/vhost-vsock: virtio-serial


def test_forced_vsock_without_host_support_names_the_field() -> None:
    from vmforge.errors import SpecError
    req = parse_request({"name": "vm1", "spec": {"agent": {"transport": "vsock"},
                                                 "kernel": {"image": "minimal"}}})
    with pytest.raises(SpecError, match="spec.agent.transport"):
        launch_plan(req, Inputs({}, MINIMAL), PATHS, HOST)


def test_vsock_endpoint_parsing() -> None:
    from vmforge.agent.client import parse_vsock
    from vmforge.errors import AgentError
    assert parse_vsock("vsock:42:1024") == (42, 1024)
    with pytest.raises(AgentError, match="vsock:CID:PORT"):
        parse_vsock("vsock:x")


def test_disk_image_with_kernel_boots_directly_unless_firmware_mode() -> None:
    debian = Image(id=2, name="debian", version=1, kind="disk", format="qcow2",
                   files={"disk": "d", "kernel": "k", "initrd": "i"},
                   cmdline="root=LABEL=cloudimg-rootfs ro console=ttyS0", parent_id=None,
                   source=None, recipe={}, size=0, virtual_size=None, created_at=0,
                   paths={"disk": "/lib/d", "kernel": "/lib/k",  # type: ignore[dict-item]
                          "initrd": "/lib/i"})
    from vmforge.node.plan import check_inputs

    class Lib:
        def find(self, ref: str) -> Image:
            return debian

        def check_intact(self, image: Image) -> None:
            pass

    for mode, direct in (("auto", True), ("firmware", False)):
        req = parse_request({"name": "vm1", "spec": {"boot_mode": mode, "disks": [
            {"id": "root", "bootable": True, "image": "debian"}]}})
        inputs = check_inputs(req, Lib())  # type: ignore[arg-type]
        argv = qemu_argv(launch_plan(req, inputs, PATHS, HOST), HOST)
        assert ("-kernel" in argv) is direct
        assert ("root=LABEL=cloudimg-rootfs ro console=ttyS0 vmforge.id=vm1" in argv) is direct
        assert any("drive=root,serial=root,bootindex=1" in a for a in argv) is not direct


def test_network_boot_order_reaches_the_nic() -> None:
    argv = qemu_argv(plan_for({
        "boot_order": ["BOOT_DEVICE_NETWORK", "BOOT_DEVICE_DISK"],
        "disks": [{"id": "root", "size_gib": 10, "bootable": True}]}), HOST)
    assert "virtio-net-pci,netdev=net0,bootindex=1" in argv
    assert any(a.endswith("drive=root,serial=root,bootindex=2") for a in argv)
    plain = qemu_argv(plan_for({"disks": [{"id": "root", "size_gib": 1, "bootable": True}]}),
                      HOST)
    assert "virtio-net-pci,netdev=net0" in plain  # no network boot unless asked
