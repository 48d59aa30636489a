"""MachinePlan: a VM spec with every input resolved; the input of every backend's ``render``.

It names no backend's files: drivers put their own (QMP socket, pidfile, domain) under
``vm_dir`` / ``run_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..enums import Firmware, Machine
from .base import AGENT_PORT_NAME, AGENT_VSOCK_PORT, Accel

__all__ = ["DiskPlan", "CdromPlan", "KernelPlan", "ForwardPlan", "NicPlan", "AgentPlan",
           "MountPlan", "MachinePlan", "AGENT_PORT_NAME", "AGENT_VSOCK_PORT"]


@dataclass(frozen=True)
class DiskPlan:
    id: str
    path: str
    format: str = "qcow2"
    bootindex: int | None = None


@dataclass(frozen=True)
class CdromPlan:
    id: str
    path: str
    bootindex: int | None = None


@dataclass(frozen=True)
class KernelPlan:
    kernel: str
    initrd: str | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class ForwardPlan:
    protocol: str
    host_addr: str
    host_port: int
    guest_port: int


@dataclass(frozen=True)
class NicPlan:
    """A NIC: user-mode (``forwards``), or on a host bridge (``bridge``) through a tap that
    vmforge made (``tap``, for backends that open an existing tap by name) or that the
    backend makes itself (libvirt); or on a libvirt network by name (``network``)."""
    id: str
    mac: str | None = None
    forwards: tuple[ForwardPlan, ...] = ()
    bridge: str | None = None
    network: str | None = None
    tap: str | None = None


@dataclass(frozen=True)
class AgentPlan:
    """How the host reaches the guest agent: a virtio-serial port named AGENT_PORT_NAME behind
    the unix socket ``socket``, or AF_VSOCK to ``cid`` on AGENT_VSOCK_PORT."""
    transport: str  # "virtio-serial" | "vsock"
    socket: str | None = None
    cid: int | None = None


@dataclass(frozen=True)
class MountPlan:
    """A host directory (``source``, absolute) shared with virtio-9p under the mount tag
    ``tag``; the guest agent mounts it at ``target``. ``security_model``: QEMU's ``none`` or
    ``mapped-xattr`` (libvirt's ``squash`` and ``mapped``)."""
    tag: str
    source: str
    target: str
    readonly: bool = False
    security_model: str = "none"


@dataclass(frozen=True)
class MachinePlan:
    name: str
    vm_dir: str
    run_dir: str       # where sockets go (short enough for sun_path)
    cpu_cores: int
    memory_mib: int
    machine: Machine
    firmware: Firmware
    accel: Accel
    console_log: str
    disks: tuple[DiskPlan, ...] = ()
    cdroms: tuple[CdromPlan, ...] = ()
    seed: str | None = None
    nics: tuple[NicPlan, ...] = ()
    kernel: KernelPlan | None = None
    nvram: str | None = None         # the per-VM copy of the UEFI variable store
    agent: AgentPlan | None = None
    net_bootindex: int | None = None  # PXE from the first NIC at this place in the order
    mounts: tuple[MountPlan, ...] = ()
    # The VM generation id (QEMU's vmgenid device): "auto" (a new one per start) or a GUID;
    # a restored clone gets a new one, which tells its kernel to reseed its random pool.
    vmgenid: str | None = None
    # Start from a saved state instead of booting (QEMU's -incoming URI, e.g. "exec:cat F"):
    # the device set must be the saved VM's; the guest waits paused for the host's cont.
    incoming: str | None = None
