"""Stand-ins for host facts in unit tests (no probing, no processes)."""

from __future__ import annotations

from typing import Any

from vmforge.hypervisors.host import HostFacts, KvmVerdict


def fake_host(**overrides: Any) -> HostFacts:
    """A TCG-only host with QEMU 7.2 and Debian's OVMF paths, as this project's CI has."""
    facts: dict[str, Any] = {
        "qemu_binary": "qemu-system-x86_64", "qemu_version": "7.2.0",
        "kvm": KvmVerdict(False, "fake host: KVM not probed"),
        "ovmf_code": "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "ovmf_vars": "/usr/share/OVMF/OVMF_VARS_4M.fd", "tsc_khz": None, "vsock": False}
    facts.update(overrides)
    return HostFacts(**facts)
