"""Warm pools: VMs restored from one snapshot and kept ready, handed out at once.

A pool is a file ``DATA/pools/NAME.json`` (its size and snapshot) and the VMs named
``NAME--pXXXXXXXX`` (8 hex digits): membership is the name, so there is no second record to
go stale. Members are made by ``vmforge.node.restore`` (all or nothing: a member is ``running``
only once its identity is its own) and stay ordinary VMs (``vmforge ls`` shows them).

The refiller is one detached process per pool, ``vmforge pool serve NAME``, started through
``vmforge.run.spawn_detached``. It holds the flock ``pools/NAME.serve.lock`` (its pid inside)
for as long as it lives: the kernel drops it when the process dies, so "is a refiller there"
is a lock probe, never a guess from a pid. Every ``pool`` command (create, take, ls) starts
one when the lock is free; two that race both spawn, and the loser exits at once. The
refiller waits on signals (SIGUSR1: a VM was taken; SIGTERM: stop), makes one member at a
time, replaces members that crashed or stopped, and exits when the pool is removed.

``take`` picks the oldest running member whose lock it gets without waiting, renames it under
both names' locks (VM names are directory names elsewhere, but the row records the
directory: the renamed VM keeps its directory, so its sockets, pidfile, QEMU's command line and
its taps, all derived from the directory, stay valid), refreshes its identity through the
agent (hostname, machine-id, random pool, clock) and wakes the refiller.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidState, SpecError, VmError, VmExists, VmforgeError, VmNotFound
from ..events import Event, Progress, no_progress
from ..spec import NAME_RE
from . import snapshots as snapmod
from .states import TRANSIENT, VmState

if TYPE_CHECKING:
    from ..spec import VmRequest
    from .manager import VmManager, VmRecord

__all__ = ["Pool", "all_pools", "find_pool", "get_pool", "create_pool", "remove_pool",
           "members", "take", "serve", "ensure_refiller", "refiller_pid", "rename",
           "member_pattern", "POOL_NAME_MAX"]

POOL_NAME_MAX = 50  # a member's name (NAME--pXXXXXXXX) fits in a VM name's 63
REFILL_WAIT = 5.0   # the refiller looks again at least this often
TAKE_WAIT = 300.0   # take waits this long for a member when none is ready


@dataclass
class Pool:
    name: str
    size: int
    snapshot_id: int
    snapshot_ref: str
    owns_snapshot: bool = False   # made by `pool create -f SPEC`: removed with the pool
    created_at: float = field(default_factory=time.time)
    removing: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _dir(m: VmManager) -> Path:
    d = m.data.root / "pools"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _file(m: VmManager, name: str) -> Path:
    return _dir(m) / f"{name}.json"


def _serve_lock(m: VmManager, name: str) -> Path:
    return _dir(m) / f"{name}.serve.lock"


def _log(m: VmManager, name: str) -> Path:
    return _dir(m) / f"{name}.log"


def _save(m: VmManager, pool: Pool) -> None:
    path = _file(m, pool.name)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(pool.to_json(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> Pool | None:
    try:
        d = json.loads(path.read_text())
        return Pool(**{k: d[k] for k in Pool.__dataclass_fields__ if k in d})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def check_pool_name(name: str) -> None:
    if not NAME_RE.match(name) or len(name) > POOL_NAME_MAX:
        raise SpecError(f"invalid pool name {name!r}", field="pool",
                        hint=f"1-{POOL_NAME_MAX} letters, digits and '-', starting and ending "
                             "with a letter or digit")


def check_pool_request(name: str, size: int, has_spec: bool, has_snapshot: bool) -> None:
    """What ``pool create`` needs before anything is made: a name, a size, and a spec or a
    snapshot (one of them). The daemon's client side checks the same before it asks."""
    check_pool_name(name)
    if size < 0 or size > 64:
        raise SpecError(f"pool size {size} is out of range", field="--size",
                        hint="0 to 64 VMs")
    if has_spec == has_snapshot:
        raise SpecError("give a spec (-f) or a snapshot (--from-snapshot), not both",
                        field="pool")


def find_pool(m: VmManager, name: str) -> Pool | None:
    return _load(_file(m, name))


