"""``/v1/pools``: warm pools (vmforge.node.pools), as `vmforge pool create / ls / take / rm`.
``POST /v1/pools`` makes one from a spec (booted once, provisioned, snapshotted and stopped)
or from a snapshot, and starts its refiller (a detached `vmforge pool serve NAME`);
``POST /v1/pools/{pool}/take`` hands out a ready VM at once, renamed and with its identity
refreshed, and the refiller makes the next one. Creating a pool from a spec boots a VM, so it
runs as the other long operations do (vmforge.api.snapshots.run_long)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import SpecError, VmExists
from ..events import Progress
from ..node import pools
from ..node.states import VmState
from ..spec import NAME_RE, VmRequest, VmSpec, resolve_paths
from .app import daemon_of
from .images import REF_PATTERN
from .models import VmOut
from .snapshots import _JOB, Wait, get_snapshot_for, run_long
from .vms import vm_out

if TYPE_CHECKING:
    from ..node.manager import VmManager

__all__ = ["router"]

router = APIRouter(tags=["pools"])

PoolName = Annotated[str, Path(pattern=NAME_RE.pattern, max_length=pools.POOL_NAME_MAX,
                               description="The pool's name")]


class PoolOut(BaseModel):
    name: str
    size: int
    snapshot_id: int
    snapshot_ref: str
    owns_snapshot: bool = Field(description="The pool made its snapshot (from a spec): it is "
                                            "removed with the pool when nothing uses it")
    created_at: float
    removing: bool
    ready: list[str] = Field(description="Members ready to be taken, oldest first")
    making: list[str] = Field(description="Members being restored or replaced")
    refiller_pid: int | None = Field(None, description="The refiller's pid, when it runs")


class PoolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE.pattern, max_length=pools.POOL_NAME_MAX,
                      description="The pool's name")
    size: int = Field(ge=0, le=64, description="VMs to keep ready")
    spec: VmSpec | None = Field(None, description="A VM spec (as `spec` of POST /v1/vms): "
                                "booted once, provisioned, snapshotted; the pool restores "
                                "that. Relative paths are relative to the daemon's data "
                                "directory.")
    from_snapshot: str | None = Field(None, pattern=REF_PATTERN, max_length=80,
                                      description="Restore this snapshot instead")
    timeout: float = Field(300.0, gt=0, le=3600, description="Seconds for the template's "
                                                             "boot (with spec)")


class PoolRemovedOut(BaseModel):
    pool: str
    removed: list[str] = Field(description="The pool's VMs that were deleted")
    snapshot_kept: str | None = Field(None, description="The pool's own snapshot, kept "
                                                        "because VMs taken from it use it")


class TakeIn(BaseModel):
    name: str | None = Field(None, pattern=NAME_RE.pattern, max_length=63,
                             description="The VM's new name (default POOL-XXXXXX)")
    timeout: float = Field(30.0, gt=0, le=3600,
                           description="Seconds to wait when no VM is ready")


class TakeOut(VmOut):
    take_seconds: float = Field(description="From the request to a renamed VM whose agent "
                                            "took its new identity")


def _pool_out(d: Any, pool: pools.Pool, refiller: int | None = None) -> dict[str, Any]:
    """What `vmforge pool ls --json` prints for it (vmforge.cli.snapshots)."""
    members = pools.members(d.manager, pool.name)
    return {**pool.to_json(),
            "ready": [r.name for r in members if r.state is VmState.RUNNING],
            "making": [r.name for r in members if r.state is not VmState.RUNNING],
            "refiller_pid": pools.refiller_pid(d.manager, pool.name) or refiller}


@router.get("/pools", response_model=list[PoolOut], summary="List warm pools",
            description="As `vmforge pool ls`, a pool whose refiller is not running gets it "
                        "started again.")
async def list_pools(request: Request) -> list[dict[str, Any]]:
    d = daemon_of(request)

    def rows() -> list[dict[str, Any]]:
        out = []
        for p in pools.all_pools(d.manager):
            if not p.removing:
                pools.ensure_refiller(d.manager, p.name)
            out.append(_pool_out(d, p))
        return out
    return await asyncio.to_thread(rows)


@router.get("/pools/{pool}", response_model=PoolOut, summary="Inspect a warm pool")
async def get_pool(request: Request, pool: PoolName) -> dict[str, Any]:
    d = daemon_of(request)
    return await asyncio.to_thread(lambda: _pool_out(d, pools.get_pool(d.manager, pool)))


def _check_template(m: VmManager, req: VmRequest) -> None:
    """What the spec's files, images and backend must be, and that it can be snapshotted:
    refused (422, field-named) before the template boots. The host's part (the accelerator,
    a running hypervisor) is the job's to find."""
    from ..node import plan as planmod
    from ..node.snapshots import check_snapshottable
    drv = m.driver(req.spec.hypervisor)
    inputs = planmod.check_inputs(req, m.library)
    planmod.check_capabilities(req, drv.capabilities(), inputs)
    check_snapshottable(req, drv)


