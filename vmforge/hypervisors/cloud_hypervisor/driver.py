"""Cloud Hypervisor backend, I/O part: ``cloud-hypervisor --api-socket path=...`` started
detached, then ``vm.create`` and ``vm.boot``; ``vm.info`` for the state; ``vm.power-button``,
then ``vm.shutdown`` + ``vmm.shutdown``, then SIGKILL to stop. Cloud Hypervisor exits when the
guest powers off. See :mod:`vmforge.hypervisors._apivmm` for the shared parts.

Firmware (a plan without a kernel): ``$VMFORGE_CH_FIRMWARE``, else the first of
``FIRMWARE_PATHS`` that exists: rust-hypervisor-firmware (``hypervisor-fw``) for BIOS-style
boot, ``CLOUDHV.fd`` (OVMF built for Cloud Hypervisor; no separate variable store) for UEFI.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ...enums import Backend, DiskFormat, Firmware, Machine
from ...errors import HostError
from .._apisnap import SNAPSHOT_DIR, vm_dir_of
from .._apivmm import API_TIMEOUT, ApiVmmDriver
from .._unixhttp import ApiResponse, call
from ..base import ApiRequest, Capabilities, Liveness, Runtime
from ..plan import MachinePlan
from . import render as r

__all__ = ["CloudHypervisorDriver", "FIRMWARE_PATHS"]

FIRMWARE_PATHS: dict[Firmware, tuple[str, ...]] = {
    Firmware.BIOS: ("/usr/share/cloud-hypervisor/hypervisor-fw",
                    "/usr/local/share/cloud-hypervisor/hypervisor-fw"),
    Firmware.UEFI: ("/usr/share/cloud-hypervisor/CLOUDHV.fd",
                    "/usr/local/share/cloud-hypervisor/CLOUDHV.fd"),
}

_STATES = {"Running": Liveness.RUNNING, "Paused": Liveness.PAUSED,
           "Shutdown": Liveness.POWERED_OFF, "Created": Liveness.POWERED_OFF}


class CloudHypervisorDriver(ApiVmmDriver):
    backend = Backend.CLOUD_HYPERVISOR
    binary_name = "cloud-hypervisor"
    install_hint = ("install the static binary from "
                    "https://github.com/cloud-hypervisor/cloud-hypervisor/releases on PATH")

    def capabilities(self) -> Capabilities:
        # One machine (ACPI, virtio-pci, no legacy ISA devices): q35 and microvm specs map onto
        # it; pc (i440fx, IDE) does not.
        return Capabilities(
            backend=self.backend, machines=frozenset({Machine.Q35, Machine.MICROVM}),
            firmware=frozenset(Firmware), disk_formats=frozenset(DiskFormat), cdroms=False,
            needs_kvm=True, agent_transports=frozenset({"hybrid-vsock"}),
            user_net_forwards=False, direct_kernel_boot=True, firmware_boot=True,
            survives_vmforge=True, mounts=False, snapshots=True)

    def firmware_path(self, firmware: Firmware) -> str:
        """Where this host has the firmware file (the first default when none exists, so a
        plan still shows where it was looked for; ``start`` refuses a missing one)."""
        env = os.environ.get("VMFORGE_CH_FIRMWARE")
        if env:
            return env
        candidates = FIRMWARE_PATHS[firmware]
        return next((p for p in candidates if Path(p).is_file()), candidates[0])

    def boot_requests(self, plan: MachinePlan, host: Any) -> list[ApiRequest]:
        return r.boot_requests(plan, None if plan.kernel else self.firmware_path(plan.firmware))

    def start(self, plan: MachinePlan, host: Any, record: Callable[[Runtime], None]) -> Runtime:
        if plan.kernel is None:
            fw = self.firmware_path(plan.firmware)
            if not Path(fw).is_file():
                raise HostError(f"Cloud Hypervisor's firmware {fw} is not installed",
                                hint="install rust-hypervisor-firmware (BIOS) or CLOUDHV.fd "
                                     "(UEFI), or set VMFORGE_CH_FIRMWARE; or boot a kernel "
                                     "directly (spec.kernel)")
        return super().start(plan, host, record)

    def api_socket(self, run_dir: str) -> str:
        return r.api_socket(run_dir)

    def vsock_socket(self, run_dir: str) -> str:
        return r.vsock_socket(run_dir)

    def argv(self, binary: str, api_socket: str, name: str) -> list[str]:
        return [binary, "--api-socket", f"path={api_socket}"]

    def ping_request(self) -> ApiRequest:
        return ApiRequest("GET", f"{r.API}/vmm.ping")

    def info_request(self) -> ApiRequest:
        return ApiRequest("GET", f"{r.API}/vm.info")

    def power_button_request(self) -> ApiRequest:
        return ApiRequest("PUT", f"{r.API}/vm.power-button")

    def vm_state(self, info: ApiResponse) -> Liveness:
        if not info.ok:  # no VM in this VMM (never created, or deleted)
            return Liveness.POWERED_OFF
        try:
            data = info.json()
        except ValueError:
            return Liveness.RUNNING
        state = data.get("state") if isinstance(data, dict) else None
        return _STATES.get(str(state), Liveness.RUNNING)

    async def ask_to_quit(self, rt: Runtime) -> None:
        # vm.shutdown stops the guest hard but leaves the VMM; vmm.shutdown ends the process.
        await asyncio.to_thread(call, rt.control, "PUT", f"{r.API}/vm.shutdown",
                                timeout=API_TIMEOUT)
        await asyncio.to_thread(call, rt.control, "PUT", f"{r.API}/vmm.shutdown",
                                timeout=API_TIMEOUT)

    def snapshot_requests(self, dest_dir: str, resume: bool = True) -> list[ApiRequest]:
        return r.snapshot_requests(dest_dir, resume)

    def restore_requests(self, plan: MachinePlan, src_dir: str) -> list[ApiRequest]:
        return r.restore_requests(src_dir)

    # -- memory snapshots (vmforge.hypervisors._apisnap)
    def resume_request(self) -> ApiRequest:
        return ApiRequest("PUT", f"{r.API}/vm.resume")

    def load_requests(self, plan: MachinePlan, host: Any, src_dir: Path,
                      manifest: dict[str, Any]) -> list[ApiRequest]:
        """Rewrite the saved ``config.json`` with this VM's files, then ``vm.restore``."""
        cfg = src_dir / "config.json"
        try:
            saved = json.loads(cfg.read_text())
        except (OSError, ValueError) as exc:
            raise HostError(f"the saved state has no readable config.json: {exc}") from exc
        own = r.vm_create_body(plan, None if plan.kernel else self.firmware_path(plan.firmware))
        _write_json(cfg, r.rewrite_config(saved, own))
        return r.load_requests(str(src_dir))

    def switch_disks(self, rt: Runtime, overlays: Mapping[str, str]) -> None:
        """Cloud Hypervisor cannot move a disk onto another file while the VM runs: the paused
        VM (its state just saved) is deleted inside the same VMM process and restored from that
        snapshot, whose ``config.json`` names the new overlays (the same pid and sockets)."""
        if not overlays:
            return
        work = vm_dir_of(rt) / SNAPSHOT_DIR
        cfg = work / "config.json"
        saved = json.loads(cfg.read_text())
        for disk in saved.get("disks") or []:
            if isinstance(disk, dict) and disk.get("id") in overlays:
                disk["path"] = overlays[str(disk["id"])]
        _write_json(cfg, saved)
        self._send(rt, ApiRequest("PUT", f"{r.API}/vm.delete"), what="disk switch")
        if rt.agent is not None and rt.agent.path:  # bound again by the restored device
            Path(rt.agent.path).unlink(missing_ok=True)
        for req in r.load_requests(str(work)):
            self._send(rt, req, what="disk switch")


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
