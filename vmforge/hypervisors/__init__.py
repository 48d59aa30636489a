"""Hypervisor backends behind one small contract (:mod:`.base`), registered against
:class:`Backend` and imported only when used (libvirt-python stays off the CLI's import path)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .base import Backend

if TYPE_CHECKING:
    from .base import Driver

__all__ = ["Backend", "DRIVERS", "get_driver", "available_backends"]

DRIVERS: dict[Backend, str] = {
    Backend.QEMU: "vmforge.hypervisors.qemu.driver:QemuDriver",
    Backend.LIBVIRT: "vmforge.hypervisors.libvirt.driver:LibvirtDriver",
    Backend.CLOUD_HYPERVISOR: "vmforge.hypervisors.cloud_hypervisor.driver:CloudHypervisorDriver",
    Backend.FIRECRACKER: "vmforge.hypervisors.firecracker.driver:FirecrackerDriver",
}

_cache: dict[Backend, Driver] = {}


def available_backends() -> list[Backend]:
    """Backends with a driver in this version of vmforge."""
    return [b for b in Backend if b in DRIVERS]


def get_driver(backend: Backend | str) -> Driver:
    from ..errors import HostError
    b = Backend(backend)
    if b not in _cache:
        target = DRIVERS.get(b)
        if target is None:
            raise HostError(f"hypervisor {b.value!r} has no driver in this version of vmforge",
                            hint="use one of: " + ", ".join(x.value for x in DRIVERS))
        module, cls = target.split(":")
        _cache[b] = getattr(importlib.import_module(module), cls)()
    return _cache[b]
