"""The client's snapshot, clone, restore and warm pool calls (mixed into ``Client`` and
``AsyncClient``).

The long ones (``snapshot``, ``restore``, ``clone``, ``create_pool``) answer with their result
by default; with ``wait=False`` they answer at once with the daemon's job (``id``, ``state``,
``progress``, and at the end ``result``: the same body), to follow with ``job``/``wait_job``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SnapshotCalls", "AsyncSnapshotCalls"]

_SLACK = 60.0  # seconds the HTTP request may take beyond the operation's own timeout


def _pool_body(name: str, size: int, spec: Mapping[str, Any] | None,
               from_snapshot: str | None, timeout: float) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "size": size, "timeout": timeout}
    if spec is not None:
        body["spec"] = dict(spec)
    if from_snapshot is not None:
        body["from_snapshot"] = from_snapshot
    return body


def _opt(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


class SnapshotCalls:
    """Synchronous calls (``Client``)."""

    def _req(self, method: str, path: str, **kw: Any) -> Any:
        raise NotImplementedError

    # -- snapshots
    def snapshot(self, vm: str, name: str | None = None, *, stop: bool = False,
                 timeout: float = 120, wait: bool = True) -> dict[str, Any]:
        """Snapshot the running VM ``vm`` (``POST /v1/vms/{vm}/snapshots``)."""
        return dict(self._req("POST", f"/v1/vms/{vm}/snapshots",
                              json=_opt(name=name, stop=stop, timeout=timeout),
                              params={"wait": wait}, timeout=timeout + _SLACK))

    def snapshots(self) -> list[dict[str, Any]]:
        return list(self._req("GET", "/v1/snapshots"))

    def snapshot_info(self, ref: str, *, show_secrets: bool = False) -> dict[str, Any]:
        return dict(self._req("GET", f"/v1/snapshots/{ref}",
                              params={"show_secrets": show_secrets}))

    def remove_snapshot(self, ref: str) -> dict[str, Any]:
        """Refused (409, ``ImageError``) while a VM or a pool uses it."""
        return dict(self._req("DELETE", f"/v1/snapshots/{ref}"))

    def restore(self, ref: str, name: str, *, timeout: float = 120, wait: bool = True
                ) -> dict[str, Any]:
        """A new VM ``name`` from snapshot ``ref`` (``vmforge run --from-snapshot``)."""
        return dict(self._req("POST", f"/v1/snapshots/{ref}/restore",
                              json={"name": name, "timeout": timeout},
                              params={"wait": wait}, timeout=timeout + _SLACK))

    def clone(self, vm: str, name: str, *, snapshot_name: str | None = None,
              timeout: float = 120, wait: bool = True) -> dict[str, Any]:
        """A new VM ``name`` cloned from the running VM ``vm``; the answer's ``snapshot``
        names the snapshot it came from."""
        return dict(self._req("POST", f"/v1/vms/{vm}/clone",
                              json=_opt(name=name, snapshot_name=snapshot_name,
                                        timeout=timeout),
                              params={"wait": wait}, timeout=2 * timeout + _SLACK))

    # -- pools
    def pools(self) -> list[dict[str, Any]]:
        return list(self._req("GET", "/v1/pools"))

    def pool(self, name: str) -> dict[str, Any]:
        return dict(self._req("GET", f"/v1/pools/{name}"))

    def create_pool(self, name: str, size: int, *, spec: Mapping[str, Any] | None = None,
                    from_snapshot: str | None = None, timeout: float = 300,
                    wait: bool = True) -> dict[str, Any]:
        """A warm pool of ``size`` VMs from ``spec`` (the ``spec`` part of a create request)
        or from the snapshot ``from_snapshot``."""
        return dict(self._req("POST", "/v1/pools",
                              json=_pool_body(name, size, spec, from_snapshot, timeout),
                              params={"wait": wait}, timeout=timeout + 2 * _SLACK))

    def take(self, pool: str, name: str | None = None, *, timeout: float = 30
             ) -> dict[str, Any]:
        """A ready VM from the pool, renamed ``name``; ``take_seconds`` says how long."""
        return dict(self._req("POST", f"/v1/pools/{pool}/take",
                              json=_opt(name=name, timeout=timeout),
                              timeout=timeout + _SLACK))

    def remove_pool(self, name: str) -> dict[str, Any]:
        return dict(self._req("DELETE", f"/v1/pools/{name}", timeout=180))


class AsyncSnapshotCalls:
    """The same calls as coroutines (``AsyncClient``)."""

    async def _req(self, method: str, path: str, **kw: Any) -> Any:
        raise NotImplementedError

    async def snapshot(self, vm: str, name: str | None = None, *, stop: bool = False,
                       timeout: float = 120, wait: bool = True) -> dict[str, Any]:
        return dict(await self._req("POST", f"/v1/vms/{vm}/snapshots",
                                    json=_opt(name=name, stop=stop, timeout=timeout),
                                    params={"wait": wait}, timeout=timeout + _SLACK))

    async def snapshots(self) -> list[dict[str, Any]]:
        return list(await self._req("GET", "/v1/snapshots"))

    async def snapshot_info(self, ref: str, *, show_secrets: bool = False) -> dict[str, Any]:
        return dict(await self._req("GET", f"/v1/snapshots/{ref}",
                                    params={"show_secrets": show_secrets}))

    async def remove_snapshot(self, ref: str) -> dict[str, Any]:
        return dict(await self._req("DELETE", f"/v1/snapshots/{ref}"))

    async def restore(self, ref: str, name: str, *, timeout: float = 120, wait: bool = True
                      ) -> dict[str, Any]:
        return dict(await self._req("POST", f"/v1/snapshots/{ref}/restore",
                                    json={"name": name, "timeout": timeout},
                                    params={"wait": wait}, timeout=timeout + _SLACK))

    async def clone(self, vm: str, name: str, *, snapshot_name: str | None = None,
                    timeout: float = 120, wait: bool = True) -> dict[str, Any]:
        return dict(await self._req("POST", f"/v1/vms/{vm}/clone",
                                    json=_opt(name=name, snapshot_name=snapshot_name,
                                              timeout=timeout),
                                    params={"wait": wait}, timeout=2 * timeout + _SLACK))

    async def pools(self) -> list[dict[str, Any]]:
        return list(await self._req("GET", "/v1/pools"))

    async def pool(self, name: str) -> dict[str, Any]:
        return dict(await self._req("GET", f"/v1/pools/{name}"))

    async def create_pool(self, name: str, size: int, *,
                          spec: Mapping[str, Any] | None = None,
                          from_snapshot: str | None = None, timeout: float = 300,
                          wait: bool = True) -> dict[str, Any]:
        return dict(await self._req("POST", "/v1/pools",
                                    json=_pool_body(name, size, spec, from_snapshot, timeout),
                                    params={"wait": wait}, timeout=timeout + 2 * _SLACK))

    async def take(self, pool: str, name: str | None = None, *, timeout: float = 30
                   ) -> dict[str, Any]:
        return dict(await self._req("POST", f"/v1/pools/{pool}/take",
                                    json=_opt(name=name, timeout=timeout),
                                    timeout=timeout + _SLACK))

    async def remove_pool(self, name: str) -> dict[str, Any]:
        return dict(await self._req("DELETE", f"/v1/pools/{name}", timeout=180))
