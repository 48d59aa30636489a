"""The hypervisor seam: the types every backend shares, and the driver contract. No I/O here.

A driver has two pure parts (``capabilities``: data; ``render``: the plan as argv, domain XML or
API requests, golden-tested) and five I/O parts (``probe``, ``start``, ``find``, ``status``,
``stop``, ``cleanup``). Planning, capability checks, readiness, the agent and provisioning are
the same for every backend and live outside the drivers (``vmforge.node``).
"""

from __future__ import annotations

import enum
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..enums import Backend, DiskFormat, Firmware, Machine
from ..locations import agent_address

__all__ = ["Backend", "Accel", "Liveness", "StopOutcome", "EndpointKind", "AgentEndpoint",
           "Capabilities", "Runtime", "ApiRequest", "Rendered", "BackendStatus", "Driver",
           "AGENT_PORT_NAME", "AGENT_VSOCK_PORT", "SavesState", "SnapshotsInOneStep"]

AGENT_PORT_NAME = "org.vmforge.agent.0"
AGENT_VSOCK_PORT = 1024


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class Liveness(enum.StrEnum):
    """What the hypervisor says about a VM, read-only."""
    RUNNING = "running"
    PAUSED = "paused"
    POWERED_OFF = "powered-off"  # the guest shut itself down
    CRASHED = "crashed"          # the hypervisor process died, or the guest panicked
    GONE = "gone"                # nothing is there (never started, or cleaned up)


class StopOutcome(enum.StrEnum):
    AGENT = "agent"              # the guest agent powered the guest off
    ACPI = "acpi"                # the power button worked
    QUIT = "quit"                # the hypervisor was told to quit / destroy
    KILLED = "killed"            # SIGKILL
    NOT_RUNNING = "not-running"


class EndpointKind(enum.StrEnum):
    UNIX = "unix"                # virtio-serial port behind a unix socket (QEMU, libvirt)
    VSOCK = "vsock"              # AF_VSOCK (host has vhost-vsock)
    HYBRID_VSOCK = "hybrid-vsock"  # Cloud Hypervisor / Firecracker: CONNECT <port> on a socket


@dataclass(frozen=True)
class AgentEndpoint:
    kind: EndpointKind
    path: str | None = None
    cid: int | None = None
    port: int | None = None

    def __str__(self) -> str:
        """The client's address syntax: a socket path, ``vsock:CID:PORT`` or
        ``hvsock:PATH:PORT``."""
        return agent_address(self.kind.value, self.path, self.cid, self.port)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AgentEndpoint:
        return cls(EndpointKind(d["kind"]), d.get("path"), d.get("cid"), d.get("port"))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, as data: checked in one generic place (node.plan) and served to
    clients so a UI can grey out what a backend cannot do."""
    backend: Backend
    machines: frozenset[Machine]
    firmware: frozenset[Firmware]
    disk_formats: frozenset[DiskFormat]
    cdroms: bool
    needs_kvm: bool
    agent_transports: frozenset[str]  # "virtio-serial", "vsock", "hybrid-vsock"
    user_net_forwards: bool
    direct_kernel_boot: bool = True
    firmware_boot: bool = True
    survives_vmforge: bool = True  # the VM outlives the process that started it
    mounts: bool = True  # host directories shared into the guest (virtio-9p)
    # Memory snapshots, clones and warm pools (vmforge.node.snapshots): the driver saves a
    # running VM's state to a file and starts a VM from one.
    snapshots: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend.value,
                "machines": sorted(m.value for m in self.machines),
                "firmware": sorted(f.value for f in self.firmware),
                "disk_formats": sorted(f.value for f in self.disk_formats),
                "cdroms": self.cdroms, "needs_kvm": self.needs_kvm,
                "agent_transports": sorted(self.agent_transports),
                "user_net_forwards": self.user_net_forwards,
                "direct_kernel_boot": self.direct_kernel_boot,
                "firmware_boot": self.firmware_boot,
                "survives_vmforge": self.survives_vmforge, "mounts": self.mounts,
                "snapshots": self.snapshots}


@dataclass(frozen=True)
class Runtime:
    """The handle of a started VM; stored as one JSON column in the state file."""
    backend: Backend
    accel: Accel
    control: str                    # QMP socket | API socket | libvirt domain UUID
    agent: AgentEndpoint | None
    pid: int | None = None          # None when another daemon (libvirtd) owns the process
    marker: str | None = None       # PID-reuse guard: a string the process's cmdline contains
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"backend": self.backend.value, "accel": self.accel.value,
                           "control": self.control,
                           "agent": self.agent.to_json() if self.agent else None,
                           "pid": self.pid, "marker": self.marker, "extra": self.extra},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Runtime:
        d = json.loads(text)
        return cls(Backend(d["backend"]), Accel(d["accel"]), d["control"],
                   AgentEndpoint.from_json(d["agent"]) if d.get("agent") else None,
                   d.get("pid"), d.get("marker"), d.get("extra") or {})


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    body: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "body": self.body}


@dataclass(frozen=True)
class Rendered:
    """A backend's part of a plan: exactly one of the three is set."""
    argv: list[str] | None = None
    domain_xml: str | None = None
    requests: list[ApiRequest] | None = None

    def to_json(self) -> dict[str, Any]:
        if self.argv is not None:
            return {"argv": self.argv}
        if self.domain_xml is not None:
            return {"domain_xml": self.domain_xml}
        return {"requests": [r.to_json() for r in self.requests or []]}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run VMs here now (``vmforge doctor``, ``GET /v1/host``)."""
    available: bool
    detail: str
    hint: str | None = None


class Driver(ABC):
    """One backend. Methods that take a ``MachinePlan`` get a fully resolved plan."""

    backend: ClassVar[Backend]

    # -- pure
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def render(self, plan: Any, host: Any) -> Rendered:
        """``plan``: a :class:`vmforge.hypervisors.plan.MachinePlan`; ``host``: HostFacts."""

    # -- I/O
    @abstractmethod
    def probe(self) -> BackendStatus: ...

    @abstractmethod
    def start(self, plan: Any, host: Any, record: Callable[[Runtime], None]) -> Runtime:
        """Start the VM. ``record`` is called with the runtime handle as soon as it is known
        (before the guest runs where the backend allows), so that a crash of vmforge never
        loses a process. Returns once the control channel answers."""

    @abstractmethod
    def find(self, name: str, vm_dir: Path) -> Runtime | None:
        """The runtime of a VM this backend is running for ``name``/``vm_dir``, found from
        the backend's own records (pidfile and control socket, libvirt domain), or None."""

    @abstractmethod
    def status(self, rt: Runtime) -> Liveness: ...

    @abstractmethod
    async def stop(self, rt: Runtime, timeout: float) -> StopOutcome:
        """Power button, then quit/destroy after ``timeout``, then kill. 0 means kill now."""

    @abstractmethod
    def kill(self, rt: Runtime) -> StopOutcome:
        """Stop at once, synchronously (cleanup paths that cannot await): destroy/SIGKILL."""

    @abstractmethod
    def cleanup(self, rt: Runtime | None, name: str, vm_dir: Path) -> None:
        """Remove what the backend keeps outside ``vm_dir`` (domain, NVRAM, sockets)."""