def get_pool(m: VmManager, name: str) -> Pool:
    check_pool_name(name)
    pool = find_pool(m, name)
    if pool is None:
        raise VmNotFound(f"no pool named {name!r}", hint="see `vmforge pool ls`")
    return pool


def all_pools(m: VmManager) -> list[Pool]:
    d = m.data.root / "pools"
    if not d.is_dir():
        return []
    return [p for p in (_load(f) for f in sorted(d.glob("*.json"))) if p is not None]


def member_pattern(pool: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(pool)}--p[0-9a-f]{{8}}$")


def _member_name(pool: str) -> str:
    return f"{pool}--p{secrets.token_hex(4)}"


def members(m: VmManager, pool: str) -> list[VmRecord]:
    """The pool's VMs, oldest first (rows only: a member is a plain VM)."""
    pat = member_pattern(pool)
    rows = m.db.query("SELECT * FROM vms WHERE name LIKE ? ORDER BY created_at",
                      (f"{pool}--p%",))
    return [m._record(r) for r in rows if pat.match(r["name"])]


# ---------------------------------------------------------------------------- refiller

def refiller_pid(m: VmManager, name: str) -> int | None:
    """The pid of the pool's refiller, when one holds its lock."""
    import fcntl
    path = _serve_lock(m, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def ensure_refiller(m: VmManager, name: str) -> int:
    """Start the pool's refiller unless one runs; its pid."""
    pid = refiller_pid(m, name)
    if pid is not None:
        return pid
    from .. import run
    argv = [sys.executable, "-m", "vmforge", "--data-dir", str(m.data.root), "pool",
            "serve", name]
    env = {k: v for k, v in os.environ.items()
           if k.startswith("VMFORGE_") and k not in ("VMFORGE_FAILPOINT", "VMFORGE_HOME")}
    return run.spawn_detached(argv, log=_log(m, name),
                              pidfile=_dir(m) / f"{name}.spawned.pid", env=env)


def _wake(m: VmManager, name: str) -> None:
    pid = refiller_pid(m, name)
    if pid and pid > 0:
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass


def serve(m: VmManager, name: str, *, log: Any = None) -> int:
    """The refiller (``vmforge pool serve NAME``): keep the pool full until it is removed or
    this process gets SIGTERM/SIGINT/SIGHUP. Returns 0; at once if another one serves."""
    import asyncio
    import fcntl

    from .restore import restore

    def say(msg: str) -> None:
        if log is not None:
            log(f"{time.strftime('%H:%M:%S')} pool {name}: {msg}")

    fd = os.open(_serve_lock(m, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        say("another refiller serves this pool")
        return 0
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    # Signals wake the wait below through a pipe (not a blocked mask: children, QEMU among
    # them, would inherit it). SIGUSR1: a VM was taken; the others: stop, after the VM being
    # made (restores are all or nothing, but finishing one is cheaper than undoing it).
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    stop: list[int] = []

    def on_stop(signum: int, _frame: Any) -> None:
        stop.append(signum)
    old_fd = signal.set_wakeup_fd(wfd)
    old = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT,
                                                  signal.SIGHUP)}
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda _s, _f: None)

    def wait(timeout: float) -> None:
        import select
        if not stop and select.select([rfd], [], [], timeout)[0]:
            os.read(rfd, 4096)
    backoff = 1.0
    try:
        while not stop:
            pool = find_pool(m, name)
            if pool is None or pool.removing:
                say("the pool is gone; exiting")
                return 0
            for rec in members(m, name):
                if rec.state in TRANSIENT:  # e.g. a restore whose refiller was killed
                    m._reconcile(rec)
            for rec in members(m, name):  # crashed or stopped members are no use to anyone
                if rec.state in _DEAD:
                    say(f"replacing {rec.name} ({rec.state.value})")
                    try:
                        asyncio.run(m.delete(rec.name, force=True, stop_timeout=0))
                    except VmforgeError as exc:
                        say(f"cannot remove {rec.name}: {exc}")
            current = [r for r in members(m, name) if r.state not in _DEAD]
            if len(current) < pool.size:
                member = _member_name(name)
                t0 = time.monotonic()
                try:
                    asyncio.run(restore(m, pool.snapshot_ref, member))
                    say(f"{member} ready in {time.monotonic() - t0:.2f}s")
                    backoff = 1.0
                    continue
                except VmforgeError as exc:
                    say(f"could not make a VM: {exc}")
                    wait(backoff)
                    backoff = min(60.0, backoff * 2)
            else:
                wait(REFILL_WAIT)
        say(f"signal {stop[0]}; exiting")
        return 0
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(rfd)
        os.close(wfd)
        os.close(fd)  # releases the lock


