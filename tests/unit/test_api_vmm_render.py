"""Cloud Hypervisor and Firecracker, the pure part: every request that render produces, for a
matrix of specs, exists in the VMM's own API document (pinned release) with that method, and
its body validates against the document's schema in strict mode; the order is the one the VMM
requires; golden files hold the request lists. No process is started, no binary is needed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from vmforge.errors import SpecError
from vmforge.hypervisors import get_driver
from vmforge.hypervisors.base import Accel, ApiRequest, Backend
from vmforge.hypervisors.cloud_hypervisor import render as ch
from vmforge.hypervisors.cloud_hypervisor.driver import CloudHypervisorDriver
from vmforge.hypervisors.firecracker import render as fc
from vmforge.hypervisors.firecracker.driver import FirecrackerDriver
from vmforge.hypervisors.host import KvmVerdict
from vmforge.hypervisors.plan import DiskPlan, MachinePlan
from vmforge.images.library import Image
from vmforge.net.model import NetMode, Network
from vmforge.node import plan as planmod
from vmforge.node.plan import Inputs, machine_plan
from vmforge.paths import VmPaths
from vmforge.spec import parse_request

from ..fakes import fake_host
from ..golden import check_golden
from ..oracle import DOCS, Oracle

HOST = fake_host(kvm=KvmVerdict(True, "fake host: KVM works"))
PATHS = VmPaths(Path("/data/vms/vm1"))
NETS = {"lan": Network.new("lan", "10.40.0.0/24", NetMode.NAT)}


def _image(name: str, kind: str, files: dict[str, str], cmdline: str, fmt: str | None = None,
           recipe: dict[str, Any] | None = None) -> Image:
    return Image(id=1, name=name, version=1, kind=kind, format=fmt, files=files,
                 cmdline=cmdline, parent_id=None, source=None, recipe=recipe or {}, size=0,
                 virtual_size=None, created_at=0,
                 paths={k: Path(f"/lib/blobs/{v}") for k, v in files.items()})  # type: ignore[arg-type]


MINIMAL = _image("minimal", "kernel", {"kernel": "bzimage", "vmlinux": "vmlinux",
                                       "initrd": "initrd"}, "console=ttyS0 quiet",
                 recipe={"agent": True})
DEBIAN = _image("debian", "disk", {"disk": "debian.qcow2", "kernel": "deb-bzimage",
                                   "vmlinux": "deb-vmlinux", "initrd": "deb-initrd"},
                "root=/dev/vda1 console=ttyS0", fmt="qcow2")
ROOTFS = _image("rootfs", "disk", {"disk": "rootfs.raw", "kernel": "r-bzimage",
                                   "vmlinux": "r-vmlinux"}, "root=/dev/vda rw console=ttyS0",
                fmt="raw")

TAPS = [{"id": "net0", "bridge": "br0", "mac": "52:54:00:12:34:56"},
        {"id": "lan", "network": "lan"}]
USER_DATA = "#cloud-config\nhostname: vm1\n"


def plan_of(spec: dict[str, Any], inputs: Inputs) -> MachinePlan:
    req = parse_request({"name": "vm1", "spec": spec})
    return machine_plan(req, inputs, PATHS, HOST, Accel.KVM, NETS)


# The matrix: (golden name, backend, plan).
CASES: dict[str, tuple[Backend, MachinePlan]] = {
    "ch-minimal": (Backend.CLOUD_HYPERVISOR, plan_of(
        {"kernel": {"image": "minimal"}}, Inputs({}, MINIMAL))),
    "ch-cloud-seed": (Backend.CLOUD_HYPERVISOR, plan_of(
        {"cpu_cores": 2, "memory_mib": 1024,
         "disks": [{"id": "boot", "image": "debian", "size_gib": 10, "bootable": True}],
         "cloud_init": {"user_data": USER_DATA}}, Inputs({"boot": DEBIAN}, DEBIAN))),
    "ch-disks-taps": (Backend.CLOUD_HYPERVISOR, plan_of(
        {"cpu_cores": 4, "memory_mib": 2048,
         "disks": [{"id": "boot", "image": "debian", "bootable": True},
                   {"id": "data", "size_gib": 5, "format": "raw"},
                   {"id": "scratch", "size_gib": 1}],
         "nics": TAPS, "cloud_init": {"user_data": USER_DATA}},
        Inputs({"boot": DEBIAN}, DEBIAN))),
    "ch-firmware-noagent": (Backend.CLOUD_HYPERVISOR, plan_of(
        {"firmware": "FIRMWARE_UEFI", "boot_mode": "firmware", "agent": {"enabled": False},
         "disks": [{"id": "boot", "image": "debian", "bootable": True}]},
        Inputs({"boot": DEBIAN}, None))),
    "fc-minimal": (Backend.FIRECRACKER, plan_of(
        {"machine": "microvm", "kernel": {"image": "minimal"}}, Inputs({}, MINIMAL))),
    # Firecracker's per-VM disks from images are raw copies (machine_plan says format raw).
    "fc-rootfs-seed": (Backend.FIRECRACKER, plan_of(
        {"hypervisor": "firecracker", "machine": "microvm", "cpu_cores": 2, "memory_mib": 512,
         "disks": [{"id": "root", "image": "rootfs", "size_gib": 4, "bootable": True}],
         "cloud_init": {"user_data": USER_DATA}}, Inputs({"root": ROOTFS}, ROOTFS))),
    "fc-disks-taps": (Backend.FIRECRACKER, plan_of(
        {"hypervisor": "firecracker", "machine": "microvm", "cpu_cores": 2,
         "disks": [{"id": "root", "image": "rootfs", "bootable": True},
                   {"id": "data", "size_gib": 5, "format": "raw"}],
         "nics": TAPS}, Inputs({"root": ROOTFS}, ROOTFS))),
    "fc-noagent": (Backend.FIRECRACKER, plan_of(
        {"machine": "microvm", "kernel": {"image": "minimal", "cmdline": "console=ttyS0 reboot=t"},
         "agent": {"enabled": False}}, Inputs({}, MINIMAL))),
}


def oracle_for(backend: Backend) -> Oracle:
    return Oracle("cloud-hypervisor" if backend is Backend.CLOUD_HYPERVISOR else "firecracker")


def requests_of(backend: Backend, plan: MachinePlan) -> list[ApiRequest]:
    rendered = get_driver(backend).render(plan, HOST)
    assert rendered.requests is not None and rendered.argv is None
    return rendered.requests


def as_text(reqs: list[ApiRequest]) -> str:
    return json.dumps([r.to_json() for r in reqs], indent=2) + "\n"


def test_oracles_are_the_pinned_releases() -> None:
    pinned = {"cloud-hypervisor.yaml":
              "004e2d5ab70d9d95a1de3289a70ca116c7592da62765e009232c85506cd0e6c4",
              "firecracker.yaml":
              "a514abec7b29700c5ca8bdaebbb960e4ffb46fe1fd4869094c6c63630a6fa41c"}
    for name, digest in pinned.items():
        assert hashlib.sha256((DOCS / name).read_bytes()).hexdigest() == digest
    assert Oracle("cloud-hypervisor").doc["info"]["version"] == "0.3.0"
    assert Oracle("firecracker").doc["info"]["version"] == "1.16.1"


def test_strict_mode_catches_what_the_documents_allow() -> None:
    """Neither document forbids unknown fields; the strict oracle does, so a typo fails."""
    body = {"payload": {"kernel": "/k"}, "cpus": {"boot_vcpu": 1, "max_vcpus": 1}}
    assert Oracle("cloud-hypervisor", strict=False).errors("PUT", "/api/v1/vm.create",
                                                           {"payload": {"kernel": "/k"},
                                                            "cpuz": 1}) == []
    errs = Oracle("cloud-hypervisor").errors("PUT", "/api/v1/vm.create", body)
    assert any("boot_vcpu" in e for e in errs) and any("boot_vcpus" in e for e in errs)
    fco = Oracle("firecracker")
    assert fco.errors("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/s"})  # CID >= 3
    assert fco.errors("PUT", "/machine-config", {"vcpu_count": 1})  # mem_size_mib required
    assert fco.errors("PUT", "/actions", {"action_type": "Start"})  # enum
    assert fco.errors("GET", "/drives/x", None)  # no such method
    assert fco.errors("PUT", "/boot-source", None)  # a required body


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_request_is_in_the_document_and_validates(name: str) -> None:
    backend, plan = CASES[name]
    reqs = requests_of(backend, plan)
    oracle = oracle_for(backend)
    for r in reqs:
        oracle.check(r.method, r.path, r.body)
    check_golden(f"requests-{name}.json", as_text(reqs))


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("ch-")))
def test_cloud_hypervisor_order_and_contents(name: str) -> None:
    _, plan = CASES[name]
    reqs = requests_of(Backend.CLOUD_HYPERVISOR, plan)
    assert [(r.method, r.path) for r in reqs] == [("PUT", "/api/v1/vm.create"),
                                                 ("PUT", "/api/v1/vm.boot")]
    body = reqs[0].body
    assert body["cpus"] == {"boot_vcpus": plan.cpu_cores, "max_vcpus": plan.cpu_cores}
    assert body["memory"]["size"] == plan.memory_mib << 20
    assert body["serial"] == {"mode": "File", "file": "/data/vms/vm1/console.log"}
    disks = body.get("disks", [])
    assert [d["id"] for d in disks] == [d.id for d in plan.disks] + (["cidata"] if plan.seed
                                                                      else [])
    for d in disks:
        if d["image_type"] == "Qcow2":
            assert d["backing_files"] is True  # the overlay's backing file is the library blob
    if plan.seed:
        assert disks[-1] == {"id": "cidata", "path": "/data/vms/vm1/seed.iso", "readonly": True,
                             "serial": "cidata", "image_type": "Raw"}
    if plan.agent:
        assert body["vsock"] == {"cid": 3, "socket": "/data/vms/vm1/vsock.sock"}
    else:
        assert "vsock" not in body
    if plan.kernel:
        assert body["payload"]["kernel"].endswith("vmlinux")  # PVH: the uncompressed kernel
    else:
        assert body["payload"] == {"firmware": "/usr/share/cloud-hypervisor/CLOUDHV.fd"}


def test_cloud_hypervisor_taps_without_addresses() -> None:
    _, plan = CASES["ch-disks-taps"]
    nets = requests_of(Backend.CLOUD_HYPERVISOR, plan)[0].body["net"]
    assert [n["tap"] for n in nets] == [n.tap for n in plan.nics]
    assert nets[0]["mac"] == "52:54:00:12:34:56"
    assert all("ip" not in n and "mask" not in n for n in nets)  # the tap is on a bridge


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("fc-")))
def test_firecracker_order_and_contents(name: str) -> None:
    _, plan = CASES[name]
    reqs = requests_of(Backend.FIRECRACKER, plan)
    paths = [r.path for r in reqs]
    assert all(r.method == "PUT" for r in reqs)
    assert paths[0] == "/logger" and paths[1] == "/boot-source" and \
        paths[2] == "/machine-config"
    assert reqs[-1] == ApiRequest("PUT", "/actions", {"action_type": "InstanceStart"})
    assert paths.count("/actions") == 1  # every pre-boot call comes before InstanceStart
    drives = [r.body for r in reqs if r.path.startswith("/drives/")]
    assert [d["drive_id"] for d in drives] == [d.id for d in plan.disks] + (
        ["cidata"] if plan.seed else [])
    for r in reqs:
        if r.path.startswith(("/drives/", "/network-interfaces/")):
            key = "drive_id" if r.path.startswith("/drives/") else "iface_id"
            assert r.path.rsplit("/", 1)[1] == r.body[key]  # Firecracker checks the pair
    assert all(d["is_root_device"] is False for d in drives)
    if plan.seed:
        assert drives[-1]["is_read_only"] is True
    boot = reqs[1].body
    assert boot["kernel_image_path"].endswith("vmlinux")
    words = boot["boot_args"].split()
    assert "panic=1" in words and "pci=off" in words
    assert ("/vsock" in paths) == (plan.agent is not None)


def test_firecracker_keeps_the_spec_s_own_cmdline_tokens() -> None:
    _, plan = CASES["fc-noagent"]
    words = requests_of(Backend.FIRECRACKER, plan)[1].body["boot_args"].split()
    assert "reboot=t" in words and "reboot=k" not in words
    assert fc.boot_args("a reboot=k b") == "a reboot=k b panic=1 pci=off"


def test_the_default_user_nic_is_left_out_and_forwards_are_refused() -> None:
    _, plan = CASES["ch-minimal"]
    assert plan.nics and not plan.nics[0].tap  # the spec's default net0 (user mode)
    assert "net" not in requests_of(Backend.CLOUD_HYPERVISOR, plan)[0].body
    forwarded = plan_of({"kernel": {"image": "minimal"},
                         "nics": [{"forwards": [{"host_port": 2222, "guest_port": 22}]}]},
                        Inputs({}, MINIMAL))
    for backend in (Backend.CLOUD_HYPERVISOR, Backend.FIRECRACKER):
        with pytest.raises(SpecError, match=r"spec\.nics\[0\]\.forwards"):
            requests_of(backend, replace(forwarded, machine=plan.machine))


def test_firecracker_refuses_what_it_cannot_boot() -> None:
    _, good = CASES["fc-minimal"]
    qcow = plan_of({"machine": "microvm",
                    "disks": [{"id": "root", "image": "rootfs", "bootable": True}]},
                   Inputs({"root": ROOTFS}, ROOTFS))
    with pytest.raises(SpecError, match=r"spec\.disks\[0\]\.format: firecracker boots raw "
                                        r"disks only"):
        requests_of(Backend.FIRECRACKER, qcow)
    with pytest.raises(SpecError, match=r"spec\.kernel: firecracker boots a kernel directly"):
        requests_of(Backend.FIRECRACKER, replace(good, kernel=None))
    with pytest.raises(SpecError, match=r"spec\.cpu_cores: firecracker runs at most 32"):
        requests_of(Backend.FIRECRACKER, replace(good, cpu_cores=33))
    with pytest.raises(SpecError, match=r"spec\.cdroms\[0\]"):
        from vmforge.hypervisors.plan import CdromPlan
        requests_of(Backend.FIRECRACKER, replace(good, cdroms=(CdromPlan("c", "/c.iso"),)))


def test_capability_check_names_the_field() -> None:
    fcaps = FirecrackerDriver().capabilities()
    chcaps = CloudHypervisorDriver().capabilities()
    assert fcaps.needs_kvm and chcaps.needs_kvm
    assert fcaps.agent_transports == chcaps.agent_transports == frozenset({"hybrid-vsock"})
    image = parse_request({"name": "vm1", "spec": {
        "machine": "microvm", "kernel": {"image": "minimal"},
        "disks": [{"id": "root", "image": "rootfs", "bootable": True}]}})
    planmod.check_capabilities(image, fcaps)  # Firecracker gets a raw copy of the image
    planmod.check_capabilities(image, chcaps)  # Cloud Hypervisor opens qcow2 overlays
    blank = parse_request({"name": "vm1", "spec": {
        "machine": "microvm", "kernel": {"image": "minimal"},
        "disks": [{"id": "data", "size_gib": 1}]}})
    with pytest.raises(SpecError, match=r"^spec\.disks\[0\]\.format: firecracker boots raw "
                                        r"disks only, and blank disk data is qcow2\n  hint: "
                                        r"format: raw"):
        planmod.check_capabilities(blank, fcaps)
    planmod.check_capabilities(blank, chcaps)
    cases = [({"machine": "q35"}, fcaps, r"spec\.machine: firecracker does not support"),
             ({"machine": "pc"}, chcaps, r"spec\.machine: cloud-hypervisor does not support"),
             ({"cdroms": [{"id": "c", "iso_path": "/etc/hostname"}]}, chcaps,
              r"spec\.cdroms\[0\]"),
             ({"machine": "microvm", "agent": {"transport": "virtio-serial"}}, fcaps,
              r"spec\.agent\.transport"),
             ({"nics": [{"forwards": [{"host_port": 1, "guest_port": 2}]}]}, chcaps,
              r"spec\.nics\[0\]\.forwards")]
    for spec, caps, message in cases:
        with pytest.raises(SpecError, match=message):
            planmod.check_capabilities(parse_request({"name": "vm1", "spec": spec}), caps)
    json.dumps(fcaps.to_json())


def test_ch_machine_and_firmware_maps() -> None:
    _, plan = CASES["ch-minimal"]
    assert plan.machine.value == "q35"  # the default machine maps onto Cloud Hypervisor's one
    bios = replace(plan, kernel=None, disks=(DiskPlan("boot", "/d/boot.qcow2"),))
    body = ch.vm_create_body(bios, "/fw/hypervisor-fw")
    assert body["payload"] == {"firmware": "/fw/hypervisor-fw"}
    with pytest.raises(SpecError, match="needs a kernel or a firmware"):
        ch.vm_create_body(bios, None)


SNAPSHOTS = {
    "ch": (Backend.CLOUD_HYPERVISOR, ["PUT /api/v1/vm.pause", "PUT /api/v1/vm.snapshot",
                                      "PUT /api/v1/vm.resume"],
           ["PUT /api/v1/vm.restore", "PUT /api/v1/vm.resume"]),
    "fc": (Backend.FIRECRACKER, ["PATCH /vm", "PUT /snapshot/create", "PATCH /vm"],
           ["PUT /logger", "PUT /snapshot/load"]),
}


@pytest.mark.parametrize("key", sorted(SNAPSHOTS))
def test_snapshot_and_restore_requests_validate(key: str) -> None:
    from vmforge.hypervisors._apivmm import SupportsSnapshots
    backend, snap_order, restore_order = SNAPSHOTS[key]
    drv = get_driver(backend)
    assert isinstance(drv, SupportsSnapshots)
    oracle = oracle_for(backend)
    plan = CASES[f"{key}-minimal"][1]
    snap = drv.snapshot_requests("/data/vms/vm1/snapshots/s1")
    restore = drv.restore_requests(plan, "/data/vms/vm1/snapshots/s1")
    for r in snap + restore:
        oracle.check(r.method, r.path, r.body)
    assert [f"{r.method} {r.path}" for r in snap] == snap_order
    assert [f"{r.method} {r.path}" for r in restore] == restore_order
    assert len(drv.snapshot_requests("/s", resume=False)) == len(snap_order) - 1
    check_golden(f"requests-{key}-snapshot.json", as_text(snap + restore))


def test_plan_json_lists_the_requests_without_either_binary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vmforge plan --hypervisor cloud-hypervisor --json` on a machine without the binary."""
    from vmforge.cli.main import app
    from vmforge.node import manager
    from vmforge.node.manager import VmManager
    from vmforge.paths import DataDir
    monkeypatch.setattr(manager, "probe_host", lambda **_kw: fake_host())
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    data = tmp_path / "data"
    m = VmManager(DataDir(data).ensure(), host=fake_host())
    k = tmp_path / "vmlinux"
    k.write_bytes(b"kernel")
    m.library.add("minimal", {"kernel": k, "vmlinux": k, "initrd": k}, kind="kernel",
                  cmdline="console=ttyS0")
    m.close()
    spec = Path(__file__).resolve().parents[2] / "examples" / "minimal.yaml"
    for backend, oracle in (("cloud-hypervisor", Oracle("cloud-hypervisor")),
                            ("firecracker", Oracle("firecracker"))):
        args = ["--data-dir", str(data), "plan", "-f", str(spec), "--hypervisor", backend,
                "--json"]
        if backend == "firecracker":  # the spec does not say microvm: Firecracker refuses
            res = CliRunner().invoke(app, args)
            assert res.exit_code == 2 and "spec.machine: firecracker does not support machine "\
                "q35" in res.output
            micro = tmp_path / "micro.yaml"
            micro.write_text(spec.read_text() + "  machine: microvm\n")
            args[args.index(str(spec))] = str(micro)
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        p = json.loads(res.stdout)
        assert p["backend"] == backend and "argv" not in p
        assert all(set(r) == {"method", "path", "body"} for r in p["requests"])
        for r in p["requests"]:
            oracle.check(r["method"], r["path"], r["body"])
        assert p["capabilities"]["needs_kvm"] is True


