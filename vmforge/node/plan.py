"""From a validated VmRequest to pinned inputs, artifacts on disk (overlays, seed, NVRAM) and a
backend-neutral MachinePlan.

Inputs are resolved once, at create, and pinned by image id (``Pins``): ``start`` boots exactly
what was created even after a newer version of the image is built. ``check_inputs`` and
``check_capabilities`` run before anything is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SpecError
from ..hypervisors.base import Accel, Capabilities
from ..hypervisors.host import HostFacts
from ..hypervisors.plan import (
    AgentPlan,
    CdromPlan,
    DiskPlan,
    ForwardPlan,
    KernelPlan,
    MachinePlan,
    MountPlan,
    NicPlan,
)
from ..images import qcow2
from ..images.library import Image, Library
from ..images.probe import check_disk_image
from ..net.names import tap_name
from ..paths import VmPaths
from ..spec import BootDevice, DiskFormat, Firmware, NicMode, VmRequest

if TYPE_CHECKING:
    from ..net.model import Network
    from ..net.nics import ResolvedNic

__all__ = ["Inputs", "check_inputs", "pinned_inputs", "check_host", "check_capabilities",
           "prepare_artifacts", "machine_plan", "agent_vsock_cid", "needs_seed", "resolve_nics",
           "managed_networks", "mount_plans", "mount_args",
           "mount_tokens", "raw_copies"]

KERNEL_ROLE = "kernel"


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
    def pins(self) -> dict[str, int]:
        """role -> image id, as stored in ``vm_images``."""
        pins = {f"disk:{d}": img.id for d, img in self.disk_images.items()}
        if self.kernel_image:
            pins[KERNEL_ROLE] = self.kernel_image.id
        return pins

    @property
    def agent_baked_in(self) -> bool:
        return any(bool((i.recipe or {}).get("agent")) for i in self.images)


def _must_exist(path: str | None, field: str, what: str) -> None:
    if path and not Path(path).is_file():
        raise SpecError(f"{what} not found: {path}", field=field,
                        hint="give an existing file (relative paths are relative to the spec)")


def _direct_kernel_from_disk(req: VmRequest, disk_images: dict[str, Image]) -> Image | None:
    """A library disk image that carries its kernel boots directly from it (boot_mode auto)."""
    spec = req.spec
    boot = spec.boot_disk
    if spec.kernel or spec.boot_mode != "auto" or boot is None or boot.id not in disk_images:
        return None
    img = disk_images[boot.id]
    return img if img.path("kernel") is not None else None


def _check_files(req: VmRequest) -> None:
    spec = req.spec
    for i, d in enumerate(spec.disks):
        if d.backing_file:
            _must_exist(d.backing_file, f"spec.disks[{i}].backing_file", "backing file")
            check_disk_image(d.backing_file, f"spec.disks[{i}].backing_file")
    for i, c in enumerate(spec.cdroms):
        _must_exist(c.iso_path, f"spec.cdroms[{i}].iso_path", "ISO")
    if spec.kernel and not spec.kernel.image:
        _must_exist(spec.kernel.kernel, "spec.kernel.kernel", "kernel")
        _must_exist(spec.kernel.initrd, "spec.kernel.initrd", "initrd")
    _check_mounts(req)


def _check_mounts(req: VmRequest) -> None:
    """Each shared folder is an existing host directory, and an agent will mount it."""
    for i, m in enumerate(req.spec.mounts):
        field = f"spec.mounts[{i}].source"
        if not Path(m.source).is_absolute():
            raise SpecError(f"shared folder {m.source!r} is not an absolute path", field=field,
                            hint="in a spec file, paths are relative to the spec's directory")
        if not Path(m.source).is_dir():
            what = "is not a directory" if Path(m.source).exists() else "does not exist"
            raise SpecError(f"shared folder {m.source} {what}", field=field,
                            hint="give an existing host directory")
    if req.spec.mounts and not req.spec.agent.enabled:
        raise SpecError("host folders are mounted by the guest agent, which is disabled",
                        field="spec.mounts", hint="remove agent.enabled: false, or the mounts")


def check_inputs(req: VmRequest, library: Library) -> Inputs:
    """Resolve the spec's image references to the newest matching versions (at create)."""
    spec = req.spec
    _check_files(req)
    disk_images: dict[str, Image] = {}
    for i, d in enumerate(spec.disks):
        if d.image:
            img = library.find(d.image)
            if img is None or img.path("disk") is None:
                raise SpecError(f"no disk image {d.image!r} in the library",
                                field=f"spec.disks[{i}].image", hint="see `vmforge image ls`")
            disk_images[d.id] = img
    kernel_image = _direct_kernel_from_disk(req, disk_images)
    if spec.kernel and spec.kernel.image:
        kernel_image = library.find(spec.kernel.image)
        if kernel_image is None or kernel_image.path("kernel") is None:
            raise SpecError(f"no image {spec.kernel.image!r} with a kernel in the library",
                            field="spec.kernel.image",
                            hint="build one: `vmforge image build minimal`")
    inputs = Inputs(disk_images, kernel_image)
    _check_intact(library, inputs)
    return inputs


