"""Agent sessions shared by the daemon's requests, one per VM.

A virtio-serial agent channel carries one host connection at a time, but calls on one
connection overlap (each has an id). So the daemon keeps one connection per VM for all its
requests: concurrent execs over the API run side by side instead of queueing, and a kept-alive
client pays no connect + hello per call. The connection is closed after ``idle`` seconds
without users, so that local ``vmforge exec`` (which queues on the channel's flock) gets its
turn, and at once before a stop, kill or delete (the manager's agent shutdown needs the
channel).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from ..agent.client import AgentClient
from ..errors import InvalidState
from ..node.manager import VmManager
from ..node.states import VmState

__all__ = ["AgentPool"]


@dataclass
class _Entry:
    client: AgentClient | None = None
    users: int = 0
    closer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AgentPool:
    def __init__(self, manager: VmManager, *, idle: float = 1.0,
                 queue_timeout: float = 30.0) -> None:
        self.manager = manager
        self.idle = idle
        self.queue_timeout = queue_timeout
        self._entries: dict[str, _Entry] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def _open(self, name: str) -> AgentClient:
        rec = await asyncio.to_thread(self.manager.get, name)
        if rec.state is not VmState.RUNNING:
            raise InvalidState(f"VM {name} is {rec.state.value}, not running",
                               hint=f"POST /v1/vms/{name}/start")
        if not rec.req.spec.agent.enabled:
            raise InvalidState(f"VM {name} has no agent", hint="set spec.agent.enabled: true")
        client = AgentClient(rec.agent_endpoint, queue_timeout=self.queue_timeout)
        await client.connect()
        return client

    @asynccontextmanager
    async def session(self, name: str) -> AsyncIterator[AgentClient]:
        entry = self._entries.setdefault(name, _Entry())
        async with entry.lock:
            if entry.closer is not None:
                entry.closer.cancel()
                entry.closer = None
            if entry.client is not None and not entry.client.connected:
                old, entry.client = entry.client, None
                await old.close()
            if entry.client is None:
                entry.client = await self._open(name)
            client = entry.client
            entry.users += 1
        try:
            yield client
        finally:
            entry.users -= 1
            if entry.users == 0 and self._entries.get(name) is entry:
                loop = asyncio.get_running_loop()
                entry.closer = loop.call_later(self.idle, self._close_later, name, entry)

    def _close_later(self, name: str, entry: _Entry) -> None:
        if entry.users == 0 and self._entries.get(name) is entry:
            task = asyncio.ensure_future(self.drop(name))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def drop(self, name: str) -> None:
        """Close the VM's shared connection now (before stop, kill, delete). Calls in
        progress fail; that is what stopping a VM does to them anyway."""
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        if entry.closer is not None:
            entry.closer.cancel()
        if entry.client is not None:
            with contextlib.suppress(Exception):
                await entry.client.close()

    async def close(self) -> None:
        for name in list(self._entries):
            await self.drop(name)