def test_plan_human_output_lists_requests_with_bodies_only_where_there_is_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmforge.cli.main import app
    from vmforge.node import manager
    from vmforge.node.manager import VmManager
    from vmforge.paths import DataDir
    monkeypatch.setattr(manager, "probe_host", lambda **_kw: fake_host())
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("COLUMNS", "200")
    data = tmp_path / "data"
    m = VmManager(DataDir(data).ensure(), host=fake_host())
    k = tmp_path / "vmlinux"
    k.write_bytes(b"kernel")
    m.library.add("minimal", {"kernel": k, "vmlinux": k, "initrd": k}, kind="kernel",
                  cmdline="console=ttyS0")
    m.close()
    spec = tmp_path / "micro.yaml"
    spec.write_text("name: demo\nspec:\n  machine: microvm\n  kernel:\n    image: minimal\n")
    res = CliRunner().invoke(app, ["--data-dir", str(data), "plan", "-f", str(spec),
                                   "--hypervisor", "cloud-hypervisor"])
    assert res.exit_code == 0, res.output
    assert "null" not in res.output
    lines = res.output.splitlines()
    create = lines.index(" 1. PUT /api/v1/vm.create")
    assert lines[create + 1] == "      {" and '        "cpus": {' in lines
    assert lines[-1] == " 2. PUT /api/v1/vm.boot"  # no body: nothing after it
    body = json.loads("\n".join(lines[create + 1:-1]))
    Oracle("cloud-hypervisor").check("PUT", "/api/v1/vm.create", body)
    res = CliRunner().invoke(app, ["--data-dir", str(data), "plan", "-f", str(spec),
                                   "--hypervisor", "firecracker"])
    assert res.exit_code == 0, res.output
    steps = [line for line in res.output.splitlines() if line[:3].strip().rstrip(".")
             .isdigit()]
    assert steps[0] == " 1. PUT /logger" and steps[-1].endswith(". PUT /actions")
    assert '        "action_type": "InstanceStart"' in res.output and "null" not in res.output


