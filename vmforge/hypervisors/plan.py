"""LaunchPlan: a VM spec with every path resolved; the input of every backend builder."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..spec import Firmware, Machine, Nic

__all__ = ["DiskPlan", "CdromPlan", "KernelPlan", "LaunchPlan", "AGENT_PORT_NAME",
           "AGENT_VSOCK_PORT"]

AGENT_PORT_NAME = "org.vmforge.agent.0"
AGENT_VSOCK_PORT = 1024


@dataclass(frozen=True)
class DiskPlan:
    id: str
    path: str
    format: str = "qcow2"
    bootindex: int | None = None
    readonly: bool = False


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
class LaunchPlan:
    name: str
    cpu_cores: int
    memory_mib: int
    machine: Machine
    firmware: Firmware
    console_log: str
    qmp_socket: str
    agent_socket: str | None
    pidfile: str
    disks: tuple[DiskPlan, ...] = ()
    cdroms: tuple[CdromPlan, ...] = ()
    seed: str | None = None
    nics: tuple[Nic, ...] = ()
    kernel: KernelPlan | None = None
    uefi_vars: str | None = None
    vsock_cid: int | None = None  # set: the agent talks AF_VSOCK instead of virtio-serial
    net_bootindex: int | None = None  # PXE from the first NIC at this place in the order
    extra_args: tuple[str, ...] = field(default=())