def pinned_inputs(req: VmRequest, library: Library, pins: dict[str, int]) -> Inputs:
    """The inputs a VM was created with, by pinned image id (at start)."""
    _check_files(req)
    disk_images = {role.split(":", 1)[1]: library.get(i) for role, i in pins.items()
                   if role.startswith("disk:")}
    kernel_image = library.get(pins[KERNEL_ROLE]) if KERNEL_ROLE in pins else None
    inputs = Inputs(disk_images, kernel_image)
    _check_intact(library, inputs)
    return inputs


def _check_intact(library: Library, inputs: Inputs) -> None:
    """A cheap check (size and mtime) that no blob changed since it was stored."""
    for img in inputs.images:
        library.check_intact(img)


def check_host(req: VmRequest, host: HostFacts) -> None:
    """What the spec needs from the host beyond its own files."""
    if req.spec.firmware is Firmware.UEFI and not (
            host.ovmf_code and host.ovmf_vars and Path(host.ovmf_vars).is_file()):
        raise SpecError("UEFI needs OVMF (code and variable store), which is not installed",
                        field="spec.firmware", hint="apt-get install ovmf")


def check_capabilities(req: VmRequest, caps: Capabilities, inputs: Inputs | None = None
                       ) -> None:
    """One generic check of a spec against what its backend can do, with field names."""
    spec = req.spec
    name = caps.backend.value
    if spec.machine not in caps.machines:
        raise SpecError(f"{name} does not support machine {spec.machine.value}",
                        field="spec.machine",
                        hint="use one of: " + ", ".join(sorted(m.value for m in caps.machines)))
    if spec.firmware not in caps.firmware:
        raise SpecError(f"{name} does not support firmware {spec.firmware.value}",
                        field="spec.firmware")
    raw_only = _raw_only(caps)
    for i, d in enumerate(spec.disks):
        if raw_only and (d.backing_file or d.image):
            if d.backing_file:  # its per-VM disk is a raw copy (converted if qcow2)
                _check_convertible(d.backing_file, name, f"spec.disks[{i}].backing_file")
            continue
        fmt = DiskFormat.QCOW2 if (d.backing_file or d.image) else d.format
        if fmt not in caps.disk_formats:
            formats = ", ".join(sorted(f.value for f in caps.disk_formats))
            raise SpecError(f"{name} boots {formats} disks only, and blank disk {d.id} is "
                            f"{fmt.value}", field=f"spec.disks[{i}].format",
                            hint=f"format: {formats.split(', ')[0]}" if raw_only else None)
    if spec.cdroms and not caps.cdroms:
        raise SpecError(f"{name} has no cdrom drives", field="spec.cdroms[0]")
    if spec.agent.enabled and spec.agent.transport != "auto" and \
            spec.agent.transport not in caps.agent_transports:
        raise SpecError(f"{name} cannot reach the agent over {spec.agent.transport}",
                        field="spec.agent.transport",
                        hint="use one of: auto, " + ", ".join(sorted(caps.agent_transports)))
    if caps.backend.max_vcpus is not None and spec.cpu_cores > caps.backend.max_vcpus:
        raise SpecError(f"{name} runs at most {caps.backend.max_vcpus} vCPUs, and the spec "
                        f"asks for {spec.cpu_cores}", field="spec.cpu_cores",
                        hint=f"cpu_cores: {caps.backend.max_vcpus} or fewer, or hypervisor: "
                             "qemu")
    explicit_nics = "nics" in spec.model_fields_set  # not the default user-mode net0
    for i, nic in enumerate(spec.nics):
        if nic.forwards and not caps.user_net_forwards:
            raise SpecError(f"{name} has no user-mode port forwards",
                            field=f"spec.nics[{i}].forwards",
                            hint="use a bridge or managed network and the guest's address")
        if explicit_nics and nic.mode is NicMode.USER and not caps.backend.user_net:
            raise SpecError(f"{name} has no user-mode networking (it opens taps only), and "
                            f"NIC {nic.id} is user-mode", field=f"spec.nics[{i}].mode",
                            hint="put it on a network (network: NAME, see `vmforge network "
                                 "ls`) or a host bridge (bridge: br0); or give nics: [] (the "
                                 "agent needs no NIC: it speaks over vsock)")
    direct = bool(spec.kernel) or (inputs is not None and inputs.kernel_image is not None)
    if spec.mounts and not caps.mounts:
        raise SpecError(f"{name} cannot share host folders with the guest",
                        field="spec.mounts[0]", hint="use hypervisor: qemu or libvirt")
    if direct and not caps.direct_kernel_boot:
        raise SpecError(f"{name} cannot boot a kernel directly", field="spec.kernel")
    if not direct and not caps.firmware_boot:
        raise SpecError(f"{name} boots a kernel directly only (no firmware boot from a disk)",
                        field="spec.kernel", hint="give kernel: {image: minimal} or a disk "
                        "image that carries its kernel")