def test_backend_limits_are_refused_with_the_field() -> None:
    fcaps = FirecrackerDriver().capabilities()
    chcaps = CloudHypervisorDriver().capabilities()
    qcaps = get_driver(Backend.QEMU).capabilities()

    def req(spec: dict[str, Any]) -> Any:
        return parse_request({"name": "vm1", "spec": {"machine": "microvm",
                                                      "kernel": {"image": "minimal"}, **spec}})
    with pytest.raises(SpecError, match=r"^spec\.cpu_cores: firecracker runs at most 32 vCPUs, "
                                        r"and the spec asks for 33\n  hint: cpu_cores: 32"):
        planmod.check_capabilities(req({"cpu_cores": 33}), fcaps)
    planmod.check_capabilities(req({"cpu_cores": 32}), fcaps)
    planmod.check_capabilities(req({"cpu_cores": 33}), chcaps)
    with pytest.raises(SpecError, match=r"^spec\.cpu_cores: cloud-hypervisor runs at most 255"):
        planmod.check_capabilities(req({"cpu_cores": 256}), chcaps)
    planmod.check_capabilities(req({"cpu_cores": 256}), qcaps)
    assert (fc.MAX_VCPUS, ch.MAX_VCPUS) == (Backend.FIRECRACKER.max_vcpus,
                                            Backend.CLOUD_HYPERVISOR.max_vcpus)
    # The document's own maximum for Firecracker.
    doc = Oracle("firecracker").doc["definitions"]["MachineConfiguration"]
    assert doc["properties"]["vcpu_count"]["maximum"] == fc.MAX_VCPUS


