"""Firecracker backend, pure part: MachinePlan -> the API requests that configure and start a
microVM, and those of snapshot and restore. No I/O here.

Every body is checked in the tests against Firecracker's own Swagger document (pinned release,
strict: Firecracker itself rejects unknown fields). The order:

1. ``PUT /logger`` first, so that an error in any later call is in Firecracker's log.
2. ``PUT /boot-source``: the uncompressed ``vmlinux`` (Firecracker has no firmware), the
   initrd, and the command line with the tokens Firecracker's guests need appended when absent
   (``reboot=k``: a guest reboot or Ctrl-Alt-Del exits the VMM; ``panic=1``: a panic does too;
   ``pci=off``: there is no PCI bus to probe).
3. ``PUT /machine-config``, ``PUT /drives/{id}`` (the plan's raw disks in order, then the seed
   read-only; none is the "root device": the command line names the root, as it does for the
   other backends), ``PUT /network-interfaces/{id}`` (the tap vmforge made; a plain user-mode NIC is
   left out: there is no user-mode networking), ``PUT /vsock``
   (hybrid: a unix socket that takes ``CONNECT <port>``), ``PUT /entropy``, ``PUT /serial``
   (the console log).
4. ``PUT /actions {"action_type": "InstanceStart"}``: every pre-boot call must come before it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from ...errors import SpecError
from .._apiplan import refuse_unsupported, tap_nics
from ..base import ApiRequest
from ..plan import MachinePlan

__all__ = ["api_socket", "vsock_socket", "log_file", "boot_args", "boot_requests",
           "snapshot_requests", "restore_requests", "load_requests", "drive_list",
           "GUEST_CID", "MAX_VCPUS", "NAME",
           "CMDLINE_TOKENS"]

NAME = "firecracker"
GUEST_CID = 3
MAX_VCPUS = 32  # MachineConfiguration.vcpu_count max (Backend.FIRECRACKER.max_vcpus, checked first)
CMDLINE_TOKENS = ("reboot=k", "panic=1", "pci=off")


def api_socket(run_dir: str) -> str:
    return str(Path(run_dir) / "fc-api.sock")


def vsock_socket(run_dir: str) -> str:
    return str(Path(run_dir) / "vsock.sock")


def log_file(vm_dir: str) -> str:
    return str(Path(vm_dir) / "firecracker.log")


def _path_id(value: str) -> str:
    return quote(value, safe="")


def boot_args(cmdline: str) -> str:
    words = cmdline.split()
    keys = {w.split("=", 1)[0] for w in words}
    extra = [t for t in CMDLINE_TOKENS if t.split("=", 1)[0] not in keys]
    return " ".join(words + extra)


def _refuse_unsupported(plan: MachinePlan) -> None:
    if plan.kernel is None:
        raise SpecError(f"{NAME} boots a kernel directly only (it has no firmware)",
                        field="spec.kernel",
                        hint="give spec.kernel, or a library image that carries its kernel")
    refuse_unsupported(plan, NAME)
    if plan.cpu_cores > MAX_VCPUS:
        raise SpecError(f"{NAME} runs at most {MAX_VCPUS} vCPUs", field="spec.cpu_cores")
    for i, d in enumerate(plan.disks):
        if d.format != "raw":
            raise SpecError(f"{NAME} boots raw disks only", field=f"spec.disks[{i}].format",
                            hint="its per-VM disk is a raw copy of a raw image")


def drive_list(plan: MachinePlan) -> list[tuple[str, str, bool]]:
    """(drive id, file, read-only): the plan's disks in order, then the seed. Files in the
    VM directory are named relative to it (Firecracker runs there): a snapshot records them
    so, and a clone's Firecracker, running in the clone's directory, reopens the clone's own
    files when it loads the snapshot, not the files of the VM it was taken from."""
    drives = [(d.id, drive_path(plan.vm_dir, d.path), False) for d in plan.disks]
    if plan.seed:
        drives.append(("cidata", drive_path(plan.vm_dir, plan.seed), True))
    return drives


def drive_path(vm_dir: str | Path, path: str | Path) -> str:
    """``path`` relative to ``vm_dir`` when it is inside it, else as it is."""
    vm_dir, path = os.path.abspath(vm_dir), os.path.abspath(path)
    if path.startswith(vm_dir + os.sep):
        return os.path.relpath(path, vm_dir)
    return path


def boot_requests(plan: MachinePlan) -> list[ApiRequest]:
    _refuse_unsupported(plan)
    assert plan.kernel is not None  # refused above
    reqs = [ApiRequest("PUT", "/logger", {"log_path": log_file(plan.vm_dir), "level": "Info",
                                          "show_level": True, "show_log_origin": False})]
    boot: dict[str, object] = {"kernel_image_path": plan.kernel.kernel,
                               "boot_args": boot_args(plan.kernel.cmdline)}
    if plan.kernel.initrd:
        boot["initrd_path"] = plan.kernel.initrd
    reqs.append(ApiRequest("PUT", "/boot-source", boot))
    reqs.append(ApiRequest("PUT", "/machine-config", {
        "vcpu_count": plan.cpu_cores, "mem_size_mib": plan.memory_mib, "smt": False}))
    for drive_id, path, readonly in drive_list(plan):
        reqs.append(ApiRequest("PUT", f"/drives/{_path_id(drive_id)}", {
            "drive_id": drive_id, "path_on_host": path, "is_root_device": False,
            "is_read_only": readonly}))
    for nic in tap_nics(plan, NAME):
        iface: dict[str, object] = {"iface_id": nic.id, "host_dev_name": nic.tap}
        if nic.mac:
            iface["guest_mac"] = nic.mac
        reqs.append(ApiRequest("PUT", f"/network-interfaces/{_path_id(nic.id)}", iface))
    if plan.agent is not None:
        reqs.append(ApiRequest("PUT", "/vsock", {"guest_cid": GUEST_CID,
                                                 "uds_path": vsock_socket(plan.run_dir)}))
    reqs.append(ApiRequest("PUT", "/entropy", {}))
    reqs.append(ApiRequest("PUT", "/serial", {"serial_out_path": plan.console_log}))
    reqs.append(ApiRequest("PUT", "/actions", {"action_type": "InstanceStart"}))
    return reqs


def snapshot_requests(dest_dir: str, resume: bool = True) -> list[ApiRequest]:
    """Pause (Firecracker snapshots paused microVMs only), write a full snapshot (device state
    ``vmstate`` and guest memory ``memory`` in ``dest_dir``), resume unless told not to."""
    dest = Path(dest_dir).absolute()
    reqs = [ApiRequest("PATCH", "/vm", {"state": "Paused"}),
            ApiRequest("PUT", "/snapshot/create", {
                "snapshot_type": "Full", "snapshot_path": str(dest / "vmstate"),
                "mem_file_path": str(dest / "memory")})]
    if resume:
        reqs.append(ApiRequest("PATCH", "/vm", {"state": "Resumed"}))
    return reqs


def restore_requests(vm_dir: str, src_dir: str) -> list[ApiRequest]:
    """In a fresh Firecracker: the logger (the only call allowed before a load), then load the
    snapshot and resume. Drives, taps and the vsock socket come back with the paths they had
    (the same VM directory)."""
    src = Path(src_dir).absolute()
    return [ApiRequest("PUT", "/logger", {"log_path": log_file(vm_dir), "level": "Info",
                                          "show_level": True, "show_log_origin": False}),
            ApiRequest("PUT", "/snapshot/load", {
                "snapshot_path": str(src / "vmstate"),
                "mem_backend": {"backend_type": "File", "backend_path": str(src / "memory")},
                "resume_vm": True})]


def load_requests(plan: MachinePlan, src_dir: str) -> list[ApiRequest]:
    """In a fresh Firecracker: the logger, then load the snapshot in ``src_dir`` with this
    VM's own vsock socket (``vsock_override``) and taps (``network_overrides``), paused; then
    point every drive at this VM's own file (``PATCH /drives``, allowed once a snapshot is
    loaded) before the guest runs again. Firecracker reopens the saved drive paths at the
    load itself, relative to its working directory: this VM's own directory."""
    _refuse_unsupported(plan)
    src = Path(src_dir).absolute()
    load: dict[str, object] = {
        "snapshot_path": str(src / "vmstate"),
        "mem_backend": {"backend_type": "File", "backend_path": str(src / "memory")},
        "resume_vm": False}
    if plan.agent is not None:
        load["vsock_override"] = {"uds_path": vsock_socket(plan.run_dir)}
    overrides = [{"iface_id": n.id, "host_dev_name": n.tap} for n in tap_nics(plan, NAME)]
    if overrides:
        load["network_overrides"] = overrides
    reqs = [ApiRequest("PUT", "/logger", {"log_path": log_file(plan.vm_dir), "level": "Info",
                                          "show_level": True, "show_log_origin": False}),
            ApiRequest("PUT", "/snapshot/load", load)]
    for drive_id, path, _readonly in drive_list(plan):
        reqs.append(ApiRequest("PATCH", f"/drives/{_path_id(drive_id)}",
                               {"drive_id": drive_id, "path_on_host": path}))
    return reqs
