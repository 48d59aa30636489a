"""Cloud Hypervisor backend, pure part: MachinePlan -> the API requests that create and boot
the VM (``PUT /api/v1/vm.create`` with the whole VmConfig, then ``PUT /api/v1/vm.boot``), and
those of snapshot and restore. No I/O here.

Every body is checked in the tests against Cloud Hypervisor's own OpenAPI document (pinned
release, strict: no field the document does not define). Choices:

- Direct kernel boot (``payload.kernel``/``initramfs``/``cmdline``: the uncompressed ``vmlinux``
  boots through PVH), else ``payload.firmware`` (rust-hypervisor-firmware for BIOS-style boot,
  ``CLOUDHV.fd`` for UEFI; the path is a host fact the driver passes in).
- Disks in the plan's order, then the NoCloud seed read-only. ``image_type`` is always given:
  Cloud Hypervisor then never guesses a format from a guest-writable header, and a qcow2
  overlay gets ``backing_files`` (its backing file is the library's read-only blob).
- NICs: the tap vmforge made and plugged into the bridge (``NicPlan.tap``); no ``ip``/``mask``,
  so Cloud Hypervisor leaves the existing tap's configuration alone. There is no user-mode
  networking: a plain user-mode NIC (the spec's default) is left out (``_apiplan.tap_nics``).
- The serial port (``ttyS0``) goes to the console log; the virtio console is off.
- The agent: a vsock device in hybrid mode, backed by a unix socket on which the host writes
  ``CONNECT <port>``. The CID is local to that socket, so it is always 3.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import SpecError
from .._apiplan import refuse_unsupported, tap_nics
from ..base import ApiRequest
from ..plan import MachinePlan

__all__ = ["API", "api_socket", "vsock_socket", "vm_create_body", "boot_requests",
           "snapshot_requests", "restore_requests", "load_requests", "rewrite_config",
           "GUEST_CID", "MAX_VCPUS", "NAME"]

NAME = "cloud-hypervisor"
API = "/api/v1"  # the document's server base path
GUEST_CID = 3
MAX_VCPUS = 255  # CpusConfig.max_vcpus: u8 (Backend.CLOUD_HYPERVISOR.max_vcpus, checked first)


def api_socket(run_dir: str) -> str:
    return str(Path(run_dir) / "ch-api.sock")


def vsock_socket(run_dir: str) -> str:
    return str(Path(run_dir) / "vsock.sock")


def _payload(plan: MachinePlan, firmware: str | None) -> dict[str, str]:
    if plan.kernel is not None:
        payload = {"kernel": plan.kernel.kernel}
        if plan.kernel.initrd:
            payload["initramfs"] = plan.kernel.initrd
        if plan.kernel.cmdline:
            payload["cmdline"] = plan.kernel.cmdline
        return payload
    if not firmware:
        raise SpecError(f"{NAME} needs a kernel or a firmware file to boot", field="spec.kernel",
                        hint="give spec.kernel (or a library image that carries its kernel)")
    return {"firmware": firmware}


def vm_create_body(plan: MachinePlan, firmware: str | None = None) -> dict[str, object]:
    """The VmConfig of ``vm.create``. ``firmware``: the firmware file for a plan without a
    kernel (the driver knows where the host has it)."""
    refuse_unsupported(plan, NAME)
    if plan.cpu_cores > MAX_VCPUS:
        raise SpecError(f"{NAME} runs at most {MAX_VCPUS} vCPUs", field="spec.cpu_cores")
    disks: list[dict[str, object]] = []
    for d in plan.disks:
        disk: dict[str, object] = {"id": d.id, "path": d.path, "serial": d.id[:20]}
        if d.format == "qcow2":
            disk.update(image_type="Qcow2", backing_files=True)
        else:
            disk["image_type"] = "Raw"
        disks.append(disk)
    if plan.seed:
        disks.append({"id": "cidata", "path": plan.seed, "readonly": True, "serial": "cidata",
                      "image_type": "Raw"})
    body: dict[str, object] = {
        "cpus": {"boot_vcpus": plan.cpu_cores, "max_vcpus": plan.cpu_cores},
        "memory": {"size": plan.memory_mib * 1024 * 1024},
        "payload": _payload(plan, firmware),
    }
    if disks:
        body["disks"] = disks
    nics = tap_nics(plan, NAME)
    if nics:
        nets: list[dict[str, object]] = []
        for nic in nics:
            net: dict[str, object] = {"id": nic.id, "tap": nic.tap}
            if nic.mac:
                net["mac"] = nic.mac
            nets.append(net)
        body["net"] = nets
    body["rng"] = {"src": "/dev/urandom"}
    body["serial"] = {"mode": "File", "file": plan.console_log}
    body["console"] = {"mode": "Off"}
    if plan.agent is not None:
        body["vsock"] = {"cid": GUEST_CID, "socket": vsock_socket(plan.run_dir)}
    return body


def boot_requests(plan: MachinePlan, firmware: str | None = None) -> list[ApiRequest]:
    """Create, then boot: the order Cloud Hypervisor requires (boot needs a created VM)."""
    return [ApiRequest("PUT", f"{API}/vm.create", vm_create_body(plan, firmware)),
            ApiRequest("PUT", f"{API}/vm.boot")]


def snapshot_requests(dest_dir: str, resume: bool = True) -> list[ApiRequest]:
    """Pause (a snapshot needs a paused VM), snapshot into ``dest_dir`` (config, memory and
    device state files), and resume unless the caller wants the VM left paused."""
    reqs = [ApiRequest("PUT", f"{API}/vm.pause"),
            ApiRequest("PUT", f"{API}/vm.snapshot",
                       {"destination_url": Path(dest_dir).absolute().as_uri()})]
    if resume:
        reqs.append(ApiRequest("PUT", f"{API}/vm.resume"))
    return reqs


def restore_requests(src_dir: str) -> list[ApiRequest]:
    """In a fresh VMM (no VM created): restore from ``src_dir``, then resume (the VM comes back
    paused; ``vm.resume`` is understood by every version, the body's ``resume`` is newer)."""
    return [ApiRequest("PUT", f"{API}/vm.restore",
                       {"source_url": Path(src_dir).absolute().as_uri(), "prefault": False}),
            ApiRequest("PUT", f"{API}/vm.resume")]


def load_requests(src_dir: str) -> list[ApiRequest]:
    """In a VMM with no VM: restore from ``src_dir`` and leave the VM paused (vmforge's
    snapshots resume it once the disks and the identity are settled)."""
    return [ApiRequest("PUT", f"{API}/vm.restore",
                       {"source_url": Path(src_dir).absolute().as_uri(), "prefault": False})]


def rewrite_config(saved: dict[str, object], body: dict[str, object]) -> dict[str, object]:
    """A snapshot's ``config.json`` with another VM's own files: each disk's path and each
    NIC's tap (matched by device id: the device state in ``state.json`` is keyed by it), the
    vsock socket and the serial file, from that VM's ``vm_create_body``. Everything else
    (device model, sizes, MACs, the payload) stays as saved: it is the saved VM's hardware."""
    out: dict[str, object] = json.loads(json.dumps(saved))
    for key, field in (("disks", "path"), ("net", "tap")):
        own, devs = body.get(key), out.get(key)
        mine = {str(d["id"]): d for d in (own if isinstance(own, list) else [])
                if isinstance(d, dict)}
        for dev in devs if isinstance(devs, list) else []:
            if isinstance(dev, dict) and str(dev.get("id")) in mine:
                dev[field] = mine[str(dev["id"])][field]
            elif isinstance(dev, dict):
                raise SpecError(f"the saved VM has {key} device {dev.get('id')!r}, which this "
                                "VM's spec lacks", field="spec")
    vsock, own_vsock = out.get("vsock"), body.get("vsock")
    if isinstance(vsock, dict) and isinstance(own_vsock, dict):
        vsock["socket"] = own_vsock["socket"]
    serial, own_serial = out.get("serial"), body.get("serial")
    if isinstance(serial, dict) and isinstance(own_serial, dict) and \
            serial.get("mode") == "File":
        serial["file"] = own_serial["file"]
    return out