def _raw_only(caps: Capabilities) -> bool:
    """A backend that boots raw disks only (Firecracker): a disk from an image or a backing
    file is a private raw copy of it (``vmforge.images.rawcopy``), not a qcow2 overlay."""
    return DiskFormat.RAW in caps.disk_formats and DiskFormat.QCOW2 not in caps.disk_formats


def raw_copies(req: VmRequest) -> bool:
    """Whether the spec's backend gets raw copies instead of qcow2 overlays."""
    from ..hypervisors import get_driver
    return _raw_only(get_driver(req.spec.hypervisor).capabilities())


def _check_convertible(path: str, backend: str, field: str) -> None:
    """A qcow2 backing file becomes a raw copy by flattening its chain: every image in the
    chain must be there (``qemu-img convert`` would fail later, after the VM's row exists)."""
    from ..images.rawcopy import QCOW2_MAGIC
    seen = 0
    current = Path(path)
    while seen < 16:
        try:
            with open(current, "rb") as f:
                head = f.read(20)
                if head[:4] != QCOW2_MAGIC:
                    return
                off, size = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
                if not off:
                    return
                f.seek(off)
                name = f.read(size).decode(errors="replace")
        except OSError:
            return  # check_inputs names a missing or unreadable file
        backing = current.parent / name if not Path(name).is_absolute() else Path(name)
        if not backing.is_file():
            raise SpecError(f"{backend} boots raw disks only, so vmforge makes a raw copy of "
                            f"{path}; but it is a qcow2 overlay whose backing file {name} is "
                            "missing", field=field,
                            hint="give a standalone image (qemu-img convert -O raw SRC DST), "
                                 "or put its backing file back")
        current = backing
        seen += 1
    raise SpecError(f"{path}: its qcow2 backing chain is longer than 16 images", field=field,
                    hint="flatten it first: qemu-img convert -O raw SRC DST")


def resolve_nics(req: VmRequest, nets: Mapping[str, Network] | None = None
                 ) -> tuple[ResolvedNic, ...]:
    """The spec's NICs against the managed networks ``nets`` (name -> Network): MACs, bridges,
    static addresses (vmforge.net.nics). Raises field-named SpecErrors."""
    from ..net.nics import resolve_nics as resolve
    return resolve(req.name, req.spec.nics, nets or {},
                   named_networks=req.spec.hypervisor.named_networks)


def managed_networks(req: VmRequest) -> set[str]:
    """The names of the networks a spec's NICs name (managed ones, or libvirt's by name)."""
    return {n.network for n in req.spec.nics if n.network}