_DEAD = (VmState.CRASHED, VmState.STOPPED, VmState.CREATED, VmState.BROKEN)


# ---------------------------------------------------------------------------- create, rm

async def create_pool(m: VmManager, name: str, size: int, *, req: VmRequest | None = None,
                      snapshot_ref: str | None = None, progress: Progress = no_progress,
                      base_dir: Path | None = None, timeout: float = 300.0) -> Pool:
    """A pool of ``size`` VMs restored from ``snapshot_ref``, or from a snapshot made for it
    of the spec ``req`` booted once (provisioned, then saved and stopped)."""
    import asyncio
    check_pool_request(name, size, req is not None, snapshot_ref is not None)
    if find_pool(m, name) is not None:
        raise VmExists(f"a pool named {name!r} exists", hint="see `vmforge pool ls`")
    from .restore import check_restorable
    owns = False
    if req is not None:
        template = f"{name}--template"
        req = req.model_copy(update={"name": template})
        check_name = f"pool-{name}"
        if m.library.find(check_name) is not None and not snapmod.find(m, check_name):
            raise SpecError(f"{check_name!r} names an image already", field="pool")
        progress(Event(template, "pool", f"booting the template for pool {name}"))
        m.ensure_images(req, progress)
        await m.run(req, timeout=timeout, progress=progress, base_dir=base_dir)
        try:
            snap = await asyncio.to_thread(snapmod.create, m, template, check_name,
                                           stop=True, progress=progress)
        finally:
            try:
                await m.delete(template, force=True, stop_timeout=0)
            except VmNotFound:
                pass
        owns = True
    else:
        assert snapshot_ref is not None
        snap = snapmod.get(m, snapshot_ref)
    check_restorable(m, snap, _member_name(name))
    pool = Pool(name, size, snap.image.id, snap.ref, owns)
    _save(m, pool)
    ensure_refiller(m, name)
    return pool


async def remove_pool(m: VmManager, name: str, *, progress: Progress = no_progress
                      ) -> dict[str, Any]:
    """Stop the refiller, delete every member, forget the pool, and delete the snapshot it
    made for itself unless VMs taken from it still use it."""
    import asyncio
    pool = get_pool(m, name)
    pool.removing = True
    _save(m, pool)  # a refiller that looks now exits; so does a later one
    pid = refiller_pid(m, name)
    if pid and pid > 0:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
        deadline = time.monotonic() + 60
        while refiller_pid(m, name) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if refiller_pid(m, name) is not None and _is_refiller(pid, name):
            os.kill(pid, signal.SIGKILL)
            while refiller_pid(m, name) is not None and time.monotonic() < deadline + 10:
                await asyncio.sleep(0.05)
    removed = []
    for rec in members(m, name):
        progress(Event(rec.name, "pool", "removing"))
        try:
            await m.delete(rec.name, force=True, stop_timeout=0)
            removed.append(rec.name)
        except VmNotFound:
            pass
    snapshot_kept = None
    if pool.owns_snapshot and snapmod.find(m, pool.snapshot_ref) is not None:
        try:
            pool_file = _file(m, name)
            pool_file.unlink(missing_ok=True)
            snapmod.remove(m, pool.snapshot_ref)
        except VmforgeError as exc:
            snapshot_kept = f"{pool.snapshot_ref}: {exc}"
    _file(m, name).unlink(missing_ok=True)
    _serve_lock(m, name).unlink(missing_ok=True)
    (_dir(m) / f"{name}.spawned.pid").unlink(missing_ok=True)
    _log(m, name).unlink(missing_ok=True)
    return {"pool": name, "removed": removed, "snapshot_kept": snapshot_kept}


def _is_refiller(pid: int, name: str) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return "serve" in args and name in args and "pool" in args


# ---------------------------------------------------------------------------- take

