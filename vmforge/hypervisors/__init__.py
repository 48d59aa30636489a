"""Hypervisor backends behind one small interface, registered against :class:`Backend`."""

from __future__ import annotations

import enum

__all__ = ["Backend"]


class Backend(enum.StrEnum):
    QEMU = "qemu"
    LIBVIRT = "libvirt"
    CLOUD_HYPERVISOR = "cloud-hypervisor"
    FIRECRACKER = "firecracker"

    @property
    def implemented(self) -> bool:
        return self is Backend.QEMU