def test_an_explicit_user_mode_nic_is_refused_where_there_are_taps_only() -> None:
    fcaps = FirecrackerDriver().capabilities()
    chcaps = CloudHypervisorDriver().capabilities()

    def req(spec: dict[str, Any]) -> Any:
        return parse_request({"name": "vm1", "spec": {"machine": "microvm",
                                                      "kernel": {"image": "minimal"}, **spec}})
    for caps in (fcaps, chcaps):
        name = caps.backend.value
        for nics in ([{"mode": "user"}], [{"bridge": "br0"}, {"id": "n2"}]):
            i = len(nics) - 1
            with pytest.raises(SpecError, match=rf"^spec\.nics\[{i}\]\.mode: {name} has no "
                                                r"user-mode networking \(it opens taps only\)"
                                                r", and NIC \w+ is user-mode\n  hint: put it "
                                                r"on a network"):
                planmod.check_capabilities(req({"nics": nics}), caps)
        planmod.check_capabilities(req({}), caps)  # the default net0 is left out, not refused
        planmod.check_capabilities(req({"nics": []}), caps)
        planmod.check_capabilities(req({"nics": [{"bridge": "br0"}]}), caps)
    planmod.check_capabilities(req({"machine": "q35", "nics": [{"mode": "user"}]}),
                               get_driver(Backend.QEMU).capabilities())