def rename(m: VmManager, rec: VmRecord, new: str) -> VmRecord:
    """Give a VM a new name; the caller holds both names' locks. The row keeps its directory
    (everything about the running process is derived from it); the stored spec's name changes
    and host NICs keep their MACs (pinned into the spec: a derived MAC follows the name)."""
    from . import plan as planmod
    stored = json.loads(json.dumps(rec.stored))
    stored["name"] = new
    nics = stored.get("spec", {}).get("nics") or []
    for n, r in zip(nics, planmod.resolve_nics(rec.req, m._nets(rec.req)), strict=True):
        if r.mode.on_host and r.mac and isinstance(n, dict):
            n["mac"] = r.mac
    try:
        with m.db.tx() as c:
            c.execute("PRAGMA defer_foreign_keys=ON")
            c.execute("UPDATE vms SET name=?, spec=? WHERE name=?",
                      (new, json.dumps(stored), rec.name))
            c.execute("UPDATE vm_images SET vm_name=? WHERE vm_name=?", (new, rec.name))
            c.execute("UPDATE vm_nics SET vm_name=? WHERE vm_name=?", (new, rec.name))
    except sqlite3.IntegrityError:
        raise VmExists(f"a VM named {new!r} already exists",
                       hint="pick another --name or `vmforge rm` it first") from None
    path = rec.dir / "spec.json"
    tmp = rec.dir / ".spec.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(stored, f, indent=2)
    os.replace(tmp, path)
    out = m._row(new)
    assert out is not None
    return out


async def take(m: VmManager, name: str, new_name: str | None = None, *,
               timeout: float = TAKE_WAIT, progress: Progress = no_progress) -> VmRecord:
    """Hand out a ready member of pool ``name`` as the VM ``new_name`` (default: a fresh
    ``NAME-XXXXXX``), its identity refreshed; waits up to ``timeout`` when none is ready."""
    import asyncio

    from ..spec import validate_name
    from .restore import refresh_identity
    pool = get_pool(m, name)
    new_name = new_name or f"{name}-{secrets.token_hex(3)}"
    validate_name(new_name)
    if member_pattern(name).match(new_name):
        raise SpecError(f"{new_name!r} looks like a member of pool {name}", field="--name")
    if m._row(new_name) is not None:
        raise VmExists(f"a VM named {new_name!r} already exists",
                       hint="pick another --name or `vmforge rm` it first")
    ensure_refiller(m, name)
    deadline = time.monotonic() + timeout
    new_lock = m._lock(new_name)
    if not new_lock.try_acquire():
        raise InvalidState(f"VM {new_name} is busy: another vmforge process is creating it")
    try:
        while True:
            rec = _claim(m, name, new_name)
            if rec is not None:
                break
            if time.monotonic() > deadline:
                raise InvalidState(f"pool {name} has no ready VM (size {pool.size})",
                                   hint="wait for the refiller (`vmforge pool ls`), or make "
                                        "the pool bigger")
            await asyncio.sleep(0.05)
        _wake(m, name)
        progress(Event(new_name, "pool", f"taken from pool {name}"))
        report = await refresh_identity(m, rec, timeout=30.0)
        if report.get("failed") or report.get("skipped"):
            from .restore import _identity_problems
            m._set(new_name, last_error=_identity_problems(report))
        return m.get(new_name, reconcile=False)
    finally:
        new_lock.release(unlink=m._row(new_name) is None)


def _claim(m: VmManager, pool: str, new_name: str) -> VmRecord | None:
    """Rename the oldest ready member whose lock is free; None if there is none."""
    from ..hypervisors.base import Liveness
    for rec in members(m, pool):
        if rec.state is not VmState.RUNNING or rec.runtime is None:
            continue
        lock = m._lock(rec.name)
        if not lock.try_acquire():
            continue
        renamed = False
        try:
            row = m._row(rec.name)
            if row is None or row.state is not VmState.RUNNING or row.runtime is None:
                continue
            try:
                live = m.driver(row.backend).status(row.runtime)
            except VmforgeError:
                continue
            if live not in (Liveness.RUNNING, Liveness.PAUSED):
                continue  # the refiller replaces it
            out = rename(m, row, new_name)
            renamed = True
            return out
        except VmError:
            raise
        finally:
            lock.release(unlink=renamed)
    return None
