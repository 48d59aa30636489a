"""From a validated VmRequest to artifacts on disk (overlays, seed, UEFI vars) and a LaunchPlan.

``check_inputs`` runs before anything is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError
from ..hypervisors.host import HostFacts
from ..hypervisors.plan import CdromPlan, DiskPlan, KernelPlan, LaunchPlan
from ..images import qcow2
from ..images.library import Image, Library
from ..paths import VmPaths
from ..spec import BootDevice, Firmware, VmRequest

__all__ = ["Inputs", "check_inputs", "check_host", "prepare_artifacts", "launch_plan",
           "agent_vsock_cid"]


@dataclass(frozen=True)
class Inputs:
    """What a spec refers to, resolved: library images per disk id, and the kernel image."""
    disk_images: dict[str, Image]
    kernel_image: Image | None

    @property
    def images(self) -> list[Image]:
        out = list(self.disk_images.values())
        if self.kernel_image:
            out.append(self.kernel_image)
        return out

    @property
    def agent_baked_in(self) -> bool:
        return any(bool((i.recipe or {}).get("agent")) for i in self.images)


def _must_exist(path: str | None, field: str, what: str) -> None:
    if path and not Path(path).is_file():
        raise SpecError(f"{what} not found: {path}", field=field,
                        hint="give an existing file (relative paths are relative to the spec)")


def check_inputs(req: VmRequest, library: Library) -> Inputs:
    spec = req.spec
    disk_images: dict[str, Image] = {}
    for i, d in enumerate(spec.disks):
        _must_exist(d.backing_file, f"spec.disks[{i}].backing_file", "backing file")
        if d.image:
            img = library.find(d.image)
            if img is None or img.path("disk") is None:
                raise SpecError(f"no disk image {d.image!r} in the library",
                                field=f"spec.disks[{i}].image",
                                hint="see `vmforge image ls`")
            disk_images[d.id] = img
    for i, c in enumerate(spec.cdroms):
        _must_exist(c.iso_path, f"spec.cdroms[{i}].iso_path", "ISO")
    kernel_image = None
    boot = spec.boot_disk
    if not spec.kernel and spec.boot_mode == "auto" and boot is not None and \
            boot.id in disk_images and disk_images[boot.id].path("kernel") is not None:
        # A library disk image that carries its kernel boots directly from it.
        kernel_image = disk_images[boot.id]
    if spec.kernel:
        if spec.kernel.image:
            kernel_image = library.find(spec.kernel.image)
            if kernel_image is None or kernel_image.path("kernel") is None:
                raise SpecError(f"no image {spec.kernel.image!r} with a kernel in the library",
                                field="spec.kernel.image",
                                hint="build one: `vmforge image build minimal`")
        else:
            _must_exist(spec.kernel.kernel, "spec.kernel.kernel", "kernel")
            _must_exist(spec.kernel.initrd, "spec.kernel.initrd", "initrd")
    return Inputs(disk_images, kernel_image)


def check_host(req: VmRequest, host: HostFacts) -> None:
    """What the spec needs from the host beyond its own files."""
    if req.spec.firmware is Firmware.UEFI and not host.ovmf_code:
        raise SpecError("UEFI needs OVMF, which is not installed", field="spec.firmware",
                        hint="apt-get install ovmf")


def needs_seed(req: VmRequest, inputs: Inputs) -> bool:
    return req.spec.cloud_init is not None or bool(
        req.spec.boot_disk and (req.spec.boot_disk.backing_file or req.spec.boot_disk.image))


def prepare_artifacts(req: VmRequest, inputs: Inputs, paths: VmPaths, host: HostFacts,
                      agent_source: bytes | None, ssh_key: str | None) -> None:
    """Write overlays, blank disks, the seed and the UEFI vars copy into ``paths.dir``."""
    from ..seed import build_seed, inject_agent, write_iso

    spec = req.spec
    for d in spec.disks:
        size = int(d.size_gib * qcow2.GIB) if d.size_gib else None
        target = paths.disk(d.id)
        if d.backing_file or d.id in inputs.disk_images:
            img = inputs.disk_images.get(d.id)
            backing = str(img.path("disk")) if img else str(d.backing_file)
            fmt = img.format if img else None
            qcow2.create_overlay(backing, target, size, backing_format=fmt)
        else:
            assert size is not None
            qcow2.create_blank(target, size, d.format.value)
    if needs_seed(req, inputs):
        seed = build_seed(req.name, spec.cloud_init, default_if_empty=True, ssh_key=ssh_key)
        if spec.agent.enabled and spec.agent.inject and agent_source and \
                not inputs.agent_baked_in:
            seed = inject_agent(seed, agent_source)
        write_iso(seed, paths.seed)
    if spec.firmware is Firmware.UEFI:
        assert host.ovmf_vars
        shutil.copyfile(host.ovmf_vars, paths.uefi_vars)


def _boot_indexes(req: VmRequest) -> tuple[dict[str, int], int | None]:
    spec = req.spec
    order = list(spec.boot_order) or [BootDevice.DISK, BootDevice.CDROM]
    idx: dict[str, int] = {}
    n = 1
    net_index = None
    for dev in order:
        if dev is BootDevice.DISK and spec.boot_disk and not spec.kernel:
            idx[spec.boot_disk.id] = n
            n += 1
        elif dev is BootDevice.CDROM:
            for c in spec.cdroms:
                if c.bootable:
                    idx[c.id] = n
                    n += 1
        elif dev is BootDevice.NETWORK:
            net_index = n
            n += 1
    return idx, net_index


def launch_plan(req: VmRequest, inputs: Inputs, paths: VmPaths, host: HostFacts) -> LaunchPlan:
    spec = req.spec
    idx, net_index = _boot_indexes(req)
    if inputs.kernel_image and not spec.kernel and spec.boot_disk:
        idx.pop(spec.boot_disk.id, None)  # booted directly: the disk's bootloader is unused
    disks = tuple(DiskPlan(d.id, str(paths.disk(d.id)), "qcow2" if d.backing_file or d.image
                           else d.format.value, idx.get(d.id)) for d in spec.disks)
    cdroms = tuple(CdromPlan(c.id, c.iso_path, idx.get(c.id)) for c in spec.cdroms)
    kernel = None
    if inputs.kernel_image and not spec.kernel:
        img = inputs.kernel_image
        kpath = img.path(spec.firmware.kernel_role()) or img.path("kernel")
        assert kpath is not None
        initrd = img.path("initrd")
        kernel = KernelPlan(str(kpath), str(initrd) if initrd else None,
                            f"{img.cmdline or ''} vmforge.id={req.name}".strip())
    if spec.kernel:
        k = spec.kernel
        if inputs.kernel_image:
            img = inputs.kernel_image
            role = spec.firmware.kernel_role()
            kpath = img.path(role) or img.path("kernel")
            assert kpath is not None
            initrd = img.path("initrd")
            cmdline = k.cmdline if k.cmdline is not None else (img.cmdline or "")
            kernel = KernelPlan(str(kpath), str(initrd) if initrd else None,
                                f"{cmdline} vmforge.id={req.name}".strip())
        else:
            assert k.kernel
            kernel = KernelPlan(k.kernel, k.initrd, f"{k.cmdline or ''} vmforge.id={req.name}")
    cid = agent_vsock_cid(req, host)
    agent = str(paths.agent) if spec.agent.enabled and cid is None else None
    return LaunchPlan(
        name=req.name, cpu_cores=spec.cpu_cores, memory_mib=spec.memory_mib,
        machine=spec.machine, firmware=spec.firmware, console_log=str(paths.console),
        qmp_socket=str(paths.qmp), agent_socket=agent, pidfile=str(paths.pidfile),
        disks=disks, cdroms=cdroms, seed=str(paths.seed) if paths.seed.exists() else None,
        nics=spec.nics, kernel=kernel,
        uefi_vars=str(paths.uefi_vars) if spec.firmware is Firmware.UEFI else None,
        vsock_cid=cid, net_bootindex=net_index if spec.nics else None)


def agent_vsock_cid(req: VmRequest, host: HostFacts) -> int | None:
    """The guest CID when the agent should use AF_VSOCK, else None (virtio-serial)."""
    agent = req.spec.agent
    if not agent.enabled or agent.transport == "virtio-serial":
        return None
    if agent.transport == "vsock" and not host.vsock:
        raise SpecError("vsock needs /dev/vhost-vsock on the host", field="spec.agent.transport",
                        hint="modprobe vhost_vsock, or use transport: virtio-serial (or auto)")
    if not host.vsock:
        return None
    digest = int.from_bytes(hashlib.sha256(req.name.encode()).digest()[:4], "big")
    return 3 + digest % (2**31 - 3)  # 0-2 are reserved
