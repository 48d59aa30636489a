"""The VM manager: create, start, stop, kill, delete, list, with state in SQLite.

States and the transitions allowed between them::

    creating -> created -> starting -> running -> stopping -> stopped
                                          \\-> crashed (QEMU died without being asked)
    created | stopped | crashed -> starting;   any -> deleted (rm, with -f for running)

A failed create removes its half-built directory and its row; two creates of one name are
decided by the primary key, so exactly one wins.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    AgentError,
    InvalidState,
    LaunchError,
    VmError,
    VmExists,
    VmNotFound,
)
from ..hypervisors import qemu_proc
from ..hypervisors.host import HostFacts, probe_host
from ..hypervisors.plan import AGENT_VSOCK_PORT
from ..images.library import Library
from ..paths import DataDir, VmPaths
from ..spec import VmRequest, parse_request, validate_name
from ..state import Database
from . import plan as planmod

__all__ = ["VmManager", "VmRecord", "STARTABLE"]

STARTABLE = ("created", "stopped", "crashed")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class VmRecord:
    name: str
    state: str
    request: VmRequest
    dir: Path
    pid: int | None
    accel: str | None
    created_at: float
    started_at: float | None
    ready_at: float | None
    stopped_at: float | None
    last_error: str | None
    endpoint: str | None = None

    @property
    def paths(self) -> VmPaths:
        return VmPaths(self.dir)

    @property
    def agent_endpoint(self) -> str:
        """Where the agent answers: a unix socket path, or ``vsock:CID:PORT``."""
        return self.endpoint or str(self.paths.agent)

    @property
    def boot_seconds(self) -> float | None:
        if self.started_at and self.ready_at and self.ready_at >= self.started_at:
            return self.ready_at - self.started_at
        return None

    def as_dict(self) -> dict[str, Any]:
        s = self.request.spec
        return {"name": self.name, "state": self.state, "pid": self.pid, "accel": self.accel,
                "dir": str(self.dir), "cpu_cores": s.cpu_cores, "memory_mib": s.memory_mib,
                "created_at": self.created_at, "started_at": self.started_at,
                "ready_at": self.ready_at, "stopped_at": self.stopped_at,
                "boot_seconds": self.boot_seconds, "last_error": self.last_error,
                "console_log": str(self.paths.console), "qmp_socket": str(self.paths.qmp),
                "agent_socket": self.agent_endpoint,
                "spec": json.loads(self.request.model_dump_json(by_alias=True))["spec"]}


class VmManager:
    def __init__(self, data: DataDir | None = None, *, host: HostFacts | None = None) -> None:
        self.data = (data or DataDir.default()).ensure()
        self.db = Database(self.data.db)
        self.library = Library(self.db, self.data.images)
        self._host = host

    def close(self) -> None:
        self.db.close()

    # -- host facts
    def host(self, accel: str = "auto") -> HostFacts:
        if self._host is None or (accel == "tcg" and self._host.accel != "tcg"):
            probe_kernel = None
            img = self.library.find("minimal")
            if img is not None and img.path("vmlinux"):
                probe_kernel = str(img.path("vmlinux"))
            self._host = probe_host(probe_kernel=probe_kernel, cache_dir=self.data.cache,
                                    accel=accel)
        return self._host

    # -- records
    def _record(self, row: sqlite3.Row) -> VmRecord:
        req = parse_request(json.loads(row["spec"]), "stored spec")
        return VmRecord(row["name"], row["state"], req, Path(row["dir"]), row["pid"],
                        row["accel"], row["created_at"], row["started_at"], row["ready_at"],
                        row["stopped_at"], row["last_error"], row["agent_endpoint"])

    def _reconcile(self, rec: VmRecord) -> VmRecord:
        """A VM recorded as running whose QEMU is gone crashed (or powered itself off)."""
        if rec.state in ("running", "starting", "stopping") and \
                not qemu_proc.pid_alive(rec.pid, str(rec.paths.qmp)):
            new = "stopped" if rec.state == "stopping" else "crashed"
            tail = qemu_proc.console_tail(rec.paths.console, 5)
            powered_off = "reboot: Power down" in tail or "System halted" in tail
            if powered_off:
                new = "stopped"
            self._set(rec.name, state=new, pid=None, stopped_at=time.time(),
                      last_error=None if new == "stopped" else "QEMU exited unexpectedly")
            return self.get(rec.name, reconcile=False)
        return rec

    def get(self, name: str, *, reconcile: bool = True) -> VmRecord:
        rows = self.db.query("SELECT * FROM vms WHERE name=?", (name,))
        if not rows:
            raise VmNotFound(f"no VM named {name!r}", hint="see `vmforge ls`")
        rec = self._record(rows[0])
        return self._reconcile(rec) if reconcile else rec

    def vms(self) -> list[VmRecord]:
        return [self._reconcile(self._record(r))
                for r in self.db.query("SELECT * FROM vms ORDER BY created_at")]

    def _set(self, name: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.db.tx() as c:
            c.execute(f"UPDATE vms SET {cols} WHERE name=?", (*fields.values(), name))

    def _transition(self, name: str, allowed: tuple[str, ...], new: str, **fields: Any
                    ) -> VmRecord:
        """Guarded state change: checked and written in one transaction."""
        rec = self.get(name)
        with self.db.tx() as c:
            row = c.execute("SELECT state FROM vms WHERE name=?", (name,)).fetchone()
            if row is None:
                raise VmNotFound(f"no VM named {name!r}")
            if row["state"] not in allowed:
                raise InvalidState(f"VM {name} is {row['state']}; this needs it to be "
                                   f"{' or '.join(allowed)}")
            cols = ", ".join(f"{k}=?" for k in ("state", *fields))
            c.execute(f"UPDATE vms SET {cols} WHERE name=?", (new, *fields.values(), name))
        return rec

    # -- lifecycle
    def ensure_images(self, req: VmRequest, progress: Progress = lambda _m: None) -> None:
        """Build the built-in images (minimal, debian) a spec names but the library lacks."""
        from ..builders.builtin import ensure_builtin
        refs = [d.image for d in req.spec.disks if d.image]
        if req.spec.kernel and req.spec.kernel.image:
            refs.append(req.spec.kernel.image)
        for ref in refs:
            ensure_builtin(self.library, self.data.cache, ref, progress)

    def create(self, req: VmRequest, progress: Progress = lambda _m: None) -> VmRecord:
        validate_name(req.name)
        if req.spec.hypervisor != "qemu":
            from ..errors import HostError
            raise HostError(f"hypervisor {req.spec.hypervisor!r} is not available here",
                            hint="use hypervisor: qemu (the default)")
        inputs = planmod.check_inputs(req, self.library)  # fails before any host probe
        host = self.host(req.spec.accel)
        planmod.check_host(req, host)
        final = self.data.vms / req.name
        try:
            with self.db.tx() as c:
                c.execute("INSERT INTO vms (name, state, spec, dir, created_at, owner_pid) "
                          "VALUES (?, 'creating', ?, ?, ?, ?)",
                          (req.name, req.model_dump_json(by_alias=True), str(final),
                           time.time(), os.getpid()))
                for img in inputs.images:
                    c.execute("INSERT OR IGNORE INTO vm_images (vm_name, image_id) VALUES (?,?)",
                              (req.name, img.id))
        except sqlite3.IntegrityError:
            raise VmExists(f"a VM named {req.name!r} already exists",
                           hint="pick another --name or `vmforge rm` it first") from None
        tmp = self.data.vms / f".{req.name}.creating-{os.getpid()}"
        try:
            if final.exists():
                raise VmError(f"{final} exists but no VM of that name is recorded",
                              hint="move that directory away; vmforge will not overwrite it")
            tmp.mkdir(parents=True)
            from ..agent import guest
            from ..seed import find_ssh_public_key
            progress("preparing disks and seed")
            planmod.prepare_artifacts(req, inputs, VmPaths(tmp), host,
                                      Path(guest.__file__).read_bytes(), find_ssh_public_key())
            (tmp / "spec.json").write_text(req.model_dump_json(by_alias=True, indent=2))
            os.rename(tmp, final)
            self._set(req.name, state="created")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with self.db.tx() as c:
                c.execute("DELETE FROM vm_images WHERE vm_name=?", (req.name,))
                c.execute("DELETE FROM vms WHERE name=?", (req.name,))
            raise
        return self.get(req.name)

    def start(self, name: str, progress: Progress = lambda _m: None) -> VmRecord:
        rec = self._transition(name, STARTABLE, "starting")
        try:
            host = self.host(rec.request.spec.accel)
            if host.accel == "tcg":
                progress(f"KVM unavailable ({host.accel_reason}); using TCG (slower)")
            inputs = planmod.check_inputs(rec.request, self.library)
            planmod.check_host(rec.request, host)
            lp = planmod.launch_plan(rec.request, inputs, rec.paths, host)
            started = time.time()
            pid = qemu_proc.launch(lp, host)
        except BaseException as exc:
            self._set(name, state=rec.state, last_error=str(exc)[:2000])
            raise
        endpoint = (f"vsock:{lp.vsock_cid}:{AGENT_VSOCK_PORT}" if lp.vsock_cid is not None
                    else None)
        self._set(name, state="running", pid=pid, accel=host.accel, started_at=started,
                  ready_at=None, stopped_at=None, last_error=None, agent_endpoint=endpoint)
        return self.get(name)

    def wait_ready(self, name: str, timeout: float = 180.0) -> VmRecord:
        """Wait for the agent's hello (or, without an agent, the image's serial marker)."""
        rec = self.get(name)
        if rec.state != "running":
            raise InvalidState(f"VM {name} is {rec.state}, not running")
        if rec.request.spec.agent.enabled:
            ready_at = asyncio.run(self._wait_agent(rec, timeout))
        else:
            ready_at = self._wait_marker(rec, timeout)
        self._set(name, ready_at=ready_at)
        return self.get(name)

    async def _wait_agent(self, rec: VmRecord, timeout: float) -> float:
        from ..agent.client import AgentClient

        client = AgentClient(rec.agent_endpoint)
        deadline = time.monotonic() + timeout

        async def ready() -> dict[str, Any]:
            hello = await client.wait_ready(timeout)
            # Ready means provisioned: the OS part (cloud-init) has finished too.
            state = await client.wait_cloud_init(max(1.0, deadline - time.monotonic()))
            if state.get("status") == "error":
                self._set(rec.name, last_error="cloud-init reported errors: "
                          + "; ".join(map(str, state.get("errors", [])))[:1500])
            return hello
        waiter = asyncio.ensure_future(ready())
        try:
            while not waiter.done():
                done, _ = await asyncio.wait({waiter}, timeout=0.25)
                if not done and not qemu_proc.pid_alive(rec.pid, str(rec.paths.qmp)):
                    waiter.cancel()
                    self._reconcile(rec)
                    raise LaunchError(f"VM {rec.name} died before it was ready",
                                      console_tail=qemu_proc.console_tail(rec.paths.console))
            try:
                waiter.result()
            except AgentError as exc:
                raise LaunchError(f"VM {rec.name} did not become ready: {exc.message}",
                                  console_tail=qemu_proc.console_tail(rec.paths.console),
                                  hint="see `vmforge console " + rec.name + "`") from exc
            return time.time()
        finally:
            await client.close()

    def _wait_marker(self, rec: VmRecord, timeout: float) -> float:
        from ..builders.minimal import READY_MARKER
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if READY_MARKER.encode() in rec.paths.console.read_bytes():
                    return time.time()
            except OSError:
                pass
            if not qemu_proc.pid_alive(rec.pid, str(rec.paths.qmp)):
                raise LaunchError(f"VM {rec.name} died before it was ready",
                                  console_tail=qemu_proc.console_tail(rec.paths.console))
            time.sleep(0.02)
        raise LaunchError(f"VM {rec.name} printed no ready marker within {timeout:.0f}s",
                          console_tail=qemu_proc.console_tail(rec.paths.console))

    def stop(self, name: str, timeout: float = 30.0) -> str:
        rec = self._transition(name, ("running",), "stopping")
        how = "not running"
        try:
            if rec.request.spec.agent.enabled:
                how = self._agent_shutdown(rec, timeout)
            if how != "agent":
                assert rec.pid is not None
                how = qemu_proc.stop(rec.pid, str(rec.paths.qmp), timeout=timeout,
                                     marker=str(rec.paths.qmp))
        finally:
            self._set(name, state="stopped", pid=None, stopped_at=time.time())
        return how

    def _agent_shutdown(self, rec: VmRecord, timeout: float) -> str:
        from ..agent.client import AgentClient

        async def go() -> bool:
            client = AgentClient(rec.agent_endpoint)
            try:
                await client.connect(timeout=2)
                await client.call("shutdown", timeout=5)
                return True
            except AgentError:
                return False
            finally:
                await client.close()
        try:
            if not asyncio.run(go()):
                return "no agent"
        except Exception:  # noqa: BLE001 - the ACPI path is the fallback
            return "no agent"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not qemu_proc.pid_alive(rec.pid, str(rec.paths.qmp)):
                return "agent"
            time.sleep(0.05)
        return "agent timed out"

    def kill(self, name: str) -> None:
        rec = self.get(name)
        if rec.state not in ("running", "starting", "stopping"):
            raise InvalidState(f"VM {name} is {rec.state}; nothing to kill")
        if rec.pid:
            qemu_proc.kill(rec.pid, str(rec.paths.qmp))
        self._set(name, state="stopped", pid=None, stopped_at=time.time())

    def delete(self, name: str, *, force: bool = False, stop_timeout: float = 10.0) -> None:
        """Remove a VM. ``force`` stops a running one first: gracefully within
        ``stop_timeout`` seconds (0: kill at once), then by SIGKILL."""
        rec = self.get(name)
        if rec.state in ("running", "starting", "stopping"):
            if not force:
                raise InvalidState(f"VM {name} is {rec.state}",
                                   hint=f"stop it first or use `vmforge rm -f {name}`")
            if rec.state == "running" and stop_timeout > 0:
                try:
                    self.stop(name, timeout=stop_timeout)
                except VmError:
                    pass
            if rec.pid:
                qemu_proc.kill(rec.pid, str(rec.paths.qmp))
        shutil.rmtree(rec.dir, ignore_errors=True)
        socks = rec.paths.sockets
        if socks != rec.dir:
            shutil.rmtree(socks, ignore_errors=True)
        with self.db.tx() as c:
            c.execute("DELETE FROM vm_images WHERE vm_name=?", (name,))
            c.execute("DELETE FROM vms WHERE name=?", (name,))

    def run(self, req: VmRequest, *, timeout: float = 180.0,
            progress: Progress = lambda _m: None, base_dir: Path | None = None,
            keep_on_failure: bool = False) -> VmRecord:
        """create + start + wait until ready + provision (the spec's ``provision`` steps).

        A VM that fails on the way is removed, unless ``keep_on_failure`` (for debugging).
        """
        self.create(req, progress)
        try:
            progress("starting")
            self.start(req.name, progress)
            progress("waiting for the guest agent" if req.spec.agent.enabled
                     else "waiting for the ready marker")
            rec = self.wait_ready(req.name, timeout)
            if req.spec.provision:
                self.provision(req.name, base_dir or Path.cwd(), progress)
            return rec
        except BaseException as exc:
            if keep_on_failure:
                self._set(req.name, last_error=str(exc)[:2000])
            else:
                try:  # it never became usable: no point in a graceful stop
                    self.delete(req.name, force=True, stop_timeout=0)
                except VmError:
                    pass
            raise

    def provision(self, name: str, base_dir: Path,
                  progress: Progress = lambda _m: None) -> list[dict[str, Any]]:
        from .provision import provision
        rec = self.get(name)
        if not rec.request.spec.agent.enabled:
            raise InvalidState(f"VM {name} has no agent; provisioning needs it",
                               hint="set spec.agent.enabled: true")
        spec = rec.request.spec
        return provision(rec.agent_endpoint, spec.provision, spec.health_checks, base_dir,
                         progress)