def needs_seed(req: VmRequest) -> bool:
    return req.spec.cloud_init is not None or bool(
        req.spec.boot_disk and (req.spec.boot_disk.backing_file or req.spec.boot_disk.image))


def prepare_artifacts(req: VmRequest, inputs: Inputs, paths: VmPaths, host: HostFacts,
                      agent_source: bytes | None, ssh_key: str | None,
                      schema_check: bool = True,
                      nets: Mapping[str, Network] | None = None) -> None:
    """Write overlays, blank disks, the seed and the UEFI vars copy into ``paths.dir``
    (owner-only: the seed carries user-data, which may hold passwords)."""
    from ..seed import build_seed, inject_agent, write_iso

    spec = req.spec
    raw = raw_copies(req)
    for d in spec.disks:
        target = paths.disk(d.id)
        if d.backing_file or d.id in inputs.disk_images:
            img = inputs.disk_images.get(d.id)
            backing = str(img.path("disk")) if img else str(d.backing_file)
            fmt = img.format if img else None
            size = int(d.size_gib * qcow2.GIB) if d.size_gib else None
            if raw:
                from ..images.rawcopy import create_raw_disk
                # A library blob never changes: its conversion to raw is made once and kept
                # beside the blobs (<library>/raw-cache/<sha256>.raw), keyed by its content.
                # (Library.raw_cache: <library>/raw-cache, beside <library>/blobs/<sha256>)
                cache = (img.files["disk"], Path(backing).parent.parent / "raw-cache") \
                    if img else None
                create_raw_disk(backing, target, size, cache=cache)
            else:
                qcow2.create_overlay(backing, target, size, backing_format=fmt)
        else:
            if d.size_gib is None:  # the model refuses blank disks without a size
                raise SpecError("a blank disk needs size_gib", field=f"spec.disks[{d.id}]")
            qcow2.create_blank(target, int(d.size_gib * qcow2.GIB), d.format.value)
    if needs_seed(req):
        seed = build_seed(req.name, spec.cloud_init, default_if_empty=True, ssh_key=ssh_key,
                          schema=schema_check,
                          network_config=guest_network_config(resolve_nics(req, nets)))
        if spec.agent.enabled and spec.agent.inject and agent_source and \
                not inputs.agent_baked_in:
            seed = inject_agent(seed, agent_source)
        write_iso(seed, paths.seed)
    if spec.firmware is Firmware.UEFI:
        if not host.ovmf_vars:
            raise SpecError("UEFI needs OVMF's variable store", field="spec.firmware",
                            hint="apt-get install ovmf")
        shutil.copyfile(host.ovmf_vars, paths.uefi_vars)
    for p in paths.dir.iterdir():
        p.chmod(0o600)


def guest_network_config(nics: Sequence[ResolvedNic]) -> str | None:
    """The seed's network-config v2 for NICs on host networks (by MAC), or None."""
    from ..net.guestconfig import network_config_v2
    return network_config_v2(nics)


def _boot_indexes(req: VmRequest, direct_kernel: bool) -> tuple[dict[str, int], int | None]:
    spec = req.spec
    order = list(spec.boot_order) or [BootDevice.DISK, BootDevice.CDROM]
    idx: dict[str, int] = {}
    n = 1
    net_index = None
    for dev in order:
        if dev is BootDevice.DISK and spec.boot_disk and not direct_kernel:
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


def kernel_plan(req: VmRequest, inputs: Inputs, nics: Sequence[ResolvedNic] = ()
                ) -> KernelPlan | None:
    """The one place that decides direct kernel boot: a library image's kernel (the disk's
    own, or ``kernel.image``), or the spec's kernel/initrd paths. The command line carries
    the VM's name and its host NICs' addressing (``vmforge.net=``, read by the minimal
    image's init; cloud images use the seed's network-config instead)."""
    from ..net.guestconfig import cmdline_tokens
    spec = req.spec
    k = spec.kernel
    tag = " ".join([f"vmforge.id={req.name}", *cmdline_tokens(nics), *mount_tokens(req)])
    if inputs.kernel_image is not None:
        img = inputs.kernel_image
        kpath = img.path(spec.firmware.kernel_role()) or img.path("kernel")
        if kpath is None:
            raise SpecError(f"image {img.ref} has no kernel", field="spec.kernel.image")
        initrd = img.path("initrd")
        cmdline = k.cmdline if k is not None and k.cmdline is not None else (img.cmdline or "")
        return KernelPlan(str(kpath), str(initrd) if initrd else None,
                          f"{cmdline} {tag}".strip())
    if k is not None and k.kernel:
        return KernelPlan(k.kernel, k.initrd, f"{k.cmdline or ''} {tag}".strip())
    return None


