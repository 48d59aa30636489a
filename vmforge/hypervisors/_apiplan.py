"""Pure plan checks shared by the renderers of the API-driven VMMs (Cloud Hypervisor,
Firecracker). The generic capability check (``vmforge.node.plan.check_capabilities``) refuses
these from the spec first; a plan built by hand is refused here, naming the same spec fields.
"""

from __future__ import annotations

from ..errors import SpecError
from .plan import MachinePlan, NicPlan

__all__ = ["refuse_unsupported", "tap_nics"]


def refuse_unsupported(plan: MachinePlan, name: str) -> None:
    if plan.cdroms:
        raise SpecError(f"{name} has no cdrom drives", field="spec.cdroms[0]")
    if plan.mounts:
        raise SpecError(f"{name} cannot share host folders with the guest",
                        field="spec.mounts[0]", hint="use hypervisor: qemu or libvirt")
    if plan.net_bootindex is not None and plan.kernel is None:  # a direct boot has no order
        raise SpecError(f"{name} cannot boot from the network", field="spec.boot_order")


def tap_nics(plan: MachinePlan, name: str) -> list[NicPlan]:
    """The NICs the VMM gets: those on a tap vmforge made. A plain user-mode NIC (the spec's
    default ``net0``) is left out: these VMMs have no user-mode networking, and the agent needs
    none (hybrid vsock). Port forwards, and a bridge or network NIC without a tap, are refused.
    """
    out = []
    for i, nic in enumerate(plan.nics):
        if nic.tap:
            out.append(nic)
        elif nic.forwards:
            raise SpecError(f"{name} has no user-mode port forwards",
                            field=f"spec.nics[{i}].forwards",
                            hint="use a bridge or managed network and the guest's address")
        elif nic.bridge or nic.network:
            raise SpecError(f"{name} needs a tap for NIC {nic.id}", field=f"spec.nics[{i}]",
                            hint="plan it with vmforge.node.plan.machine_plan")
    return out
