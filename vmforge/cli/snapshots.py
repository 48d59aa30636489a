"""`vmforge snapshot`, `vmforge clone` and `vmforge pool`: memory snapshots of running VMs,
clones restored from them, and warm pools of restored VMs handed out at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import _state, err, errors_reported, human_size, out, print_json, progress

if TYPE_CHECKING:
    from ..node.manager import VmManager
    from ..node.snapshots import Snapshot

__all__ = ["register_snapshots", "snapshot_app", "pool_app", "restore_as",
           "from_snapshot_run"]

snapshot_app = typer.Typer(no_args_is_help=True, help="Memory snapshots of running VMs: "
                           "memory, devices and disk layers as one library object.")
pool_app = typer.Typer(no_args_is_help=True, help="Warm pools: VMs restored from a snapshot "
                       "and kept ready; `pool take` hands one out at once.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _manager() -> VmManager:
    """These commands work on this machine's data directory (not through --host)."""
    from ..errors import VmforgeError
    from ..node.manager import VmManager
    from ..paths import DataDir
    if _state.get("host"):
        raise VmforgeError("snapshots, clones and pools work on this machine only, not "
                           "against a daemon (--host / VMFORGE_HOST is set)",
                           hint="run it on the node; the daemon offers POST "
                                "/v1/pools/{pool}/take")
    d = _state["data_dir"]
    return VmManager(DataDir(d) if d else None)


def _arun(coro: Any) -> Any:
    import asyncio
    return asyncio.run(coro)


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


# ---------------------------------------------------------------------------- snapshot

