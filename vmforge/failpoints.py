"""Named points in long operations where a test can make this very process die or freeze, to
prove that whatever is left behind is recovered (the crash-injection suite).

``VMFORGE_FAILPOINT=NAME:ACTION`` with ACTION one of ``kill`` (SIGKILL), ``term`` (SIGTERM, which
the CLI handles like Ctrl-C), ``stop`` (SIGSTOP: frozen, holding its locks, until SIGCONT).
Unset (always, outside tests) a failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["hit", "POINTS"]

# Every point, in the order a `run` / `stop` / `rm` passes them.
POINTS = (
    "create.row", "create.artifacts", "create.renamed",
    "start.starting", "start.recorded", "start.launched", "start.running",
    "wait.agent",
    "stop.stopping", "stop.agent-asked",
    "delete.deleting", "delete.killed",
    # vmforge.node.snapshots and vmforge.node.restore
    "snapshot.journal", "snapshot.saved", "snapshot.overlays", "snapshot.renamed",
    "snapshot.switched", "snapshot.resumed", "snapshot.stored", "snapshot.rebased",
    "restore.row", "restore.created", "restore.launched", "restore.resumed",
    "restore.identity",
)

_ACTIONS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}


def hit(name: str) -> None:
    spec = os.environ.get("VMFORGE_FAILPOINT")
    if not spec:
        return
    point, _, action = spec.partition(":")
    if point == name:
        os.kill(os.getpid(), _ACTIONS[action or "kill"])
