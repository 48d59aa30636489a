"""One typed progress/event type for every long operation (VMs, images, jobs).

The CLI shows them as a spinner's text; the daemon streams them (SSE).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "Progress", "Say", "no_progress", "adapt"]


@dataclass(frozen=True)
class Event:
    vm: str | None      # the VM (or image/job) the event is about
    phase: str          # machine-readable: "create", "start", "state", "ready", "provision", ...
    message: str        # for people
    t: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "phase": self.phase, "message": self.message, "t": self.t,
                **({"data": self.data} if self.data else {})}


Progress = Callable[[Event], None]
Say = Callable[[str], None]  # inside one operation: its messages, wrapped into Events by adapt


def no_progress(_e: Event) -> None:
    return None


def adapt(progress: Progress, vm: str | None, phase: str) -> Say:
    """A plain-text callback for one operation's steps, emitting Events about ``vm``."""
    return lambda message: progress(Event(vm, phase, message))