@snapshot_app.command("create")
def snapshot_create(
    vm: Annotated[str, typer.Argument(help="The running VM.")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Snapshot name (default "
                    "VM-snap; each snapshot of a name is a new version).")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Leave the VM stopped afterwards "
                    "(default: it runs on).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Save a running VM's memory, devices and disks as a snapshot. The VM pauses for about
    the time its memory takes to write; its disks continue on new overlays over the
    snapshot's read-only layers."""
    from ..node import snapshots
    with errors_reported():
        m = _manager()
        t0 = time.monotonic()
        with progress(f"snapshot of {vm}") as p:
            snap = snapshots.create(m, vm, name, stop=stop, progress=p)
        if json_out:
            print_json(_snapshot_dict(m, snap))
            return
        meta = snap.meta
        out.print(f"snapshot [bold]{snap.ref}[/] of {vm} in {time.monotonic() - t0:.2f}s "
                  f"(paused {meta.get('paused_seconds', 0):.2f}s) · "
                  f"{human_size(snap.image.size)} · VM {'stopped' if stop else 'running'}",
                  highlight=False)


def _snapshot_dict(m: VmManager, snap: Snapshot, *, show_secrets: bool = False
                   ) -> dict[str, Any]:
    from ..node import snapshots
    parent = m.library.get(snap.image.parent_id).ref if snap.image.parent_id else None
    d = snap.as_dict(users=snapshots.users(m, snap), parent=parent, show_secrets=show_secrets)
    d["lineage"] = m.library.lineage(snap.image)
    return d


@snapshot_app.command("ls")
def snapshot_ls(json_out: JsonOpt = False) -> None:
    """List snapshots with their parent image, size and the VMs that use them."""
    from ..node import snapshots
    with errors_reported():
        m = _manager()
        rows = [_snapshot_dict(m, s) for s in snapshots.all_snapshots(m)]
        if json_out:
            print_json(rows)
            return
        from rich.table import Table
        t = Table(box=None, header_style="bold")
        for col in ("SNAPSHOT", "FROM VM", "PARENT", "MEMORY", "DISKS", "SIZE", "USED BY",
                    "AGE"):
            t.add_column(col)
        now = time.time()
        for r in rows:
            t.add_row(r["ref"], r["source_vm"] or "-", r["parent"] or "-",
                      f"{r['memory_mib']} MiB" if r["memory_mib"] else "-",
                      ", ".join(r["disks"]) or "-", human_size(r["size"]),
                      ", ".join(r["users"]) or "-", _age(now - r["created_at"]))
        out.print(t)


@snapshot_app.command("inspect")
def snapshot_inspect(
    ref: Annotated[str, typer.Argument(help="Snapshot (NAME or NAME:VERSION).")],
    json_out: JsonOpt = False,
    show_secrets: Annotated[bool, typer.Option("--show-secrets", help="Show user-data and "
                            "vendor-data of the saved spec.")] = False,
) -> None:
    """Everything about a snapshot: files and checksums, lineage, hypervisor, users."""
    from ..node import snapshots
    with errors_reported():
        m = _manager()
        d = _snapshot_dict(m, snapshots.get(m, ref), show_secrets=show_secrets)
        if json_out:
            print_json(d)
            return
        for key in ("ref", "source_vm", "parent", "lineage", "backend", "hypervisor_version",
                    "machine_type", "accel", "memory_mib", "cpu_cores", "paused_seconds",
                    "users"):
            out.print(f"[bold]{key:>18}[/]: {d[key]}", highlight=False)
        for role, f in d["files"].items():
            out.print(f"[bold]{role:>18}[/]: {human_size(f['size'])} sha256:{f['sha256']}",
                      highlight=False)


@snapshot_app.command("rm")
def snapshot_rm(refs: Annotated[list[str], typer.Argument(help="Snapshot(s).")]) -> None:
    """Delete snapshots no VM, pool or later snapshot uses."""
    from ..node import snapshots
    with errors_reported():
        m = _manager()
        for ref in refs:
            snap = snapshots.remove(m, ref)
            out.print(f"removed snapshot [bold]{snap.ref}[/]", highlight=False)


# ---------------------------------------------------------------------------- clone, run

def restore_as(m: VmManager, ref: str, names: list[str], timeout: float) -> list[Any]:
    """``vmforge run --from-snapshot``: restore ``ref`` as each of ``names``."""
    from ..node.restore import restore
    recs = []
    for n in names:
        with progress(n) as p:
            recs.append(_arun(restore(m, ref, n, progress=p, timeout=timeout)))
    return recs


def from_snapshot_run(spec: Path | None, ref: str | None, names: list[str] | None,
                      timeout: float, json_out: bool) -> None:
    """``vmforge run --from-snapshot S --name N``: the run command's other half."""
    from ..errors import SpecError
    if ref is None:
        raise SpecError("give a spec (-f FILE) or a snapshot (--from-snapshot S)", field="-f")
    if spec is not None:
        raise SpecError("-f and --from-snapshot exclude each other: the snapshot carries "
                        "its spec", field="--from-snapshot")
    if not names:
        raise SpecError("a VM restored from a snapshot needs a --name", field="--name",
                        hint=f"vmforge run --from-snapshot {ref} --name NAME")
    recs = restore_as(_manager(), ref, names, timeout)
    if json_out:
        print_json([r.as_dict() for r in recs])
        return
    print_restored(recs, ref)


def print_restored(recs: list[Any], source: str) -> None:
    for r in recs:
        out.print(f"[bold green]{r.name}[/] is ready in [bold]{r.boot_seconds or 0:.2f}s[/] "
                  f"(restored from {source}) · {r.backend.value} · accel {r.accel} · pid "
                  f"{r.pid}", highlight=False)
        if r.last_error:
            err.print(f"[yellow]warning:[/] {r.last_error}", highlight=False)


def clone_cmd(
    vm: Annotated[str, typer.Argument(help="The running VM to clone.")],
    name: Annotated[list[str], typer.Option("--name", "-n", help="The clone's name (repeat "
                    "for several clones of one snapshot).")],
    snapshot_name: Annotated[str | None, typer.Option("--snapshot-name", help="Name of the "
                             "snapshot the clones come from (default VM-clone).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each clone.")] = 120,
    json_out: JsonOpt = False,
) -> None:
    """A new VM that is a copy of a running one: its memory (processes, files in RAM) and its
    disks as they are now, with its own identity (hostname, machine-id, random pool, clock).
    The source keeps running; the snapshot stays in the library while clones use it."""
    from ..node import snapshots
    with errors_reported():
        m = _manager()
        with progress(f"snapshot of {vm}") as p:
            snap = snapshots.create(m, vm, snapshot_name or f"{vm}-clone", progress=p)
        recs = restore_as(m, snap.ref, name, timeout)
        if json_out:
            print_json([r.as_dict() for r in recs])
            return
        print_restored(recs, snap.ref)


# ---------------------------------------------------------------------------- pool

@pool_app.command("create")
def pool_create(
    name: Annotated[str, typer.Argument(help="Pool name.")],
    size: Annotated[int, typer.Option("--size", help="VMs to keep ready.")],
    spec: Annotated[Path | None, typer.Option("-f", "--file", help="VM spec: booted once, "
                    "provisioned, snapshotted; the pool restores that.")] = None,
    from_snapshot: Annotated[str | None, typer.Option("--from-snapshot", help="Restore this "
                             "snapshot instead.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a warm pool and start its refiller (a detached `vmforge pool serve NAME`)."""
    from ..node import pools
    with errors_reported():
        m = _manager()
        req = None
        if spec is not None:
            from ..spec import load_request
            req = load_request(spec, None)
        with progress(f"pool {name}") as p:
            pool = _arun(pools.create_pool(m, name, size, req=req, snapshot_ref=from_snapshot,
                                           progress=p,
                                           base_dir=spec.resolve().parent if spec else None))
        if json_out:
            print_json(_pool_dict(m, pool))
            return
        pid = pools.ensure_refiller(m, name)
        out.print(f"pool [bold]{pool.name}[/]: {pool.size} VM(s) from snapshot "
                  f"{pool.snapshot_ref}; refiller pid {pid}", highlight=False)


def _pool_dict(m: VmManager, pool: Any) -> dict[str, Any]:
    from ..node import pools
    from ..node.states import VmState
    mem = pools.members(m, pool.name)
    ready = [r.name for r in mem if r.state is VmState.RUNNING]
    return {**pool.to_json(), "ready": ready,
            "making": [r.name for r in mem if r.state is not VmState.RUNNING],
            "refiller_pid": pools.refiller_pid(m, pool.name)}


@pool_app.command("ls")
def pool_ls(json_out: JsonOpt = False) -> None:
    """List pools: size, ready VMs, the refiller (started again when it is not running)."""
    from ..node import pools
    with errors_reported():
        m = _manager()
        rows = []
        for pool in pools.all_pools(m):
            if not pool.removing:
                pools.ensure_refiller(m, pool.name)
            rows.append(_pool_dict(m, pool))
        if json_out:
            print_json(rows)
            return
        from rich.table import Table
        t = Table(box=None, header_style="bold")
        for col in ("POOL", "SIZE", "READY", "MAKING", "SNAPSHOT", "REFILLER"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], str(r["size"]), str(len(r["ready"])), str(len(r["making"])),
                      r["snapshot_ref"], f"pid {r['refiller_pid']}" if r["refiller_pid"]
                      else "-")
        out.print(t)


@pool_app.command("take")
def pool_take(
    name: Annotated[str, typer.Argument(help="Pool name.")],
    vm_name: Annotated[str | None, typer.Option("--name", "-n", help="The VM's new name "
                       "(default POOL-XXXXXX).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait when no VM is ready.")]
    = 300,
    json_out: JsonOpt = False,
) -> None:
    """Hand out a ready VM at once: renamed, its identity refreshed; the pool refills."""
    from ..node import pools
    with errors_reported():
        m = _manager()
        t0 = time.monotonic()
        rec = _arun(pools.take(m, name, vm_name, timeout=timeout))
        took = time.monotonic() - t0
        if json_out:
            print_json({**rec.as_dict(), "take_seconds": took})
            return
        out.print(f"[bold green]{rec.name}[/] taken from pool {name} in "
                  f"[bold]{took * 1000:.0f} ms[/] · pid {rec.pid}", highlight=False)
        if rec.last_error:
            err.print(f"[yellow]warning:[/] {rec.last_error}", highlight=False)


@pool_app.command("rm")
def pool_rm(names: Annotated[list[str], typer.Argument(help="Pool name(s).")]) -> None:
    """Stop the refiller, delete the pool's ready VMs (taken ones stay) and the snapshot it
    made for itself when nothing uses it any more."""
    from ..node import pools
    with errors_reported():
        m = _manager()
        for n in names:
            res = _arun(pools.remove_pool(m, n))
            out.print(f"removed pool [bold]{n}[/] ({len(res['removed'])} VM(s))",
                      highlight=False)
            if res["snapshot_kept"]:
                err.print(f"[yellow]kept snapshot[/] {res['snapshot_kept']}", highlight=False)


@pool_app.command("serve", hidden=True)
def pool_serve(name: Annotated[str, typer.Argument(help="Pool name.")]) -> None:
    """The pool's refiller (started by the other pool commands; one per pool)."""
    import sys

    from ..node import pools
    with errors_reported():
        m = _manager()
        pools.get_pool(m, name)

        def log(msg: str) -> None:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
        raise typer.Exit(pools.serve(m, name, log=log))


def register_snapshots(app: typer.Typer) -> None:
    app.add_typer(snapshot_app, name="snapshot")
    app.add_typer(pool_app, name="pool")
    app.command("clone")(clone_cmd)
