"""Supervision: the daemon knows why a VM stopped, and VMs outlive the daemon.

* QEMU: one QMP connection per running VM. ``SHUTDOWN`` with ``guest: true`` is a guest
  power-off, ``GUEST_PANICKED`` (or a shutdown for ``guest-panic``) a panic, and the monitor
  closing without either means QEMU died; each is handed to ``VmManager.record_exit``.
* QEMU's QMP socket serves one client at a time, and stop (the manager's and the CLI's) opens
  its own QMP connection. So the watcher lets go of the monitor whenever anyone holds the
  VM's lock (read from ``/proc/locks``, without touching the lock) and reconnects when the
  lock is free and the VM still runs.
* Other backends (libvirt): a periodic reconcile through ``VmManager.vms()``, which asks the
  driver whether each running VM's process is still there.
* Every reconcile also publishes the state changes that happened outside the daemon (a local
  ``vmforge stop``, a VM that died), so the event stream tells the whole story.

The daemon never stops VMs when it exits: on start it adopts every running VM (first
reconcile) and reconnects its monitors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VmforgeError
from ..hypervisors.base import Backend, Runtime
from ..node.manager import VmManager, VmRecord
from ..node.states import TRANSIENT, ExitReason, VmState
from .events import EventBus

__all__ = ["Supervisor", "locks_held", "exit_reason"]

log = logging.getLogger("vmforge.api.supervisor")


def locks_held(paths: list[Path]) -> set[Path]:
    """Which of these lock files somebody holds an flock on, from ``/proc/locks``."""
    wanted: dict[tuple[str, int], Path] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        wanted[(dev, st.st_ino)] = p
    if not wanted:
        return set()
    held: set[Path] = set()
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return held
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF" ("->" marks a blocked waiter)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        dev, _, ino = parts[5].rpartition(":")
        if ino.isdigit() and (dev, int(ino)) in wanted:
            held.add(wanted[(dev, int(ino))])
    return held


def exit_reason(events: list[dict[str, Any]]) -> ExitReason:
    """Why QEMU went away, from the QMP events it sent before its monitor closed."""
    for ev in events:
        if ev.get("event") == "GUEST_PANICKED":
            return ExitReason.GUEST_PANIC
    for ev in events:
        if ev.get("event") == "SHUTDOWN":
            data = ev.get("data") or {}
            if data.get("reason") == "guest-panic":
                return ExitReason.GUEST_PANIC
            if data.get("guest"):
                return ExitReason.GUEST_SHUTDOWN
            if str(data.get("reason", "")).startswith("host-qmp"):
                return ExitReason.STOPPED
            return ExitReason.HYPERVISOR_DIED  # host-signal: killed from outside
    return ExitReason.HYPERVISOR_DIED


async def _collect(listener: Any, events: list[dict[str, Any]]) -> None:
    async for ev in listener:
        events.append(dict(ev))


@dataclass
class _Watch:
    rt: Runtime
    task: asyncio.Task[None]


class Supervisor:
    def __init__(self, manager: VmManager, bus: EventBus, *, interval: float = 2.0,
                 lock_poll: float = 0.25) -> None:
        self.manager = manager
        self.bus = bus
        self.interval = interval
        self.lock_poll = lock_poll
        self._watches: dict[str, _Watch] = {}
        self._states: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.adopted: list[str] = []
        self.on_exit: list[Callable[[str, ExitReason], None]] = []

    # -- lifecycle
    async def start(self) -> None:
        recs = await self._reconcile()
        self.adopted = [r.name for r in recs if r.state is VmState.RUNNING]
        if self.adopted:
            self.bus.publish("daemon", "adopted", f"adopted {len(self.adopted)} running VM(s)",
                             data={"vms": self.adopted})
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for w in list(self._watches.values()):
            w.task.cancel()
        for w in list(self._watches.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w.task
        self._watches.clear()

    def poke(self) -> None:
        """Reconcile soon (after the daemon started or stopped a VM)."""
        self._wake.set()

    def watching(self) -> dict[str, int | None]:
        return {n: w.rt.pid for n, w in self._watches.items() if not w.task.done()}

    def note_state(self, vm: str, state: str) -> None:
        """A state the daemon itself published: not reported again by the reconcile."""
        self._states[vm] = state

    # -- reconcile
    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self._reconcile()
            except Exception:  # noqa: BLE001 - the supervisor must outlive a bad pass
                log.exception("reconcile failed")

    async def _reconcile(self) -> list[VmRecord]:
        recs = await asyncio.to_thread(self.manager.vms)
        seen = set()
        for rec in recs:
            seen.add(rec.name)
            self._report(rec)
            if rec.state is VmState.RUNNING and rec.runtime is not None and \
                    rec.backend is Backend.QEMU:
                w = self._watches.get(rec.name)
                if w is None or w.task.done() or w.rt.pid != rec.runtime.pid:
                    if w is not None:
                        w.task.cancel()
                    self._watches[rec.name] = _Watch(rec.runtime, asyncio.create_task(
                        self._watch_qemu(rec.name, rec.runtime)))
        for name in list(self._watches):
            if name not in seen:
                self._watches.pop(name).task.cancel()
        for name in list(self._states):
            if name not in seen:
                del self._states[name]
                self.bus.publish("vm", "state", "deleted", vm=name, state="deleted",
                                 data={"source": "reconcile"})
        return recs

    def _report(self, rec: VmRecord) -> None:
        if rec.state in TRANSIENT:
            return  # somebody is at work on it and reports it themselves
        prev = self._states.get(rec.name)
        state = rec.state.value
        if prev == state or (prev == "ready" and state == "running"):
            return
        self._states[rec.name] = state
        data: dict[str, Any] = {"source": "reconcile"}
        if rec.stop_reason and rec.state in (VmState.STOPPED, VmState.CRASHED):
            data["reason"] = rec.stop_reason
        if rec.last_error and rec.state is VmState.CRASHED:
            data["error"] = rec.last_error
        self.bus.publish("vm", "state", state, vm=rec.name, state=state, data=data)

    # -- QEMU monitors
    async def _watch_qemu(self, name: str, rt: Runtime) -> None:
        from qemu.qmp import QMPClient, Runstate

        lock_path = self.manager.data.locks / f"{name}.lock"
        failures = 0
        while True:
            # Let go of the monitor while anybody works on the VM (stop needs QMP).
            while locks_held([lock_path]):
                await asyncio.sleep(self.lock_poll)
            rec = await asyncio.to_thread(self._get, name)
            if rec is None or rec.state is not VmState.RUNNING or rec.runtime is None or \
                    rec.runtime.pid != rt.pid:
                return
            client = QMPClient(f"vmforge-supervisor-{name}")
            events: list[dict[str, Any]] = []
            try:
                await asyncio.wait_for(client.connect(rt.control), 5)
            except Exception as exc:  # noqa: BLE001 - qemu.qmp has its own error tree
                failures += 1
                log.debug("QMP connect to %s failed: %r", name, exc)
                with contextlib.suppress(Exception):
                    await client.disconnect()
                await asyncio.sleep(min(5.0, 0.2 * failures))
                continue
            failures = 0
            let_go = False
            try:
                with client.listener(("SHUTDOWN", "GUEST_PANICKED")) as listener:
                    collector = asyncio.create_task(_collect(listener, events))
                    try:
                        while client.runstate is Runstate.RUNNING:
                            if locks_held([lock_path]):
                                let_go = True
                                break
                            await asyncio.sleep(self.lock_poll)
                        await asyncio.sleep(0.05)  # events read before the EOF are dispatched
                    finally:
                        collector.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await collector
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()
            if let_go:
                continue
            await self._exited(name, rt, exit_reason(events))
            return

    def _get(self, name: str) -> VmRecord | None:
        try:
            return self.manager.get(name, reconcile=False)
        except VmforgeError:
            return None

    async def _exited(self, name: str, rt: Runtime, reason: ExitReason) -> None:
        log.info("VM %s: QEMU monitor closed (%s)", name, reason.value)
        # QEMU may take a moment to exit after closing its monitor.
        from ..hypervisors import get_driver
        from ..hypervisors.base import Liveness
        drv = get_driver(rt.backend)
        deadline = time.monotonic() + 5
        while drv.status(rt) in (Liveness.RUNNING, Liveness.PAUSED) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            rec = await asyncio.to_thread(self.manager.record_exit, name, reason)
        except VmforgeError:
            return
        for fn in self.on_exit:
            fn(name, reason)
        self._report(rec)