def machine_plan(req: VmRequest, inputs: Inputs, paths: VmPaths, host: HostFacts,
                 accel: Accel, nets: Mapping[str, Network] | None = None) -> MachinePlan:
    """``nets``: the managed networks the spec's NICs name (name -> Network)."""
    spec = req.spec
    resolved = resolve_nics(req, nets)
    kernel = kernel_plan(req, inputs, resolved)
    idx, net_index = _boot_indexes(req, direct_kernel=kernel is not None)
    copy_fmt = "raw" if raw_copies(req) else "qcow2"  # a raw copy, or a qcow2 overlay
    disks = tuple(DiskPlan(d.id, str(paths.disk(d.id)), copy_fmt if d.backing_file or d.image
                           else d.format.value, idx.get(d.id)) for d in spec.disks)
    cdroms = tuple(CdromPlan(c.id, c.iso_path, idx.get(c.id)) for c in spec.cdroms)
    own_taps = not spec.hypervisor.makes_taps
    nics = tuple(NicPlan(n.id, r.mac, tuple(ForwardPlan(f.protocol, f.host_addr, f.host_port,
                                                        f.guest_port) for f in n.forwards),
                         bridge=r.bridge, network=r.libvirt_network,
                         tap=tap_name(paths.dir, r.index) if r.bridge and own_taps else None)
                 for n, r in zip(spec.nics, resolved, strict=True))
    agent = None
    if spec.agent.enabled:
        cid = agent_vsock_cid(req, host)
        agent = AgentPlan("vsock", cid=cid) if cid is not None else \
            AgentPlan("virtio-serial", socket=str(paths.agent))
    return MachinePlan(
        name=req.name, vm_dir=str(paths.dir), run_dir=str(paths.sockets),
        cpu_cores=spec.cpu_cores, memory_mib=spec.memory_mib, machine=spec.machine,
        firmware=spec.firmware, accel=accel, console_log=str(paths.console),
        disks=disks, cdroms=cdroms, seed=str(paths.seed) if needs_seed(req) else None,
        nics=nics, kernel=kernel,
        nvram=str(paths.uefi_vars) if spec.firmware is Firmware.UEFI else None,
        agent=agent, net_bootindex=net_index if spec.nics else None, mounts=mount_plans(req),
        vmgenid=None if spec.machine.value == "microvm" else "auto")


def mount_plans(req: VmRequest) -> tuple[MountPlan, ...]:
    return tuple(MountPlan(m.tag_at(i), m.source, m.target, m.readonly, m.security_model)
                 for i, m in enumerate(req.spec.mounts))


def mount_args(req: VmRequest) -> list[dict[str, object]]:
    """The agent's ``mount`` call arguments: each share's tag, guest target and mode."""
    return [{"tag": p.tag, "target": p.target, "readonly": p.readonly}
            for p in mount_plans(req)]


#: Shares go on a direct-booted kernel's command line only while they fit in this many
#: characters (Linux keeps 2048 in all); beyond it the agent gets them from the host's call.
MOUNT_CMDLINE_BUDGET = 1024


def mount_tokens(req: VmRequest) -> list[str]:
    """``vmforge.mount=TAG:TARGET[:ro]`` for each share: the agent of a direct-booted guest
    mounts them as it starts, on every boot (the host's ``mount`` call after the hello covers
    the rest, and reports failures)."""
    from ..agent.guest import mount_token
    tokens = [mount_token(p.tag, p.target, p.readonly) for p in mount_plans(req)]
    return tokens if sum(len(t) + 1 for t in tokens) <= MOUNT_CMDLINE_BUDGET else []


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
