"""The hypervisor seam: registry, capability checks, accel choice, pinned images, plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmforge.errors import HostError, SpecError
from vmforge.hypervisors import get_driver
from vmforge.hypervisors.base import (
    Accel,
    AgentEndpoint,
    Backend,
    Capabilities,
    EndpointKind,
    Runtime,
)
from vmforge.hypervisors.host import KvmVerdict, choose_accel
from vmforge.node import plan as planmod
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir
from vmforge.spec import DiskFormat, Firmware, Machine, parse_request

from ..fakes import fake_host

RAW_ONLY = Capabilities(backend=Backend.FIRECRACKER, machines=frozenset({Machine.MICROVM}),
                        firmware=frozenset({Firmware.BIOS}),
                        disk_formats=frozenset({DiskFormat.RAW}), cdroms=False, needs_kvm=True,
                        agent_transports=frozenset({"hybrid-vsock"}), user_net_forwards=False)


def test_capability_errors_name_the_field() -> None:
    cases = [
        ({"machine": "microvm", "disks": [{"id": "root", "size_gib": 1}]},
         r"spec\.disks\[0\]\.format: firecracker boots raw disks only"),
        ({"machine": "q35"}, "spec.machine: firecracker does not support machine q35"),
        ({"machine": "microvm", "nics": [{"forwards": [{"host_port": 1, "guest_port": 2}]}]},
         r"spec\.nics\[0\]\.forwards"),
        ({"machine": "microvm", "agent": {"transport": "virtio-serial"}},
         "spec.agent.transport"),
    ]
    for spec, message in cases:
        req = parse_request({"name": "vm1", "spec": spec})
        with pytest.raises(SpecError, match=message):
            planmod.check_capabilities(req, RAW_ONLY)
    ok = parse_request({"name": "vm1", "spec": {"machine": "microvm", "disks": [
        {"id": "root", "size_gib": 1, "format": "raw"}]}})
    planmod.check_capabilities(ok, RAW_ONLY)


def test_qemu_capabilities_accept_every_spec_shape() -> None:
    caps = get_driver(Backend.QEMU).capabilities()
    assert caps.machines == frozenset(Machine) and caps.cdroms and caps.user_net_forwards
    json.dumps(caps.to_json())  # served to clients as JSON


def test_backends_without_a_driver_are_a_host_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmforge import hypervisors
    monkeypatch.delitem(hypervisors.DRIVERS, Backend.FIRECRACKER)
    monkeypatch.delitem(hypervisors._cache, Backend.FIRECRACKER, raising=False)
    with pytest.raises(HostError, match="firecracker"):
        get_driver("firecracker")


def test_accel_is_chosen_per_vm_not_pinned_by_the_first_probe() -> None:
    tcg_host = fake_host()
    assert choose_accel("auto", tcg_host)[0] is Accel.TCG
    with pytest.raises(HostError, match="KVM was requested"):
        choose_accel("kvm", tcg_host)
    kvm_host = fake_host(kvm=KvmVerdict(True, "booted"))
    assert choose_accel("tcg", kvm_host)[0] is Accel.TCG  # asking for TCG does not change
    assert choose_accel("auto", kvm_host)[0] is Accel.KVM  # ... what later specs get
    assert choose_accel("kvm", kvm_host)[0] is Accel.KVM


def test_runtime_and_endpoint_round_trip() -> None:
    rt = Runtime(Backend.QEMU, Accel.TCG, "/d/qmp.sock",
                 AgentEndpoint(EndpointKind.VSOCK, cid=7, port=1024), pid=5, marker="/d/qmp.sock",
                 extra={"console": "/d/console.log"})
    assert Runtime.from_json(rt.to_json()) == rt
    assert str(rt.agent) == "vsock:7:1024"
    assert str(AgentEndpoint(EndpointKind.HYBRID_VSOCK, path="/d/v.sock", port=1024)) == \
        "hvsock:/d/v.sock:1024"


def _manager(tmp_path: Path) -> tuple[VmManager, Path]:
    m = VmManager(DataDir(tmp_path / "data"), host=fake_host())
    k1 = tmp_path / "k1"
    k1.write_bytes(b"kernel one")
    m.library.add("minimal", {"kernel": k1, "vmlinux": k1, "initrd": k1}, kind="kernel")
    return m, k1


def test_start_boots_the_pinned_image_not_the_newest(tmp_path: Path) -> None:
    m, _ = _manager(tmp_path)
    m.create(parse_request({"name": "pin", "spec": {"kernel": {"image": "minimal"}}}))
    first = m.library.find("minimal:1")
    assert first is not None
    k2 = tmp_path / "k2"
    k2.write_bytes(b"kernel two")
    m.library.add("minimal", {"kernel": k2, "vmlinux": k2, "initrd": k2}, kind="kernel")
    rec = m.get("pin")
    inputs = planmod.pinned_inputs(rec.req, m.library, m._pins("pin"))
    assert inputs.kernel_image is not None and inputs.kernel_image.ref == "minimal:1"
    mp = planmod.machine_plan(rec.req, inputs, rec.paths, fake_host(), Accel.TCG)
    assert mp.kernel is not None and mp.kernel.kernel == str(first.path("vmlinux"))
    from vmforge.errors import ImageError
    with pytest.raises(ImageError, match="in use"):  # the pinned version cannot be removed
        m.library.remove("minimal:1")


def test_plan_shows_argv_images_and_seed_without_creating_anything(tmp_path: Path) -> None:
    m, _ = _manager(tmp_path)
    req = parse_request({"name": "p1", "spec": {
        "kernel": {"image": "minimal"}, "cloud_init": {"user_data": "#cloud-config\n{}\n"}}})
    p = m.plan(req)
    assert p["backend"] == "qemu" and isinstance(p["argv"], list)
    assert p["argv"][0] == "qemu-system-x86_64" and "-kernel" in p["argv"]
    assert p["images"] == {"kernel": "minimal:1"}
    assert "user-data" in p["seed"] and "meta-data" in p["seed"]
    json.dumps(p)
    assert m.vms() == [] and not (m.data.vms / "p1").exists()


def test_the_manager_never_imports_a_backend_module() -> None:
    import ast

    import vmforge.node.manager as manager_module
    tree = ast.parse(Path(manager_module.__file__).read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    backends = [m for m in imported if any(b in m for b in ("qemu", "libvirt", "firecracker",
                                                              "cloud_hypervisor"))]
    assert backends == []


def test_plan_for_libvirt_gives_domain_xml_without_a_daemon(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("VMFORGE_LIBVIRT_URI", "qemu:///nonexistent-socket")
    m, _ = _manager(tmp_path)
    req = parse_request({"name": "p2", "spec": {"hypervisor": "libvirt",
                                                "kernel": {"image": "minimal"}}})
    p = m.plan(req)
    assert p["backend"] == "libvirt" and "argv" not in p
    assert p["domain_xml"].startswith("<domain") and "<name>p2</name>" in p["domain_xml"]
    assert "org.vmforge.agent.0" in p["domain_xml"]


def test_kvm_only_backends_are_refused_at_create_where_kvm_does_not_work(tmp_path: Path
                                                                         ) -> None:
    m, _ = _manager(tmp_path)
    for backend in ("cloud-hypervisor", "firecracker"):
        req = parse_request({"name": "k1", "spec": {"hypervisor": backend, "machine": "microvm",
                                                    "kernel": {"image": "minimal"}}})
        with pytest.raises(HostError, match=f"{backend} runs on KVM only"):
            m.create(req)
        assert m.vms() == [] and not (m.data.vms / "k1").exists()
        assert m.plan(req)["backend"] == backend  # planning needs no KVM


def test_firmware_boot_is_refused_where_the_backend_has_none() -> None:
    caps = Capabilities(backend=Backend.FIRECRACKER, machines=frozenset({Machine.MICROVM}),
                        firmware=frozenset({Firmware.BIOS}),
                        disk_formats=frozenset({DiskFormat.RAW}), cdroms=False, needs_kvm=True,
                        agent_transports=frozenset({"hybrid-vsock"}), user_net_forwards=False,
                        firmware_boot=False)
    req = parse_request({"name": "vm1", "spec": {"machine": "microvm", "disks": [
        {"id": "root", "size_gib": 1, "format": "raw", "bootable": True}]}})
    with pytest.raises(SpecError, match="spec.kernel: firecracker boots a kernel directly only"):
        planmod.check_capabilities(req, caps)
