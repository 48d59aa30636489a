"""``/v1/pools``: warm pools (vmforge.node.pools). ``POST /v1/pools/{pool}/take`` hands out a
ready VM at once, renamed and with its identity refreshed; the pool's refiller makes the next
one. Pools are made and removed with the CLI (`vmforge pool create / rm`) on the node."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from pydantic import BaseModel, Field

from ..node import pools
from ..node.states import VmState
from ..spec import NAME_RE
from .app import daemon_of
from .models import VmOut
from .vms import vm_out

__all__ = ["router"]

router = APIRouter(tags=["pools"])

PoolName = Annotated[str, Path(pattern=NAME_RE.pattern, max_length=pools.POOL_NAME_MAX,
                               description="The pool's name")]


class PoolOut(BaseModel):
    name: str
    size: int
    snapshot_ref: str
    ready: list[str] = Field(description="Members ready to be taken, oldest first")
    making: list[str] = Field(description="Members being restored or replaced")
    refiller_pid: int | None = Field(None, description="The refiller's pid, when it runs")


class TakeIn(BaseModel):
    name: str | None = Field(None, pattern=NAME_RE.pattern, max_length=63,
                             description="The VM's new name (default POOL-XXXXXX)")
    timeout: float = Field(30.0, gt=0, le=3600,
                           description="Seconds to wait when no VM is ready")


class TakeOut(VmOut):
    take_seconds: float = Field(description="From the request to a renamed VM whose agent "
                                            "took its new identity")


def _pool_out(d: Any, pool: pools.Pool) -> dict[str, Any]:
    members = pools.members(d.manager, pool.name)
    return {"name": pool.name, "size": pool.size, "snapshot_ref": pool.snapshot_ref,
            "ready": [r.name for r in members if r.state is VmState.RUNNING],
            "making": [r.name for r in members if r.state is not VmState.RUNNING],
            "refiller_pid": pools.refiller_pid(d.manager, pool.name)}


@router.get("/pools", response_model=list[PoolOut], summary="List warm pools")
async def list_pools(request: Request) -> list[dict[str, Any]]:
    d = daemon_of(request)

    def rows() -> list[dict[str, Any]]:
        return [_pool_out(d, p) for p in pools.all_pools(d.manager) if not p.removing]
    return await asyncio.to_thread(rows)


@router.post("/pools/{pool}/take", response_model=TakeOut,
             summary="Take a ready VM from a warm pool",
             description="Renames a ready member to `name`, refreshes its identity through "
                         "its agent (hostname, machine-id, random pool, clock) and wakes the "
                         "pool's refiller. Waits up to `timeout` seconds when none is ready "
                         "(409 then).")
async def take(request: Request, pool: PoolName,
               body: Annotated[TakeIn | None, Body()] = None) -> dict[str, Any]:
    d = daemon_of(request)
    body = body or TakeIn(name=None, timeout=30.0)
    t0 = time.monotonic()
    rec = await pools.take(d.manager, pool, body.name, timeout=body.timeout)
    d.supervisor.poke()
    return {**vm_out(rec), "take_seconds": time.monotonic() - t0}
