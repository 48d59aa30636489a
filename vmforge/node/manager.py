"""The VM manager: create, start, stop, kill, delete, list, with state in SQLite.

States and transitions are in :mod:`vmforge.node.states`. The manager never imports a backend:
it asks the registry for the spec's driver (:func:`vmforge.hypervisors.get_driver`).

Crash consistency, the rules:

* Every operation that changes a VM holds its :class:`~vmforge.node.lock.VmLock` (an flock
  the kernel releases when the holder dies) from its first write to its last.
* A row in a transient state (creating, starting, stopping, deleting) whose lock is free was
  left by a dead vmforge: the next command that reads it finishes or rolls back that work
  (``_recover``). A locked one is shown as it is: somebody is at work.
* The hypervisor's handle is durable before the hypervisor runs (the driver's ``record``
  callback; QEMU's pidfile and QMP socket are fixed by the VM directory), and before any start
  the driver is asked whether a process already runs for the VM (``find``): a VM never has two.
* A running VM is declared crashed or stopped only after the driver says its process is gone,
  and only if the row still says running (a conditional UPDATE).
* Host network devices (taps, :mod:`vmforge.net`) are made under the VM's lock after the row
  says starting and before the hypervisor starts; every operation that holds the lock ends by
  removing the taps of a VM that is not live (``_settle_net``), and a reader that finds a VM
  dead does the same if the lock is free. Taps are named after the VM's directory, so this
  needs neither the spec nor the row.

Readiness, provisioning, agent calls and stop are coroutines; only ``vmforge.cli`` runs an
event loop, so the daemon can await them on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..enums import SPEC_REV
from ..errors import (
    AgentError,
    HostError,
    InvalidState,
    LaunchError,
    SpecError,
    VmError,
    VmExists,
    VmforgeError,
    VmNotFound,
)
from ..events import Event, Progress, adapt, no_progress
from ..failpoints import hit
from ..fsutil import tail_text
from ..hypervisors import get_driver
from ..hypervisors.base import Accel, Backend, Driver, Liveness, Runtime, StopOutcome
from ..hypervisors.host import HostFacts, KvmVerdict, choose_accel, probe_host
from ..images.library import Library
from ..paths import DataDir, VmPaths
from ..state import Database
from .lock import VmLock
from .states import LIVE, STARTABLE, TRANSIENT, ExitReason, VmState

if TYPE_CHECKING:
    from ..agent.client import AgentClient
    from ..net.manager import NetworkManager
    from ..net.model import Network
    from ..spec import VmRequest
    from . import plan as planmod

# What listing VMs needs is kept light (no pydantic, no asyncio, no planning): those are
# imported by the operations that use them.

__all__ = ["VmManager", "VmRecord", "STARTABLE", "redact_spec"]

_REDACTED_FIELDS = ("user_data", "vendor_data")


def redact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as shown to people and scripts: user-data and vendor-data (where passwords and
    tokens live) replaced by their size."""
    ci = spec.get("cloud_init")
    if isinstance(ci, dict):
        ci = dict(ci)
        for key in _REDACTED_FIELDS:
            if isinstance(ci.get(key), str):
                ci[key] = f"<redacted: {len(ci[key].encode())} bytes; --show-secrets shows it>"
        spec = {**spec, "cloud_init": ci}
    return spec


@dataclass(frozen=True)
class VmRecord:
    name: str
    state: VmState
    stored: dict[str, Any]  # the request as stored: {"name", "spec"} with every field
    dir: Path
    backend: Backend
    runtime: Runtime | None
    created_at: float
    started_at: float | None
    ready_at: float | None
    stopped_at: float | None
    last_error: str | None
    stop_reason: str | None = None
    guest_net: dict[str, Any] | None = None  # the agent's last report of the guest's NICs

    @cached_property
    def request(self) -> VmRequest | None:
        """The stored spec as a model (None when it no longer parses: state broken)."""
        if self.state is VmState.BROKEN:
            return None
        from ..spec import parse_request
        return parse_request(self.stored, "stored spec")

    @property
    def agent_enabled(self) -> bool:
        """From the stored spec as it is (no model needed: the hot path of `vmforge exec`)."""
        agent = self.stored.get("spec", {}).get("agent") or {}
        return bool(agent.get("enabled", True))

    @property
    def req(self) -> VmRequest:
        if self.request is None:
            raise InvalidState(f"VM {self.name} is broken: {self.last_error}",
                               hint=f"`vmforge rm -f {self.name}` removes it")
        return self.request

    @property
    def paths(self) -> VmPaths:
        return VmPaths(self.dir)

    @property
    def pid(self) -> int | None:
        return self.runtime.pid if self.runtime else None

    @property
    def accel(self) -> str | None:
        return self.runtime.accel.value if self.runtime else None

    @property
    def agent_endpoint(self) -> str:
        """Where the agent answers: a unix socket path, ``vsock:CID:PORT`` or ``hvsock:...``."""
        if self.runtime and self.runtime.agent:
            return str(self.runtime.agent)
        return str(self.paths.agent)

    def host_nics(self) -> list[tuple[dict[str, Any], str | None]]:
        """(stored NIC, MAC) of the NICs on host networks (bridge/network), from the stored
        spec as plain data (no models on the listing path)."""
        spec = self.stored.get("spec")
        nics = spec.get("nics") if isinstance(spec, dict) else None
        if not isinstance(nics, list):
            return []
        from ..net.nics import nic_macs
        nics = [n for n in nics if isinstance(n, dict)]
        return [(n, mac) for n, mac in zip(nics, nic_macs(self.name, nics), strict=True)
                if (n.get("mode") or "user") != "user"]

    @property
    def ipv4(self) -> list[str]:
        """The guest's IPv4 addresses on host networks (reachable from the host), in NIC
        order: as the agent last reported them, else the spec's static ones."""
        if self.state is not VmState.RUNNING:
            return []
        reported = {str(i.get("mac", "")).lower(): i for i in
                    (self.guest_net or {}).get("interfaces", []) if isinstance(i, dict)}
        out: list[str] = []
        for nic, mac in self.host_nics():
            iface = reported.get(mac or "")
            if iface is not None:
                out += [a.split("/")[0] for a in iface.get("ipv4", [])]
            elif nic.get("ip") and not self.guest_net:
                out.append(str(nic["ip"]).split("/")[0])
        return out

    @property
    def boot_seconds(self) -> float | None:
        if self.started_at and self.ready_at and self.ready_at >= self.started_at:
            return self.ready_at - self.started_at
        return None

    def as_dict(self, *, show_secrets: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "state": self.state.value, "backend": self.backend.value,
            "pid": self.pid, "accel": self.accel, "dir": str(self.dir),
            "created_at": self.created_at, "started_at": self.started_at,
            "ready_at": self.ready_at, "stopped_at": self.stopped_at,
            "boot_seconds": self.boot_seconds, "last_error": self.last_error,
            "stop_reason": self.stop_reason, "console_log": str(self.paths.console),
            "agent": self.agent_endpoint, "ipv4": self.ipv4,
            "runtime": json.loads(self.runtime.to_json()) if self.runtime else None}
        spec = self.stored.get("spec")
        if self.state is not VmState.BROKEN and isinstance(spec, dict):
            d.update(cpu_cores=spec.get("cpu_cores"), memory_mib=spec.get("memory_mib"),
                     spec=spec if show_secrets else redact_spec(spec))
        return d


