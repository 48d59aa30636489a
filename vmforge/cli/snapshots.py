"""`vmforge snapshot`, `vmforge clone` and `vmforge pool`: memory snapshots of running VMs,
clones restored from them, and warm pools of restored VMs handed out at once.

The commands work on this machine's data directory (:class:`LocalOps`) or, with ``--host`` /
``VMFORGE_HOST``, through the daemon (:class:`vmforge.cli.remote.RemoteSnapshots`): both give
the same dicts and records, and the output is made here, once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, cast

import typer

from .common import _state, err, errors_reported, human_size, out, print_json, progress

if TYPE_CHECKING:
    from ..events import Progress
    from ..node.manager import VmManager, VmRecord
    from ..node.snapshots import Snapshot
    from .remote import RemoteManager

__all__ = ["register_snapshots", "snapshot_app", "pool_app", "restore_as",
           "from_snapshot_run", "SnapshotOps", "LocalOps", "snapshot_ops"]

snapshot_app = typer.Typer(no_args_is_help=True, help="Memory snapshots of running VMs: "
                           "memory, devices and disk layers as one library object.")
pool_app = typer.Typer(no_args_is_help=True, help="Warm pools: VMs restored from a snapshot "
                       "and kept ready; `pool take` hands one out at once.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _manager() -> VmManager:
    """This machine's manager (`pool serve`, the refiller, runs on the node only)."""
    from ..errors import VmforgeError
    from ..node.manager import VmManager
    from ..paths import DataDir
    if _state.get("host"):
        raise VmforgeError("a pool's refiller runs on the node itself, not against a daemon "
                           "(--host / VMFORGE_HOST is set)",
                           hint="`vmforge pool ls` through the daemon starts it when needed")
    d = _state["data_dir"]
    return VmManager(DataDir(d) if d else None)


class SnapshotOps(Protocol):
    """What the commands need, here or through a daemon; dicts are what ``--json`` prints."""

    def snapshot_create(self, vm: str, name: str | None, stop: bool,
                        progress: Progress) -> dict[str, Any]: ...
    def snapshots(self) -> list[dict[str, Any]]: ...
    def snapshot(self, ref: str, show_secrets: bool) -> dict[str, Any]: ...
    def remove_snapshot(self, ref: str) -> str: ...
    def restore(self, ref: str, name: str, timeout: float,
                progress: Progress) -> VmRecord: ...
    def clone(self, vm: str, names: list[str], snapshot_name: str | None,
              timeout: float) -> tuple[list[VmRecord], str]: ...
    def create_pool(self, name: str, size: int, spec: Path | None,
                    from_snapshot: str | None, progress: Progress) -> dict[str, Any]: ...
    def pools(self) -> list[dict[str, Any]]: ...
    def take(self, pool: str, name: str | None, timeout: float) -> VmRecord: ...
    def remove_pool(self, name: str) -> dict[str, Any]: ...


class LocalOps:
    """On this machine's data directory."""

    def __init__(self, m: VmManager) -> None:
        self.m = m

    def snapshot_create(self, vm: str, name: str | None, stop: bool,
                        progress: Progress) -> dict[str, Any]:
        from ..node import snapshots
        return _snapshot_dict(self.m, snapshots.create(self.m, vm, name, stop=stop,
                                                       progress=progress))

    def snapshots(self) -> list[dict[str, Any]]:
        from ..node import snapshots
        return [_snapshot_dict(self.m, s) for s in snapshots.all_snapshots(self.m)]

    def snapshot(self, ref: str, show_secrets: bool) -> dict[str, Any]:
        from ..node import snapshots
        return _snapshot_dict(self.m, snapshots.get(self.m, ref), show_secrets=show_secrets)

    def remove_snapshot(self, ref: str) -> str:
        from ..node import snapshots
        return snapshots.remove(self.m, ref).ref

    def restore(self, ref: str, name: str, timeout: float, progress: Progress) -> VmRecord:
        from ..node.restore import restore
        rec: VmRecord = _arun(restore(self.m, ref, name, progress=progress, timeout=timeout))
        return rec

    def clone(self, vm: str, names: list[str], snapshot_name: str | None,
              timeout: float) -> tuple[list[VmRecord], str]:
        from ..node import snapshots
        from ..spec import validate_name
        for n in names:  # before the snapshot is taken, not after
            validate_name(n)
        with progress(f"snapshot of {vm}") as p:
            snap = snapshots.create(self.m, vm, snapshot_name or f"{vm}-clone", progress=p)
        return restore_as(self, snap.ref, names, timeout), snap.ref

    def create_pool(self, name: str, size: int, spec: Path | None,
                    from_snapshot: str | None, progress: Progress) -> dict[str, Any]:
        from ..node import pools
        req = None
        if spec is not None:
            from ..spec import load_request
            req = load_request(spec, None)
        pool = _arun(pools.create_pool(self.m, name, size, req=req,
                                       snapshot_ref=from_snapshot, progress=progress,
                                       base_dir=spec.resolve().parent if spec else None))
        return _pool_dict(self.m, pool, pools.ensure_refiller(self.m, name))

    def pools(self) -> list[dict[str, Any]]:
        from ..node import pools
        rows = []
        for pool in pools.all_pools(self.m):
            if not pool.removing:
                pools.ensure_refiller(self.m, pool.name)
            rows.append(_pool_dict(self.m, pool))
        return rows

    def take(self, pool: str, name: str | None, timeout: float) -> VmRecord:
        from ..node import pools
        rec: VmRecord = _arun(pools.take(self.m, pool, name, timeout=timeout))
        return rec

    def remove_pool(self, name: str) -> dict[str, Any]:
        from ..node import pools
        return dict(_arun(pools.remove_pool(self.m, name)))


