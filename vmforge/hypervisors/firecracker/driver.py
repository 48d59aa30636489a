"""Firecracker backend, I/O part: ``firecracker --api-sock PATH --id NAME`` started detached,
then the pre-boot calls and ``InstanceStart``; ``GET /`` for the state; ``SendCtrlAltDel``
(with ``reboot=k`` on the command line the guest's reboot ends the VMM), then SIGTERM, then
SIGKILL to stop. See :mod:`vmforge.hypervisors._apivmm` for the shared parts.

Disks are raw only: a per-VM disk is a sparse or reflinked copy of a raw image
(:func:`vmforge.images.rawcopy.create_raw_copy`), never a qcow2 overlay.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ...enums import Backend, DiskFormat, Firmware, Machine
from ...errors import LaunchError
from ...images.rawcopy import flatten_to_raw, raw_image_of
from ...paths import VmPaths
from .._apisnap import vm_dir_of
from .._apivmm import ApiVmmDriver, sigterm
from .._unixhttp import ApiResponse
from ..base import ApiRequest, Capabilities, Liveness, Runtime
from ..plan import MachinePlan
from . import render as r

__all__ = ["FirecrackerDriver"]

_STATES = {"Running": Liveness.RUNNING, "Paused": Liveness.PAUSED,
           "Not started": Liveness.POWERED_OFF}


class FirecrackerDriver(ApiVmmDriver):
    backend = Backend.FIRECRACKER
    binary_name = "firecracker"
    install_hint = ("install the static binary from "
                    "https://github.com/firecracker-microvm/firecracker/releases on PATH")
    # reboot=k: a guest that reboots (or panics, panic=1) makes Firecracker exit.
    power_off_marks = ("reboot: Power down", "System halted", "reboot: Restarting system")

    def capabilities(self) -> Capabilities:
        return Capabilities(
            backend=self.backend, machines=frozenset({Machine.MICROVM}),
            firmware=frozenset({Firmware.BIOS}), disk_formats=frozenset({DiskFormat.RAW}),
            cdroms=False, needs_kvm=True, agent_transports=frozenset({"hybrid-vsock"}),
            user_net_forwards=False, direct_kernel_boot=True, firmware_boot=False,
            survives_vmforge=True, mounts=False, snapshots=True)

    def boot_requests(self, plan: MachinePlan, host: Any) -> list[ApiRequest]:
        return r.boot_requests(plan)

    def prepare_files(self, plan: MachinePlan) -> None:
        # Firecracker opens its log without creating it.
        os.close(os.open(r.log_file(plan.vm_dir), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         0o600))
        # Snapshots and restores (vmforge.node) put thin qcow2 overlays over raw layers;
        # Firecracker reads raw only: such a disk becomes a raw copy of its layer first.
        for d in plan.disks:
            next_disk(d.path).unlink(missing_ok=True)  # of a switch that never took place
            flatten_to_raw(d.path)

    def api_socket(self, run_dir: str) -> str:
        return r.api_socket(run_dir)

    def vsock_socket(self, run_dir: str) -> str:
        return r.vsock_socket(run_dir)

    def argv(self, binary: str, api_socket: str, name: str) -> list[str]:
        return [binary, "--api-sock", api_socket, "--id", name]

    def ping_request(self) -> ApiRequest:
        return ApiRequest("GET", "/")

    def info_request(self) -> ApiRequest:
        return ApiRequest("GET", "/")

    def power_button_request(self) -> ApiRequest:
        return ApiRequest("PUT", "/actions", {"action_type": "SendCtrlAltDel"})

    def vm_state(self, info: ApiResponse) -> Liveness:
        try:
            data = info.json() if info.ok else None
        except ValueError:
            data = None
        state = data.get("state") if isinstance(data, dict) else None
        return _STATES.get(str(state), Liveness.RUNNING)

    async def ask_to_quit(self, rt: Runtime) -> None:
        await asyncio.to_thread(sigterm, rt.pid, rt.marker)

    def snapshot_requests(self, dest_dir: str, resume: bool = True) -> list[ApiRequest]:
        return r.snapshot_requests(dest_dir, resume)

    def restore_requests(self, plan: MachinePlan, src_dir: str) -> list[ApiRequest]:
        return r.restore_requests(plan.vm_dir, src_dir)

    # -- memory snapshots (vmforge.hypervisors._apisnap)
    def resume_request(self) -> ApiRequest:
        return ApiRequest("PATCH", "/vm", {"state": "Resumed"})

    def saved_extra(self, rt: Runtime) -> dict[str, Any]:
        """The drive files the snapshot names: a load reopens them there (then vmforge points
        each drive at the restored VM's own file)."""
        config = self._send(rt, ApiRequest("GET", "/vm/config"), what="snapshot").json()
        drives = config.get("drives") if isinstance(config, dict) else None
        return {"drives": {str(d.get("drive_id")): d.get("path_on_host")
                           for d in drives or [] if isinstance(d, dict)}}

    def load_requests(self, plan: MachinePlan, host: Any, src_dir: Path,
                      manifest: dict[str, Any]) -> list[ApiRequest]:
        # Drives are named relative to the VM directory (Firecracker runs there), so the load
        # opens this VM's own files; a snapshot from before that names absolute paths.
        gone = [p for p in (manifest.get("drives") or {}).values()
                if p and not (Path(plan.vm_dir) / p).exists()]
        if gone:
            raise LaunchError(f"Firecracker reopens a snapshot's drives where the saved VM had "
                              f"them before vmforge can point them at this VM's own files, and "
                              f"{gone[0]} is gone", hint="restore it while the VM it was taken "
                              "from still has its disks (its directory), or boot cold")
        return r.load_requests(plan, str(src_dir))

    def switch_disks(self, rt: Runtime, overlays: Mapping[str, str]) -> None:
        """Each new overlay P (a thin qcow2 over the raw layer S) is replaced by a raw copy of
        S, in an order that leaves every crash recoverable by ``vmforge.node.snapshots``: the
        copy is made beside P (``next_disk``), Firecracker is pointed at it (``PATCH``; the VM
        is paused, no I/O is in flight), then it is renamed over P (the open file follows)
        and Firecracker is pointed at P again so that its own record names the real path.
        Until the first PATCH, P is still the overlay over S and the VMM writes S (undone);
        after it, the VMM writes the copy, and ``rebase_disk`` finishes the rename."""
        for disk_id, path in overlays.items():
            nxt = next_disk(path)
            nxt.unlink(missing_ok=True)
            raw_image_of(path, nxt)
            vm_dir = vm_dir_of(rt)
            self._patch_drive(rt, disk_id, r.drive_path(vm_dir, nxt))
            os.replace(nxt, path)
            self._patch_drive(rt, disk_id, r.drive_path(vm_dir, path))

    def rebase_disk(self, rt: Runtime, disk: str, backing: str) -> None:
        """Nothing names a backing file in a raw copy; a switch that a crash interrupted
        between pointing Firecracker at the copy and renaming it over the disk is finished."""
        path = VmPaths(vm_dir_of(rt)).disk(disk)
        nxt = next_disk(path)
        if nxt.exists():
            os.replace(nxt, path)
            self._patch_drive(rt, disk, r.drive_path(vm_dir_of(rt), path))

    def _patch_drive(self, rt: Runtime, disk_id: str, path: str) -> None:
        self._send(rt, ApiRequest("PATCH", f"/drives/{quote(disk_id, safe='')}",
                                  {"drive_id": disk_id, "path_on_host": path}),
                   what="disk switch")


def next_disk(path: str | Path) -> Path:
    """Where the raw copy of a switch is made before it takes the disk's name."""
    p = Path(path)
    return p.with_name(f".{p.name}.next")
