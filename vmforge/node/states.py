"""VM states and the transitions allowed between them (the only writer is the manager's
``_transition``, guarded by a per-VM lock and a conditional UPDATE)::

    creating -> created -> starting -> running -> stopping -> stopped
                               |          |                     |
                               |          +-> crashed (the hypervisor died / the guest panicked)
                               +-> stopped (start failed or its starter died before QEMU ran)
    created | stopped | crashed -> starting
    running -> snapshotting -> running | stopped        (vmforge.node.snapshots)
    creating -> restoring -> running | (row removed)    (a clone from a saved state)
    any (with rm -f for running ones) -> deleting -> (row removed)

``broken`` is never stored: it is how a row whose stored spec no longer parses is shown.
"""

from __future__ import annotations

import enum

__all__ = ["VmState", "ExitReason", "STARTABLE", "LIVE", "TRANSIENT", "TRANSITIONS"]


class VmState(enum.StrEnum):
    CREATING = "creating"
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    DELETING = "deleting"
    BROKEN = "broken"
    SNAPSHOTTING = "snapshotting"  # paused while its memory and disks are saved
    RESTORING = "restoring"        # a clone loading a saved state; gone again if it fails


class ExitReason(enum.StrEnum):
    """Why a VM stopped running: recorded by a supervisor that watched it (the daemon's QMP or
    libvirt event connection), else inferred when the process is found gone."""
    GUEST_SHUTDOWN = "guest-shutdown"    # the guest powered itself off
    GUEST_PANIC = "guest-panic"          # the guest kernel panicked
    HYPERVISOR_DIED = "hypervisor-died"  # the hypervisor process died (killed, crashed)
    STOPPED = "stopped"                  # vmforge stopped it (stop, kill, rm -f)

    @property
    def crashed(self) -> bool:
        return self in (ExitReason.GUEST_PANIC, ExitReason.HYPERVISOR_DIED)


STARTABLE = (VmState.CREATED, VmState.STOPPED, VmState.CRASHED)
# A hypervisor process may exist in these states.
LIVE = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.SNAPSHOTTING,
        VmState.RESTORING)
# Held only while a vmforge process works on the VM (under its lock); found unlocked, the
# worker died and the next command finishes or rolls back its work.
TRANSIENT = (VmState.CREATING, VmState.STARTING, VmState.STOPPING, VmState.DELETING,
             VmState.SNAPSHOTTING, VmState.RESTORING)

TRANSITIONS: dict[VmState, tuple[VmState, ...]] = {
    VmState.CREATING: (VmState.CREATED, VmState.RESTORING, VmState.DELETING),
    VmState.CREATED: (VmState.STARTING, VmState.DELETING),
    VmState.STARTING: (VmState.RUNNING, VmState.STOPPED, VmState.DELETING),
    VmState.RUNNING: (VmState.STOPPING, VmState.CRASHED, VmState.STOPPED, VmState.DELETING,
                      VmState.SNAPSHOTTING),
    VmState.STOPPING: (VmState.STOPPED, VmState.RUNNING, VmState.DELETING),
    VmState.STOPPED: (VmState.STARTING, VmState.DELETING),
    VmState.CRASHED: (VmState.STARTING, VmState.DELETING),
    VmState.DELETING: (),
    VmState.BROKEN: (VmState.DELETING,),
    VmState.SNAPSHOTTING: (VmState.RUNNING, VmState.STOPPED, VmState.DELETING),
    VmState.RESTORING: (VmState.RUNNING, VmState.DELETING),
}
