"""The choices in a VM spec, as plain enums: importing them costs no pydantic, so the
hypervisor seam, the state store and the fast CLI paths can use them."""

from __future__ import annotations

import enum

__all__ = ["Firmware", "BootDevice", "Machine", "DiskFormat", "Backend", "AccelChoice",
           "BootMode", "AgentTransport", "Protocol", "NicMode", "SPEC_REV"]


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"

    def kernel_role(self) -> str:
        """Which kernel file of an image to boot: OVMF needs the EFI-stub bzImage, while
        SeaBIOS/QEMU can take the uncompressed ELF through PVH (half the TCG boot time)."""
        return "kernel" if self is Firmware.UEFI else "vmlinux"


class BootDevice(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"
    NETWORK = "network"

    def to_qemu(self) -> str:
        return {"disk": "c", "cdrom": "d", "network": "n"}[self.value]


class Machine(enum.StrEnum):
    Q35 = "q35"
    PC = "pc"
    MICROVM = "microvm"


class DiskFormat(enum.StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class Backend(enum.StrEnum):
    """The hypervisor a spec runs on; each has a driver (vmforge.hypervisors)."""
    QEMU = "qemu"
    LIBVIRT = "libvirt"
    CLOUD_HYPERVISOR = "cloud-hypervisor"
    FIRECRACKER = "firecracker"

    @property
    def makes_taps(self) -> bool:
        """Whether the backend makes (and removes) the tap of a bridge or network NIC itself
        (libvirtd does); for the others vmforge makes it before the hypervisor starts."""
        return self is Backend.LIBVIRT

    @property
    def named_networks(self) -> bool:
        """Whether the backend has networks of its own by name (libvirt's ``default``)."""
        return self is Backend.LIBVIRT

    @property
    def user_net(self) -> bool:
        """Whether the backend has user-mode networking (NAT without host privileges: QEMU's
        slirp/passt). Cloud Hypervisor and Firecracker open taps only."""
        return self in (Backend.QEMU, Backend.LIBVIRT)

    @property
    def max_vcpus(self) -> int | None:
        """The most vCPUs the backend runs (None: the spec's own limit). Firecracker: its API
        document's ``MachineConfiguration.vcpu_count`` maximum (32); Cloud Hypervisor:
        ``CpusConfig.max_vcpus`` is a ``u8`` in its ``vm_config.rs`` (255)."""
        return {Backend.FIRECRACKER: 32, Backend.CLOUD_HYPERVISOR: 255}.get(self)


class AccelChoice(enum.StrEnum):
    AUTO = "auto"  # KVM when a probe proved it boots guests here, else TCG
    KVM = "kvm"
    TCG = "tcg"


class BootMode(enum.StrEnum):
    AUTO = "auto"          # a library disk image that carries its kernel boots it directly
    FIRMWARE = "firmware"  # always through BIOS/UEFI and the disk's own bootloader


class AgentTransport(enum.StrEnum):
    AUTO = "auto"  # AF_VSOCK where the host has /dev/vhost-vsock, else virtio-serial
    VIRTIO_SERIAL = "virtio-serial"
    VSOCK = "vsock"


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class NicMode(enum.StrEnum):
    """Where a NIC is plugged in (vmforge.net is the host side of the last two)."""
    USER = "user"        # the hypervisor's user-mode NAT (port forwards); no host privileges
    BRIDGE = "bridge"    # a tap on an existing host bridge (or libvirt's own tap on it)
    NETWORK = "network"  # a vmforge-managed network (bridge + dnsmasq [+ NAT]), else libvirt's

    @property
    def on_host(self) -> bool:
        """Whether the NIC is a host network device (tap), reachable from the host."""
        return self is not NicMode.USER


# The revision of the spec models (vmforge.spec). A stored spec stamped with this revision was
# accepted by these models, so listing VMs need not import pydantic to validate it again. Bump
# it whenever a model change could refuse a spec that an earlier version accepted.
SPEC_REV = 1