class VmManager:
    def __init__(self, data: DataDir | None = None, *, host: HostFacts | None = None) -> None:
        self.data = (data or DataDir.default()).ensure()
        self.db = Database(self.data.db)
        self.library = Library(self.db, self.data.images)
        self._host = host

    def close(self) -> None:
        self.db.close()

    # -- host facts (what the host can do; what a spec asks for is chosen per VM)
    def host(self) -> HostFacts:
        if self._host is None:
            probe_kernel = None
            img = self.library.find("minimal")
            if img is not None and img.path("vmlinux"):
                probe_kernel = str(img.path("vmlinux"))
            self._host = probe_host(probe_kernel=probe_kernel, cache_dir=self.data.cache)
        return self._host

    def host_or_defaults(self) -> HostFacts:
        """The probed facts, or, where QEMU is not installed (``vmforge plan`` on a machine
        without a hypervisor), the standard paths and an unprobed KVM."""
        try:
            return self.host()
        except VmforgeError:
            return HostFacts(qemu_binary="qemu-system-x86_64", qemu_version="unknown",
                             kvm=KvmVerdict(False, "not probed (QEMU is not installed)"),
                             ovmf_code="/usr/share/OVMF/OVMF_CODE_4M.fd",
                             ovmf_vars="/usr/share/OVMF/OVMF_VARS_4M.fd")

    def accel_for(self, req: VmRequest, host: HostFacts | None = None) -> tuple[Accel, str]:
        if req.spec.accel == "tcg":
            return Accel.TCG, "TCG requested"
        return choose_accel(req.spec.accel, host or self.host())

    @staticmethod
    def driver(backend: Backend | str) -> Driver:
        return get_driver(backend)

    def _lock(self, name: str) -> VmLock:
        return VmLock(self.data.locks, name)

    @cached_property
    def networks(self) -> NetworkManager:
        """Managed networks and the VMs' taps (vmforge.net), imported when first used."""
        from ..net.manager import NetworkManager
        return NetworkManager(self.db, self.data)

    def _nets(self, req: VmRequest) -> dict[str, Network]:
        """The managed networks the spec's NICs name (those vmforge has)."""
        from . import plan as planmod
        names = planmod.managed_networks(req)
        if not names:
            return {}
        out = {}
        for name in names:
            net = self.networks.store.find(name)
            if net is not None:
                out[name] = net
        return out

    def _settle_net(self, name: str) -> None:
        """Under the VM's lock: a VM that is not live has no taps. Failures are logged, not
        raised (this runs in ``finally`` blocks); the next command tries again."""
        rec = self._row(name)
        if rec is not None and rec.state in LIVE:
            return
        vm_dir = rec.dir if rec is not None else self.data.vms / name
        try:
            from ..net.manager import NetworkManager
            if NetworkManager.vm_taps(vm_dir):
                self.networks.release_taps(vm_dir)
        except VmforgeError as exc:
            import logging
            logging.getLogger("vmforge.net").warning("VM %s: taps not removed: %s", name, exc)

    # -- records
    def _record(self, row: sqlite3.Row) -> VmRecord:
        state = VmState(row["state"])
        error = row["last_error"]
        try:
            stored = json.loads(row["spec"])
            if row["spec_rev"] != SPEC_REV:  # validated by other models: check it again
                from ..spec import parse_request
                parse_request(stored, "stored spec")
                with self.db.tx() as c:
                    c.execute("UPDATE vms SET spec_rev=? WHERE name=?", (SPEC_REV, row["name"]))
        except (VmforgeError, ValueError) as exc:
            stored, state, error = {}, VmState.BROKEN, f"stored spec does not parse: {exc}"
        runtime = None
        if row["runtime"]:
            try:
                runtime = Runtime.from_json(row["runtime"])
            except (ValueError, KeyError):
                runtime = None
        guest_net = None
        if row["guest_net"]:
            try:
                guest_net = json.loads(row["guest_net"])
            except ValueError:
                guest_net = None
        return VmRecord(row["name"], state, stored, Path(row["dir"]), Backend(row["backend"]),
                        runtime, row["created_at"], row["started_at"], row["ready_at"],
                        row["stopped_at"], error, row["stop_reason"],
                        guest_net if isinstance(guest_net, dict) else None)

    def _row(self, name: str) -> VmRecord | None:
        rows = self.db.query("SELECT * FROM vms WHERE name=?", (name,))
        return self._record(rows[0]) if rows else None

    def get(self, name: str, *, reconcile: bool = True) -> VmRecord:
        rec = self._row(name)
        if rec is not None and reconcile:
            rec = self._reconcile(rec)
        if rec is None:
            raise VmNotFound(f"no VM named {name!r}", hint="see `vmforge ls`")
        return rec

    def vms(self) -> list[VmRecord]:
        out = []
        for row in self.db.query("SELECT * FROM vms ORDER BY created_at"):
            rec = self._reconcile(self._record(row))
            if rec is not None:
                out.append(rec)
        return out

    def _set(self, name: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.db.tx() as c:
            c.execute(f"UPDATE vms SET {cols} WHERE name=?", (*fields.values(), name))

    def _transition(self, name: str, allowed: tuple[VmState, ...], new: VmState,
                    **fields: Any) -> None:
        """Guarded state change: checked and written in one transaction."""
        with self.db.tx() as c:
            row = c.execute("SELECT state FROM vms WHERE name=?", (name,)).fetchone()
            if row is None:
                raise VmNotFound(f"no VM named {name!r}")
            if row["state"] not in allowed:
                raise InvalidState(f"VM {name} is {row['state']}; this needs it to be "
                                   f"{' or '.join(s.value for s in allowed)}")
            cols = ", ".join(f"{k}=?" for k in ("state", *fields))
            c.execute(f"UPDATE vms SET {cols} WHERE name=?", (new.value, *fields.values(), name))

    # -- reconciliation
    def _reconcile(self, rec: VmRecord) -> VmRecord | None:
        """Make the row tell the truth. Returns None when the VM turned out not to exist (a
        create or rm that died half-way, now rolled back or finished)."""
        if rec.state in TRANSIENT:
            lock = self._lock(rec.name)
            if not lock.try_acquire():
                return rec  # a live vmforge is working on it
            try:
                return self._recover(rec.name)
            finally:
                self._settle_net(rec.name)
                lock.release(unlink=self._row(rec.name) is None)
        if rec.state is VmState.RUNNING:
            return self._check_running(rec)
        return rec

    def _liveness(self, rec: VmRecord) -> tuple[Liveness, Runtime | None]:
        drv = self.driver(rec.backend)
        rt = rec.runtime
        if rt is not None:
            live = drv.status(rt)
            if live in (Liveness.RUNNING, Liveness.PAUSED):
                return live, rt
        found = drv.find(rec.name, rec.dir)  # e.g. started, but its pid was never recorded
        if found is not None and drv.status(found) in (Liveness.RUNNING, Liveness.PAUSED):
            return Liveness.RUNNING, found
        return (drv.status(rt) if rt is not None else Liveness.GONE), rt

    def _check_running(self, rec: VmRecord) -> VmRecord:
        try:
            live, rt = self._liveness(rec)
        except HostError:  # the backend does not answer (libvirtd down): the row stands
            return rec
        if live in (Liveness.RUNNING, Liveness.PAUSED):
            if rt is not None and rt != rec.runtime:
                self._set(rec.name, runtime=rt.to_json())
                return self.get(rec.name, reconcile=False)
            return rec
        # A supervisor that watched it die said why; else the driver's reading tells.
        try:
            reason = ExitReason(rec.stop_reason or "")
        except ValueError:
            reason = ExitReason.GUEST_SHUTDOWN if live is Liveness.POWERED_OFF \
                else ExitReason.HYPERVISOR_DIED
        new = VmState.CRASHED if reason.crashed else VmState.STOPPED
        error = None
        if reason is ExitReason.HYPERVISOR_DIED:
            error = f"the {rec.backend.value} process died unexpectedly"
        elif reason is ExitReason.GUEST_PANIC:
            error = "the guest kernel panicked"
        with self.db.tx() as c:  # only if nobody changed it meanwhile (a stop in progress)
            c.execute("UPDATE vms SET state=?, runtime=NULL, stopped_at=?, stop_reason=?, "
                      "last_error=? WHERE name=? AND state='running'",
                      (new.value, time.time(), reason.value, error, rec.name))
        lock = self._lock(rec.name)
        if lock.try_acquire():  # else its holder settles them when it is done
            try:
                self._settle_net(rec.name)
            finally:
                lock.release()
        return self.get(rec.name, reconcile=False)

    def record_exit(self, name: str, reason: ExitReason) -> VmRecord:
        """What a supervisor saw (QMP ``SHUTDOWN``/``GUEST_PANICKED``, the monitor closing, a
        libvirt lifecycle event): remembered while the row says running, then the row is
        reconciled (running only while the hypervisor process really runs)."""
        with self.db.tx() as c:
            c.execute("UPDATE vms SET stop_reason=? WHERE name=? AND state='running'",
                      (reason.value, name))
        return self.get(name)

    def _recover(self, name: str) -> VmRecord | None:
        """Finish or roll back the work of a dead vmforge. The caller holds the VM's lock."""
        rec = self._row(name)
        if rec is None or rec.state not in TRANSIENT:
            return rec
        if rec.state is VmState.CREATING:
            self._discard(rec)
            return None
        if rec.state is VmState.DELETING:
            self._finish_delete(rec)
            return None
        if rec.state in (VmState.SNAPSHOTTING, VmState.RESTORING):
            from .snapshots import recover  # its journal says what to finish or undo
            return recover(self, rec)
        try:
            live, rt = self._liveness(rec)
        except HostError:  # cannot tell now (the backend does not answer): next time
            return rec
        alive = live in (Liveness.RUNNING, Liveness.PAUSED)
        if alive:
            self._set(name, state=VmState.RUNNING.value, runtime=rt.to_json() if rt else None,
                      started_at=rec.started_at or time.time())
        elif rec.state is VmState.STARTING:
            self._set(name, state=VmState.STOPPED.value, runtime=None, stopped_at=time.time(),
                      last_error="start was interrupted (the vmforge process starting it died)")
        else:
            self._set(name, state=VmState.STOPPED.value, runtime=None, stopped_at=time.time(),
                      stop_reason=ExitReason.STOPPED.value)
        return self._row(name)

    def _discard(self, rec: VmRecord) -> None:
        """Remove every trace of a VM that never finished being created."""
        for tmp in self.data.vms.glob(f".{rec.name}.creating-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        if rec.state is VmState.CREATING:  # its dir, if there, is not the VM's yet
            shutil.rmtree(rec.dir, ignore_errors=True)
        with self.db.tx() as c:
            c.execute("DELETE FROM vm_images WHERE vm_name=?", (rec.name,))
            c.execute("DELETE FROM vm_nics WHERE vm_name=?", (rec.name,))
            c.execute("DELETE FROM vms WHERE name=?", (rec.name,))

    def _finish_delete(self, rec: VmRecord) -> None:
        drv = self.driver(rec.backend)
        for rt in (rec.runtime, drv.find(rec.name, rec.dir)):
            if rt is not None:
                drv.kill(rt)
        hit("delete.killed")
        self.networks.release_taps(rec.dir)
        drv.cleanup(rec.runtime, rec.name, rec.dir)
        socks = rec.paths.sockets
        for path in {rec.dir, socks}:
            _remove_tree(path)  # before the row goes: a row left in `deleting` is retried
        self._discard(rec)

    # -- planning
    def ensure_images(self, req: VmRequest, progress: Progress = no_progress) -> None:
        """Build the built-in images (minimal, debian) a spec names but the library lacks."""
        from ..builders.builtin import ensure_builtin
        refs = [d.image for d in req.spec.disks if d.image]
        if req.spec.kernel and req.spec.kernel.image:
            refs.append(req.spec.kernel.image)
        for ref in refs:
            ensure_builtin(self.library, self.data.cache, ref, progress)

    def _checked(self, req: VmRequest, host: HostFacts | None
                 ) -> tuple[Driver, planmod.Inputs, Accel, str]:
        from ..spec import validate_name
        from . import plan as planmod
        validate_name(req.name)
        drv = self.driver(req.spec.hypervisor)
        inputs = planmod.check_inputs(req, self.library)  # fails before any host probe
        planmod.check_capabilities(req, drv.capabilities(), inputs)
        planmod.resolve_nics(req, self._nets(req))  # names, static addresses, MACs
        host = host or self.host()
        accel, why = self.accel_for(req, host)
        planmod.check_host(req, host)
        return drv, inputs, accel, why

    def plan(self, req: VmRequest) -> dict[str, Any]:
        """What ``run`` would do, without doing it: resolved inputs, seed files and the
        backend's part (argv, domain XML or API requests). Needs no hypervisor installed."""
        from ..agent import guest
        from ..seed import build_seed, find_ssh_public_key, inject_agent
        from . import plan as planmod

        host = self.host_or_defaults()
        drv, inputs, accel, why = self._checked(req, host)
        paths = self.data.vm(req.name)
        nets = self._nets(req)
        mp = planmod.machine_plan(req, inputs, paths, host, accel, nets)
        seed_files: dict[str, str] = {}
        if planmod.needs_seed(req):
            seed = build_seed(req.name, req.spec.cloud_init, default_if_empty=True,
                              ssh_key=find_ssh_public_key(),
                              network_config=planmod.guest_network_config(
                                  planmod.resolve_nics(req, nets)))
            if req.spec.agent.enabled and req.spec.agent.inject and not inputs.agent_baked_in:
                seed = inject_agent(seed, Path(guest.__file__).read_bytes())
            seed_files = {name: data.decode(errors="replace") for name, data in
                          seed.files()}
        return {"name": req.name, "backend": drv.backend.value, "accel": accel.value,
                "accel_reason": why, "dir": str(paths.dir),
                "images": {role: self.library.get(i).ref for role, i in inputs.pins.items()},
                "kernel": vars(mp.kernel) if mp.kernel else None,
                "nics": [n.to_json() for n in planmod.resolve_nics(req, nets)],
                "seed": seed_files, "capabilities": drv.capabilities().to_json(),
                **drv.render(mp, host).to_json()}

    # -- lifecycle
    def create(self, req: VmRequest, progress: Progress = no_progress, *,
               schema_check: bool = True) -> VmRecord:
        """Make the VM's directory (overlays, seed, NVRAM) and its row, or nothing at all.
        ``schema_check=False`` skips cloud-init's schemas (YAML and sizes are still checked).
        """
        from . import plan as planmod
        drv, inputs, accel, why = self._checked(req, None)
        _require_kvm(drv, accel, why)
        host = self.host()
        nets = self._nets(req)
        final = self.data.vms / req.name
        lock = self._lock(req.name)
        lock.acquire()
        try:
            stale = self._row(req.name)
            if stale is not None and stale.state in TRANSIENT:
                self._recover(req.name)
            try:
                with self.db.tx() as c:
                    c.execute("INSERT INTO vms (name, state, spec, spec_rev, dir, created_at, "
                              "owner_pid, backend) VALUES (?, 'creating', ?, ?, ?, ?, ?, ?)",
                              (req.name, req.model_dump_json(by_alias=True), SPEC_REV,
                               str(final), time.time(), os.getpid(), drv.backend.value))
                    for role, image_id in inputs.pins.items():
                        c.execute("INSERT INTO vm_images (vm_name, role, image_id) "
                                  "VALUES (?,?,?)", (req.name, role, image_id))
                    if nets:
                        from ..net.store import NetworkStore
                        NetworkStore.record_vm_nics(c, req.name,
                                                    planmod.resolve_nics(req, nets))
            except sqlite3.IntegrityError:
                raise VmExists(f"a VM named {req.name!r} already exists",
                               hint="pick another --name or `vmforge rm` it first") from None
            hit("create.row")
            tmp = self.data.vms / f".{req.name}.creating-{os.getpid()}"
            renamed = False
            try:
                if final.exists():
                    raise VmError(f"{final} exists but no VM of that name is recorded",
                                  hint="move that directory away; vmforge will not overwrite "
                                       "it")
                tmp.mkdir(mode=0o700)
                from ..agent import guest
                from ..seed import find_ssh_public_key
                progress(Event(req.name, "create", "preparing disks and seed"))
                planmod.prepare_artifacts(req, inputs, VmPaths(tmp), host,
                                          Path(guest.__file__).read_bytes(),
                                          find_ssh_public_key(), schema_check, nets)
                _write_private(tmp / "spec.json", req.model_dump_json(by_alias=True, indent=2))
                hit("create.artifacts")
                os.rename(tmp, final)
                renamed = True
                hit("create.renamed")
                self._set(req.name, state=VmState.CREATED.value)
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if renamed:  # the directory is the VM's now: it goes with the row
                    shutil.rmtree(final, ignore_errors=True)
                with self.db.tx() as c:
                    c.execute("DELETE FROM vm_images WHERE vm_name=?", (req.name,))
                    c.execute("DELETE FROM vms WHERE name=?", (req.name,))
                if isinstance(exc, OSError):
                    raise os_error(exc, f"cannot create VM {req.name}", self.data.root) from exc
                raise
        finally:
            lock.release()
        progress(Event(req.name, "state", VmState.CREATED.value))
        return self.get(req.name)

    def _current(self, name: str) -> VmRecord:
        """The VM as it is now, a dead worker's leftovers finished and a running row checked
        against its process. The caller holds the VM's lock."""
        rec = self._row(name)
        if rec is not None and rec.state in TRANSIENT:
            rec = self._recover(name)
        if rec is None:
            raise VmNotFound(f"no VM named {name!r}", hint="see `vmforge ls`")
        if rec.state is VmState.RUNNING:
            rec = self._check_running(rec)
        return rec

    def _pins(self, name: str) -> dict[str, int]:
        return {r["role"]: r["image_id"] for r in
                self.db.query("SELECT role, image_id FROM vm_images WHERE vm_name=?", (name,))}

    def start(self, name: str, progress: Progress = no_progress) -> VmRecord:
        """Start a created or stopped VM; returns once the hypervisor runs (not ready)."""
        from . import plan as planmod
        lock = self._lock(name)
        lock.acquire()
        try:
            rec = self._current(name)
            req = rec.req
            drv = self.driver(rec.backend)
            if rec.state not in STARTABLE:
                raise InvalidState(f"VM {name} is {rec.state.value}; this needs it to be "
                                   + " or ".join(s.value for s in STARTABLE))
            existing = drv.find(name, rec.dir)
            if existing is not None and drv.status(existing) is Liveness.RUNNING:
                # Its process outlived what the row says (e.g. a crash of ours): adopt it.
                self._set(name, state=VmState.RUNNING.value, runtime=existing.to_json())
                return self.get(name, reconcile=False)
            inputs = planmod.pinned_inputs(req, self.library, self._pins(name))
            host = self.host()
            accel, why = self.accel_for(req, host)
            _require_kvm(drv, accel, why)
            if accel is Accel.TCG and req.spec.accel != "tcg":
                progress(Event(name, "start", f"KVM unavailable ({why}); using TCG (slower)"))
            planmod.check_host(req, host)
            nets = self._nets(req)
            mp = planmod.machine_plan(req, inputs, rec.paths, host, accel, nets)
            prior = rec.state
            self._transition(name, STARTABLE, VmState.STARTING, last_error=None,
                             stop_reason=None, guest_net=None)
            progress(Event(name, "state", VmState.STARTING.value))
            hit("start.starting")
            started = time.time()

            def record(r: Runtime) -> None:
                self._set(name, runtime=r.to_json())
                hit("start.recorded")
            try:
                self._attach_net(name, mp, nets, progress)
                rt = drv.start(mp, host, record)
                hit("start.launched")  # the hypervisor runs; the row still says starting
            except BaseException as exc:
                found = drv.find(name, rec.dir)
                if found is not None:  # e.g. interrupted after QEMU daemonized
                    drv.kill(found)
                self._set(name, state=prior.value if prior is not VmState.CRASHED
                          else VmState.STOPPED.value, runtime=None,
                          last_error=str(exc)[:2000] or type(exc).__name__)
                raise
            self._set(name, state=VmState.RUNNING.value, runtime=rt.to_json(),
                      started_at=started, ready_at=None, stopped_at=None)
            hit("start.running")
        finally:
            self._settle_net(name)
            lock.release()
        progress(Event(name, "state", VmState.RUNNING.value))
        return self.get(name, reconcile=False)

    def _attach_net(self, name: str, mp: Any, nets: dict[str, Network],
                    progress: Progress) -> None:
        """The VM's managed networks up (bridge, rules, dnsmasq) and its taps made, after the
        row says starting (a crash from here on is rolled back by ``_recover``)."""
        from ..net.manager import TapRequest
        taps = [TapRequest(n.tap, n.bridge, n.mac) for n in mp.nics if n.tap and n.bridge
                and n.mac]
        if not nets and not taps:
            return
        progress(Event(name, "start", "host network: " + ", ".join(
            [f"network {n}" for n in sorted(nets)] + [f"tap {t.tap} on {t.bridge}"
                                                      for t in taps])))
        self.networks.attach(nets, taps)
        hit("start.taps")

    async def wait_ready(self, name: str, timeout: float = 180.0,
                         progress: Progress = no_progress) -> VmRecord:
        """Wait for the agent's hello and cloud-init (or, without an agent, the image's serial
        marker)."""
        rec = self.get(name)
        if rec.state is not VmState.RUNNING or rec.runtime is None:
            raise InvalidState(f"VM {name} is {rec.state.value}, not running")
        hit("wait.agent")
        if rec.req.spec.agent.enabled:
            ready_at = await self._wait_agent(rec, timeout)
        else:
            ready_at = await self._wait_marker(rec, timeout)
        self._set(name, ready_at=ready_at)
        progress(Event(name, "ready", "ready"))
        return self.get(name, reconcile=False)

    def _died(self, rec: VmRecord) -> bool:
        assert rec.runtime is not None
        return self.driver(rec.backend).status(rec.runtime) not in (Liveness.RUNNING,
                                                                    Liveness.PAUSED)

    def _console_tail(self, rec: VmRecord, lines: int = 25) -> str:
        return tail_text(rec.paths.console, lines)

    async def _wait_agent(self, rec: VmRecord, timeout: float) -> float:
        import asyncio

        from ..agent.client import AgentClient

        client = AgentClient(rec.agent_endpoint)
        deadline = time.monotonic() + timeout

        async def ready() -> dict[str, Any]:
            hello = await client.wait_ready(timeout)
            if rec.req.spec.mounts:  # host folders: the agent mounts them (idempotent)
                from .plan import mount_args
                await client.mount(mount_args(rec.req))
            # Ready means provisioned: the OS part (cloud-init) has finished too.
            state = await client.wait_cloud_init(max(1.0, deadline - time.monotonic()))
            if state.get("status") == "error":
                self._set(rec.name, last_error="cloud-init reported errors: "
                          + "; ".join(map(str, state.get("errors", [])))[:1500])
            await self._wait_addresses(client, rec, hello, deadline)
            return hello
        waiter = asyncio.ensure_future(ready())
        try:
            while not waiter.done():
                done, _ = await asyncio.wait({waiter}, timeout=0.25)
                if not done and self._died(rec):
                    waiter.cancel()
                    self._reconcile(self.get(rec.name, reconcile=False))
                    raise LaunchError(f"VM {rec.name} died before it was ready",
                                      console_tail=self._console_tail(rec))
            try:
                waiter.result()
            except AgentError as exc:
                raise LaunchError(f"VM {rec.name} did not become ready: {exc.message}",
                                  console_tail=self._console_tail(rec),
                                  hint="see `vmforge console " + rec.name + "`") from exc
            return time.time()
        finally:
            if not waiter.done():
                waiter.cancel()
            await client.close()

    #: How long readiness waits for DHCP on host NICs before it reports the VM ready anyway
    #: (``inspect`` then shows which NIC has no address, and the lease it may have).
    ADDRESS_WAIT = 30.0

    async def _wait_addresses(self, client: AgentClient, rec: VmRecord,
                              hello: dict[str, Any], deadline: float) -> None:
        """Until every NIC on a host network has an IPv4 address (DHCP takes a moment after
        the agent's hello), then record the guest's interfaces. Agents without the
        ``interfaces`` call are skipped."""
        import asyncio
        wanted = {mac for _, mac in rec.host_nics() if mac}
        report = hello.get("interfaces")
        limit = min(deadline, time.monotonic() + self.ADDRESS_WAIT)
        while True:
            if isinstance(report, list):
                have = {str(i.get("mac", "")).lower() for i in report
                        if isinstance(i, dict) and i.get("ipv4")}
                if wanted <= have or time.monotonic() >= limit:
                    break
            elif report is not None or not wanted or time.monotonic() >= limit:
                break
            await asyncio.sleep(0.2)
            report = await client.interfaces()
            if report is None:  # an older agent
                break
        if isinstance(report, list):
            self._record_guest_net(rec.name, report)

    def _record_guest_net(self, name: str, interfaces: list[dict[str, Any]]) -> None:
        with self.db.tx() as c:
            c.execute("UPDATE vms SET guest_net=? WHERE name=? AND state='running'",
                      (json.dumps({"at": time.time(), "interfaces": interfaces}), name))

    async def refresh_guest_net(self, name: str, timeout: float = 5.0) -> VmRecord:
        """Ask the agent for the guest's interfaces now (when it can answer within
        ``timeout``) and record them; the record either way."""
        import asyncio

        from ..agent.client import AgentClient
        rec = self.get(name)
        if rec.state is not VmState.RUNNING or rec.request is None or \
                not rec.request.spec.agent.enabled:
            return rec
        client = AgentClient(rec.agent_endpoint, queue_timeout=min(2.0, timeout))
        try:
            await client.connect(timeout=timeout)
            report = await asyncio.wait_for(client.interfaces(), timeout)
        except (AgentError, OSError, TimeoutError):
            return rec
        finally:
            await client.close()
        if report is not None:
            self._record_guest_net(name, report)
        return self.get(name, reconcile=False)

    def describe(self, rec: VmRecord, *, show_secrets: bool = False) -> dict[str, Any]:
        """``as_dict`` plus each NIC's host side and addresses: the guest's (as the agent last
        reported them), the static one, and the DHCP lease, cross-checked (``lease_matches``:
        the lease's address is one the guest has)."""
        d = rec.as_dict(show_secrets=show_secrets)
        spec = rec.stored.get("spec")
        nics = spec.get("nics") if isinstance(spec, dict) else None
        if not isinstance(nics, list) or rec.state is VmState.BROKEN:
            return d
        from ..net.names import tap_name
        from ..net.nics import nic_macs
        nics = [n for n in nics if isinstance(n, dict)]
        macs = nic_macs(rec.name, nics)
        running = rec.state is VmState.RUNNING
        reported = {str(i.get("mac", "")).lower(): i for i in
                    (rec.guest_net or {}).get("interfaces", []) if isinstance(i, dict)}
        managed = {str(n["network"]) for n in nics if n.get("network")}
        leases = self.networks.leases_by_mac(
            n for n in managed if self.networks.store.find(n) is not None) \
            if managed and running else {}
        out = []
        for i, (nic, mac) in enumerate(zip(nics, macs, strict=True)):
            mode = str(nic.get("mode") or "user")
            iface = reported.get(mac or "") if running else None
            lease = leases.get(mac or "")
            ipv4 = [a.split("/")[0] for a in iface.get("ipv4", [])] if iface else []
            entry: dict[str, Any] = {
                "id": nic.get("id"), "mode": mode, "mac": mac,
                "network": nic.get("network"), "bridge": nic.get("bridge"),
                "static_ip": nic.get("ip"),
                "tap": tap_name(rec.dir, i) if mode != "user" and running and
                rec.backend.value != "libvirt" else None,
                "guest_interface": iface.get("name") if iface else None,
                "ipv4": ipv4, "ipv6": list(iface.get("ipv6", [])) if iface else [],
                "lease": lease.to_json() if lease else None,
                "lease_matches": (lease.ip in ipv4) if lease and iface else None}
            out.append(entry)
        d["nics"] = out
        if running:
            seen = [a for e in out if e["mode"] != "user" for a in e["ipv4"]]
            if not seen:  # no report: the leases and static addresses say what they can
                seen = [e["lease"]["ip"] if e["lease"] else str(e["static_ip"]).split("/")[0]
                        for e in out if e["mode"] != "user" and (e["lease"] or e["static_ip"])]
            d["ipv4"] = seen
        return d

    async def _wait_marker(self, rec: VmRecord, timeout: float) -> float:
        import asyncio

        from ..builders.minimal import READY_MARKER
        marker = READY_MARKER.encode()
        deadline = time.monotonic() + timeout
        seen = b""
        offset = 0
        while time.monotonic() < deadline:
            try:
                with open(rec.paths.console, "rb") as f:  # read only what is new
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                seen = seen[-len(marker):] + chunk
                if marker in seen:
                    return time.time()
            except OSError:
                pass
            if self._died(rec):
                raise LaunchError(f"VM {rec.name} died before it was ready",
                                  console_tail=self._console_tail(rec))
            await asyncio.sleep(0.02)
        raise LaunchError(f"VM {rec.name} printed no ready marker within {timeout:.0f}s",
                          console_tail=self._console_tail(rec))

    async def stop(self, name: str, timeout: float = 30.0) -> StopOutcome:
        """Agent shutdown (when the guest has one), then the hypervisor's power button, quit
        and kill, all within ``timeout`` (0: kill at once). The state says ``stopped`` only
        once the hypervisor process is gone."""
        lock = self._lock(name)
        await lock.acquire_async()
        try:
            return await self._stop_locked(self._current(name), timeout)
        finally:
            self._settle_net(name)
            lock.release()

    async def _stop_locked(self, rec: VmRecord, timeout: float) -> StopOutcome:
        name = rec.name
        self._transition(name, (VmState.RUNNING,), VmState.STOPPING)
        hit("stop.stopping")
        assert rec.runtime is not None  # running rows have a runtime
        drv = self.driver(rec.backend)
        deadline = time.monotonic() + timeout
        try:
            outcome = StopOutcome.NOT_RUNNING
            if timeout > 0 and rec.request is not None and rec.request.spec.agent.enabled:
                if await self._agent_shutdown(rec, deadline):
                    outcome = StopOutcome.AGENT
            if outcome is not StopOutcome.AGENT:
                outcome = await drv.stop(rec.runtime, max(0.0, deadline - time.monotonic()))
        finally:
            # Whatever happened (even an interrupt), record the truth: stopped only if gone.
            live = drv.status(rec.runtime)
            if live in (Liveness.RUNNING, Liveness.PAUSED):
                self._set(name, state=VmState.RUNNING.value)
            else:
                self._set(name, state=VmState.STOPPED.value, runtime=None, stopped_at=time.time(),
                          stop_reason=ExitReason.STOPPED.value)
        if live in (Liveness.RUNNING, Liveness.PAUSED):
            raise VmError(f"VM {name} is still running after stop",
                          hint=f"`vmforge kill {name}`")
        return outcome

    async def _agent_shutdown(self, rec: VmRecord, deadline: float) -> bool:
        """Ask the guest to power off; True once the hypervisor process is gone."""
        import asyncio

        from ..agent.client import AgentClient

        # Queue briefly behind another session (virtio-serial has one), then fall back to the
        # hypervisor's power button rather than wait out a long exec.
        client = AgentClient(rec.agent_endpoint, queue_timeout=2.0)
        try:
            await client.connect(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            await client.call("shutdown", timeout=5)
            hit("stop.agent-asked")
        except (TimeoutError, AgentError, OSError):
            return False
        finally:
            await client.close()
        while time.monotonic() < deadline:
            if self._died(rec):
                return True
            await asyncio.sleep(0.05)
        return False

    def kill(self, name: str) -> StopOutcome:
        """Stop at once (destroy / SIGKILL)."""
        lock = self._lock(name)
        lock.acquire()
        try:
            rec = self._current(name)
            if rec.state is not VmState.RUNNING:
                raise InvalidState(f"VM {name} is {rec.state.value}; nothing to kill")
            self._transition(name, (VmState.RUNNING,), VmState.STOPPING)
            drv = self.driver(rec.backend)
            outcome = StopOutcome.NOT_RUNNING
            for rt in (rec.runtime, drv.find(name, rec.dir)):
                if rt is not None and drv.kill(rt) is StopOutcome.KILLED:
                    outcome = StopOutcome.KILLED
            self._set(name, state=VmState.STOPPED.value, runtime=None, stopped_at=time.time(),
                      stop_reason=ExitReason.STOPPED.value)
            return outcome
        finally:
            self._settle_net(name)
            lock.release()

    async def delete(self, name: str, *, force: bool = False,
                     stop_timeout: float = 10.0) -> None:
        """Remove a VM. ``force`` stops a running one first: gracefully within
        ``stop_timeout`` seconds (0: kill at once), then by SIGKILL. Works in every state,
        broken rows included, and leaves no process, directory or row."""
        lock = self._lock(name)
        await lock.acquire_async()
        try:
            rec = self._current(name)
            if rec.state in LIVE and not force:
                raise InvalidState(f"VM {name} is {rec.state.value}",
                                   hint=f"stop it first or use `vmforge rm -f {name}`")
            if rec.state is VmState.RUNNING and stop_timeout > 0:
                try:
                    await self._stop_locked(rec, stop_timeout)
                except VmError:
                    pass
            self._set(name, state=VmState.DELETING.value)
            hit("delete.deleting")
            self._finish_delete(self._row(name) or rec)
        finally:
            lock.release(unlink=True)

    async def run(self, req: VmRequest, *, timeout: float = 180.0,
                  progress: Progress = no_progress, base_dir: Path | None = None,
                  keep_on_failure: bool = False, schema_check: bool = True) -> VmRecord:
        """create + start + wait until ready + provision (the spec's ``provision`` steps).

        A VM that fails on the way (or is interrupted) is removed, unless ``keep_on_failure``.
        """
        self.create(req, progress, schema_check=schema_check)
        try:
            self.start(req.name, progress)
            progress(Event(req.name, "wait", "waiting for the guest agent"
                           if req.spec.agent.enabled else "waiting for the ready marker"))
            rec = await self.wait_ready(req.name, timeout, progress)
            if req.spec.provision:
                await self.provision(req.name, base_dir or Path.cwd(), progress)
            return rec
        except BaseException as exc:
            if keep_on_failure:
                self._set(req.name, last_error=str(exc)[:2000])
            else:
                try:  # it never became usable: no point in a graceful stop
                    await self.delete(req.name, force=True, stop_timeout=0)
                except VmError:
                    pass
            raise

    @asynccontextmanager
    async def agent(self, name: str, *, on_queued: Callable[[str], None] | None = None
                    ) -> AsyncIterator[AgentClient]:
        """A connected agent session with a running VM (the CLI and the daemon share it).
        ``on_queued`` hears once that the session waits behind another (virtio-serial carries
        one session at a time)."""
        from ..agent.client import AgentClient

        rec = self.get(name)
        if rec.state is not VmState.RUNNING:
            raise InvalidState(f"VM {name} is {rec.state.value}, not running",
                               hint=f"`vmforge start {name}`")
        if not rec.agent_enabled:
            raise InvalidState(f"VM {name} has no agent", hint="set spec.agent.enabled: true")
        async with AgentClient(rec.agent_endpoint, on_queued=on_queued) as client:
            yield client

    async def provision(self, name: str, base_dir: Path,
                        progress: Progress = no_progress) -> list[dict[str, Any]]:
        from .provision import provision
        rec = self.get(name)
        spec = rec.req.spec
        if not spec.agent.enabled:
            raise InvalidState(f"VM {name} has no agent; provisioning needs it",
                               hint="set spec.agent.enabled: true")
        async with self.agent(name) as client:
            return await provision(client, spec.provision, spec.health_checks, base_dir,
                                   adapt(progress, name, "provision"))


def _require_kvm(drv: Driver, accel: Accel, why: str) -> None:
    """Backends that run on KVM only (Cloud Hypervisor, Firecracker) are refused up front on a
    host where KVM does not boot guests, instead of failing inside the VMM."""
    if drv.capabilities().needs_kvm and accel is not Accel.KVM:
        raise HostError(f"{drv.backend.value} runs on KVM only, and KVM does not work here: "
                        f"{why}", hint="use hypervisor: qemu or libvirt, or a host where KVM "
                        "works (see `vmforge doctor`)")


def _remove_tree(path: Path) -> None:
    """Remove a VM's directory, or raise. A process that was killed a moment ago may still
    have a file appear in it (rmtree then fails with ENOTEMPTY): it is tried again."""
    for attempt in range(5):
        try:
            shutil.rmtree(path)
            return
        except OSError as exc:
            if not path.exists():
                return
            if attempt == 4:
                raise VmError(f"cannot remove {path}: {exc.strerror}",
                              hint="the VM stays listed as deleting; `vmforge rm -f` tries "
                                   "again") from exc
            time.sleep(0.1 * (attempt + 1))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def os_error(exc: OSError, what: str, data_root: Path) -> VmforgeError:
    """An operating-system error as a vmforge error with the path and a hint."""
    import errno
    path = exc.filename or data_root
    if exc.errno == errno.ENOSPC:
        return VmError(f"{what}: the disk is full (writing {path})",
                       hint=f"free space on the filesystem holding {data_root}; nothing was "
                            "left behind")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return VmError(f"{what}: permission denied: {path}",
                       hint="run vmforge as the owner of the data directory")
    if exc.errno == errno.ENOENT:
        return SpecError(f"{what}: no such file or directory: {path}")
    return VmError(f"{what}: {exc.strerror or exc}: {path}")