def snapshot_ops() -> SnapshotOps:
    """Through the daemon when ``--host`` / ``VMFORGE_HOST`` is set, else here."""
    if _state.get("host"):
        from .common import manager
        from .remote import RemoteSnapshots
        return RemoteSnapshots(cast("RemoteManager", manager()))
    from ..node.manager import VmManager
    from ..paths import DataDir
    d = _state["data_dir"]
    return LocalOps(VmManager(DataDir(d) if d else None))


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
    with errors_reported():
        ops = snapshot_ops()
        t0 = time.monotonic()
        with progress(f"snapshot of {vm}") as p:
            d = ops.snapshot_create(vm, name, stop, p)
        if json_out:
            print_json(d)
            return
        out.print(f"snapshot [bold]{d['ref']}[/] of {vm} in {time.monotonic() - t0:.2f}s "
                  f"(paused {d.get('paused_seconds') or 0:.2f}s) · "
                  f"{human_size(d['size'])} · VM {'stopped' if stop else 'running'}",
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
    with errors_reported():
        rows = snapshot_ops().snapshots()
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
    with errors_reported():
        d = snapshot_ops().snapshot(ref, show_secrets)
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
    with errors_reported():
        ops = snapshot_ops()
        for ref in refs:
            removed = ops.remove_snapshot(ref)
            out.print(f"removed snapshot [bold]{removed}[/]", highlight=False)


# ---------------------------------------------------------------------------- clone, run

def restore_as(ops: SnapshotOps, ref: str, names: list[str], timeout: float
               ) -> list[VmRecord]:
    """``vmforge run --from-snapshot``: restore ``ref`` as each of ``names``."""
    recs = []
    for n in names:
        with progress(n) as p:
            recs.append(ops.restore(ref, n, timeout, p))
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
    recs = restore_as(snapshot_ops(), ref, names, timeout)
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
    with errors_reported():
        recs, ref = snapshot_ops().clone(vm, name, snapshot_name, timeout)
        if json_out:
            print_json([r.as_dict() for r in recs])
            return
        print_restored(recs, ref)


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
    with errors_reported():
        ops = snapshot_ops()
        with progress(f"pool {name}") as p:
            d = ops.create_pool(name, size, spec, from_snapshot, p)
        if json_out:
            print_json(d)
            return
        out.print(f"pool [bold]{d['name']}[/]: {d['size']} VM(s) from snapshot "
                  f"{d['snapshot_ref']}; refiller pid {d['refiller_pid']}", highlight=False)


def _pool_dict(m: VmManager, pool: Any, refiller: int | None = None) -> dict[str, Any]:
    """As the daemon's (vmforge.api.pools): the pool, its members, its refiller."""
    from ..node import pools
    from ..node.states import VmState
    mem = pools.members(m, pool.name)
    ready = [r.name for r in mem if r.state is VmState.RUNNING]
    return {**pool.to_json(), "ready": ready,
            "making": [r.name for r in mem if r.state is not VmState.RUNNING],
            "refiller_pid": pools.refiller_pid(m, pool.name) or refiller}


@pool_app.command("ls")
def pool_ls(json_out: JsonOpt = False) -> None:
    """List pools: size, ready VMs, the refiller (started again when it is not running)."""
    with errors_reported():
        rows = snapshot_ops().pools()
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
    with errors_reported():
        ops = snapshot_ops()
        t0 = time.monotonic()
        rec = ops.take(name, vm_name, timeout)
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
    with errors_reported():
        ops = snapshot_ops()
        for n in names:
            res = ops.remove_pool(n)
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
