"""The daemon's event stream: every VM state change and progress event, and every job's.

Events get integer ids that only grow, also across daemon restarts (they start at the
daemon's start time in microseconds), so a client resuming with ``Last-Event-ID`` after a
restart is given everything the new daemon has seen. A bounded ring buffer keeps the recent
past; a client that asks for an id older than the buffer gets a ``gap`` event first.

``publish`` may be called from any thread (the manager's sync calls run in worker threads);
subscribers are asyncio queues on the daemon's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..events import Event

__all__ = ["EventBus", "BusEvent", "sse_format"]


@dataclass(frozen=True)
class BusEvent:
    id: int
    kind: str                 # "vm", "job", "image", "daemon"
    phase: str                # "state", "ready", "create", "progress", ...
    message: str
    t: float
    vm: str | None = None
    job: str | None = None
    state: str | None = None  # for phase "state" (and "ready"): the VM's new state
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "kind": self.kind, "phase": self.phase,
                             "message": self.message, "t": self.t}
        for key in ("vm", "job", "state"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.data:
            d["data"] = self.data
        return d


def sse_format(ev: BusEvent) -> bytes:
    return (f"id: {ev.id}\nevent: {ev.kind}\n"
            f"data: {json.dumps(ev.to_json(), default=str)}\n\n").encode()


async def _next(q: asyncio.Queue[BusEvent | None]) -> BusEvent | None:
    return await q.get()


class EventBus:
    def __init__(self, capacity: int = 20000) -> None:
        self._next = time.time_ns() // 1000
        self._buf: deque[BusEvent] = deque(maxlen=capacity)
        self._subs: set[asyncio.Queue[BusEvent | None]] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def last_id(self) -> int:
        return self._next - 1

    # -- publishing
    def publish(self, kind: str, phase: str, message: str, *, vm: str | None = None,
                job: str | None = None, state: str | None = None,
                data: dict[str, Any] | None = None, t: float | None = None) -> BusEvent:
        with self._lock:
            ev = BusEvent(self._next, kind, phase, message, t or time.time(), vm, job, state,
                          dict(data or {}))
            self._next += 1
            self._buf.append(ev)
        loop = self._loop
        if loop is None or loop.is_closed():
            return ev
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._fanout(ev)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._fanout, ev)
        return ev

    def publish_event(self, e: Event, *, job: str | None = None) -> BusEvent:
        """A manager/builder progress event (:class:`vmforge.events.Event`)."""
        state = None
        if e.phase == "state":
            state = e.message
        elif e.phase == "ready":
            state = "ready"
        return self.publish("job" if job and e.vm is None else "vm", e.phase, e.message,
                            vm=e.vm, job=job, state=state, data=e.data, t=e.t)

    def _fanout(self, ev: BusEvent) -> None:
        for q in list(self._subs):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:  # a stuck reader: cut it off; it resumes by id
                self._subs.discard(q)
                with contextlib.suppress(asyncio.QueueFull):
                    q.get_nowait()
                    q.put_nowait(None)

    # -- reading
    def since(self, last_id: int | None) -> tuple[list[BusEvent], bool]:
        """Buffered events after ``last_id`` (all if None), and whether some were lost."""
        with self._lock:
            events = list(self._buf)
        if last_id is None:
            return events, False
        gap = bool(events) and last_id < events[0].id - 1 and last_id >= 0
        return [e for e in events if e.id > last_id], gap

    async def stream(self, last_id: int | None, *, replay: bool = True,
                     follow: bool = True, limit: float | None = None,
                     heartbeat: float = 15.0) -> AsyncIterator[BusEvent | None]:
        """Replay (after ``last_id``) then live events; ``None`` items are heartbeats."""
        q: asyncio.Queue[BusEvent | None] = asyncio.Queue(maxsize=10000)
        self._subs.add(q)
        try:
            sent = last_id if last_id is not None else -1
            if replay or last_id is not None:
                backlog, gap = self.since(last_id)
                if gap:
                    yield BusEvent(0, "daemon", "gap", "events were lost between the given "
                                   "Last-Event-ID and the oldest one kept", time.time())
                for ev in backlog:
                    sent = ev.id
                    yield ev
            else:
                sent = self.last_id
            if not follow:
                return
            deadline = None if limit is None else time.monotonic() + limit
            while True:
                wait = heartbeat
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return
                try:
                    item = await asyncio.wait_for(_next(q), wait)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    yield None
                    continue
                if item is None:
                    return  # dropped for being too slow
                if item.id <= sent:
                    continue  # also in the backlog
                sent = item.id
                yield item
        finally:
            self._subs.discard(q)