@runtime_checkable
class SavesState(Protocol):
    """Optional: memory snapshots through a state file, for ``vmforge.node.snapshots``
    (drivers that have it declare ``Capabilities.snapshots``). Disks are named by their
    drive id (the spec's disk id)."""

    def save_state(self, rt: Runtime, dest: Path, timeout: float) -> None:
        """Pause and write memory and device state to ``dest``; the VM stays paused."""

    def top_nodes(self, rt: Runtime) -> dict[str, str]:
        """An id of each disk's current top image (changes when ``switch_disks`` did)."""

    def switch_disks(self, rt: Runtime, overlays: Mapping[str, str]) -> None:
        """Write each disk to its new overlay (made by the caller over the old top)."""

    def rebase_disk(self, rt: Runtime, disk: str, backing: str) -> None:
        """Name ``backing`` as the backing file of the disk's top image."""

    def resume(self, rt: Runtime) -> None: ...

    def quit(self, rt: Runtime) -> None:
        """End the (paused, saved) VM's process; returns once it is gone."""

    def run_state(self, rt: Runtime) -> str: ...

    def cancel_save(self, rt: Runtime) -> None: ...

    def incoming(self, state: Path) -> str:
        """``MachinePlan.incoming`` for a start from ``state``."""

    def wait_restored(self, rt: Runtime, vm_dir: Path, timeout: float) -> float:
        """After such a start: until the state is loaded (paused); raises with the
        hypervisor's reason when it could not load it."""

    def state_info(self, state: Path) -> dict[str, Any]:
        """What the state file says about itself (format, machine type); raises if it is
        not one."""

    def generation_id(self, rt: Runtime) -> str | None: ...


@runtime_checkable
class SnapshotsInOneStep(Protocol):
    """Optional, beside :class:`SavesState`, for a hypervisor that saves memory and switches
    the disks onto new overlays in one call and cannot do the two apart (libvirt's external
    snapshot: ``virDomainSnapshotCreateXML``). ``vmforge.node.snapshots`` then pauses the VM,
    reads each disk's overlay while nothing writes it (so the new overlay can name, in its
    header, the library path that overlay will be stored at), calls ``snapshot`` and renames
    the new overlays to the disks' own paths. Of :class:`SavesState` such a driver uses
    ``top_nodes``, ``resume``, ``quit``, ``run_state``, ``cancel_save`` and the restore half.
    """

    def pause(self, rt: Runtime) -> None:
        """Stop the guest's CPUs; its disk images are flushed and no longer written."""

    def snapshot(self, rt: Runtime, dest: Path, overlays: Mapping[str, str], *,
                 stop: bool, timeout: float) -> None:
        """Save memory and device state to ``dest`` and put each disk (by id) on its new
        overlay (made by the caller; a new path), in one step. The VM is left paused, or
        (``stop``) ended. Raises, with the VM on its old disks, if it could not."""

    def adopt_disks(self, rt: Runtime, paths: Mapping[str, str]) -> None:
        """Record ``paths`` (each disk's own path, now naming the overlay ``snapshot``
        switched it to) as the disks of the VM's next start."""