@router.post("/pools", response_model=PoolOut, status_code=201, responses=_JOB,
             summary="Create a warm pool",
             description="Keeps `size` VMs restored from `from_snapshot` ready, or from a "
                         "snapshot made for the pool of `spec` (booted once, provisioned, "
                         "saved and stopped; removed with the pool). Starts the pool's "
                         "refiller.")
async def create_pool(request: Request, body: PoolIn, wait: Wait = False) -> JSONResponse:
    d = daemon_of(request)
    if (body.spec is None) == (body.from_snapshot is None):
        raise SpecError("give a spec or from_snapshot, exactly one of them", field="spec",
                        hint="spec boots a template once; from_snapshot restores a snapshot")
    if await asyncio.to_thread(pools.find_pool, d.manager, body.name) is not None:
        raise VmExists(f"a pool named {body.name!r} exists", hint="GET /v1/pools")
    if body.from_snapshot is not None:
        await asyncio.to_thread(get_snapshot_for, d.manager, body.from_snapshot,
                                "from_snapshot")
    req = None
    if body.spec is not None:
        req = resolve_paths(VmRequest(name=f"{body.name}--template", spec=body.spec),
                            d.manager.data.root)
        await asyncio.to_thread(d.manager.ensure_images, req, d.progress())
        await asyncio.to_thread(_check_template, d.manager, req)

    def work(progress: Progress) -> dict[str, Any]:
        try:
            pool = asyncio.run(pools.create_pool(
                d.manager, body.name, body.size, req=req, snapshot_ref=body.from_snapshot,
                progress=progress, base_dir=d.manager.data.root, timeout=body.timeout))
        except SpecError as exc:  # the CLI's option names as the request's fields
            fields = {"--size": "size", "--name": "name", "pool": "name"}
            if exc.field in fields:
                raise SpecError(exc.message.split(": ", 1)[-1], field=fields[exc.field],
                                hint=exc.hint) from exc
            raise
        return _pool_out(d, pool, pools.ensure_refiller(d.manager, pool.name))
    res = await run_long(d, "pool.create", body.name, work, wait=wait, status=201,
                         location=lambda b: f"/v1/pools/{b['name']}")
    d.supervisor.poke()
    return res


@router.delete("/pools/{pool}", response_model=PoolRemovedOut, summary="Remove a warm pool",
               description="Stops the refiller, deletes the pool's ready VMs (taken ones "
                           "stay) and the snapshot it made for itself when nothing uses it.")
async def delete_pool(request: Request, pool: PoolName) -> dict[str, Any]:
    d = daemon_of(request)
    await asyncio.to_thread(pools.get_pool, d.manager, pool)  # 404 before anything

    def remove() -> dict[str, Any]:
        return dict(asyncio.run(pools.remove_pool(d.manager, pool,
                                                  progress=d.progress())))
    res = await asyncio.to_thread(remove)
    for name in res["removed"]:
        await d.agents.drop(name)
        d.supervisor.note_state(name, "deleted")
        d.bus.publish("vm", "state", "deleted", vm=name, state="deleted")
    d.supervisor.poke()
    return res


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
