"""The I/O shared by the API-driven VMMs (Cloud Hypervisor, Firecracker): one VMM process per VM,
started detached with its API socket, then configured and booted by HTTP calls on that socket.

Files, all fixed by the VM directory so that a VMM whose starter died is still found:
``<run_dir>/<api socket>`` (also the PID-reuse marker: it is on the VMM's command line),
``<run_dir>/vsock.sock`` (hybrid vsock: the agent), ``<vm_dir>/<binary>.pid`` and
``<vm_dir>/<binary>.out`` (the VMM's stdout and stderr).

Start: the runtime handle is recorded before the process exists, then again with its pid; the
requests are sent in order, and any refusal kills the VMM and raises ``LaunchError`` with the
VMM's own message. Stop: the power button (the guest shuts down and the VMM exits), then the
VMM is told to quit, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from .. import run
from ..errors import HostError, LaunchError, VmError
from ..fsutil import tail_text
from ..paths import VmPaths
from ._apisnap import RESTORE_DIR, ApiStateSaver, unpack_state
from ._unixhttp import ApiResponse, call
from .base import (
    AGENT_VSOCK_PORT,
    Accel,
    AgentEndpoint,
    ApiRequest,
    BackendStatus,
    Driver,
    EndpointKind,
    Liveness,
    Rendered,
    Runtime,
    StopOutcome,
)
from .plan import MachinePlan
from .qemu.driver import _cmdline, kill_pid, kill_runtime, pid_alive

__all__ = ["ApiVmmDriver", "SupportsSnapshots", "API_TIMEOUT", "START_TIMEOUT"]

API_TIMEOUT = 30.0    # one call (vm.create opens every disk and tap)
START_TIMEOUT = 10.0  # from spawn to an answering API socket


@runtime_checkable
class SupportsSnapshots(Protocol):
    """An optional driver feature (REVIEW §3.1: rare features are optional protocols)."""

    def snapshot_requests(self, dest_dir: str, resume: bool = True) -> list[ApiRequest]: ...

    def restore_requests(self, plan: MachinePlan, src_dir: str) -> list[ApiRequest]: ...

    def snapshot_dir(self, rt: Runtime, dest_dir: Path, resume: bool = True) -> None: ...

    def restore_dir(self, plan: MachinePlan, host: Any, record: Callable[[Runtime], None],
                src_dir: Path) -> Runtime: ...


class ApiVmmDriver(ApiStateSaver, Driver):
    """A driver for a VMM configured over HTTP on a unix socket; subclasses give the names,
    the command line, the requests and how to read the VM's state. Memory snapshots through
    :class:`vmforge.hypervisors.base.SavesState`: :mod:`vmforge.hypervisors._apisnap`."""

    binary_name: ClassVar[str]
    install_hint: ClassVar[str]
    power_off_marks: ClassVar[tuple[str, ...]] = ("reboot: Power down", "System halted")

    def __init__(self, binary: str | None = None) -> None:
        self._binary = binary

    # -- what each VMM says differently
    @abstractmethod
    def api_socket(self, run_dir: str) -> str: ...

    @abstractmethod
    def vsock_socket(self, run_dir: str) -> str: ...

    @abstractmethod
    def argv(self, binary: str, api_socket: str, name: str) -> list[str]: ...

    @abstractmethod
    def ping_request(self) -> ApiRequest: ...

    @abstractmethod
    def boot_requests(self, plan: MachinePlan, host: Any) -> list[ApiRequest]: ...

    @abstractmethod
    def power_button_request(self) -> ApiRequest: ...

    @abstractmethod
    async def ask_to_quit(self, rt: Runtime) -> None:
        """Make the VMM exit without the guest's help (after the power button failed)."""

    @abstractmethod
    def vm_state(self, info: ApiResponse) -> Liveness:
        """The VM's state from the answer to ``info_request``."""

    @abstractmethod
    def info_request(self) -> ApiRequest: ...

    @abstractmethod
    def snapshot_requests(self, dest_dir: str, resume: bool = True) -> list[ApiRequest]: ...

    @abstractmethod
    def restore_requests(self, plan: MachinePlan, src_dir: str) -> list[ApiRequest]: ...

    @abstractmethod
    def load_requests(self, plan: MachinePlan, host: Any, src_dir: Path,
                      manifest: dict[str, Any]) -> list[ApiRequest]:
        """A fresh VMM's calls that load the unpacked state in ``src_dir`` with ``plan``'s
        own devices (paths, taps, sockets), leaving the VM paused."""

    def prepare_files(self, plan: MachinePlan) -> None:
        """Files the VMM opens but does not create (hook)."""

    # -- names
    def pidfile(self, vm_dir: str | Path) -> Path:
        return Path(vm_dir) / f"{self.binary_name}.pid"

    def output_log(self, vm_dir: str | Path) -> Path:
        return Path(vm_dir) / f"{self.binary_name}.out"

    def binary(self) -> str:
        path = self._binary or run.find_binary(self.binary_name)
        if path is None:
            raise HostError(f"{self.binary_name} not found", hint=self.install_hint)
        return path

    # -- pure
    def render(self, plan: MachinePlan, host: Any) -> Rendered:
        return Rendered(requests=self.boot_requests(plan, host))

    # -- I/O
    def probe(self) -> BackendStatus:
        path = self._binary or run.find_binary(self.binary_name)
        if path is None:
            return BackendStatus(False, f"{self.binary_name} not found", self.install_hint)
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return BackendStatus(False, f"{path}, but /dev/kvm is missing or not usable "
                                 f"({self.binary_name} runs on KVM only)",
                                 "load kvm_intel or kvm_amd; add yourself to group kvm")
        return BackendStatus(True, path)

    def start(self, plan: MachinePlan, host: Any, record: Callable[[Runtime], None]) -> Runtime:
        """Boot ``plan``; or, when it has ``incoming`` (a state file of ``save_state``), load
        that state with this VM's own devices and leave it paused (``resume`` runs it)."""
        if plan.incoming:
            work = Path(plan.vm_dir) / RESTORE_DIR
            manifest = unpack_state(Path(plan.incoming), work)
            if manifest.get("backend") != self.backend.value:
                raise LaunchError(f"the saved state is {manifest.get('backend')}'s, not "
                                  f"{self.binary_name}'s")
            return self._launch(plan, record, self.load_requests(plan, host, work, manifest),
                                expect_version=str(manifest.get("vmm_version")))
        return self._launch(plan, record, self.boot_requests(plan, host))

    def restore_dir(self, plan: MachinePlan, host: Any, record: Callable[[Runtime], None],
                src_dir: Path) -> Runtime:
        """A fresh VMM for ``plan``'s VM, restored from a snapshot directory and resumed."""
        return self._launch(plan, record, self.restore_requests(plan, str(src_dir)))

    def snapshot_dir(self, rt: Runtime, dest_dir: Path, resume: bool = True) -> None:
        """Snapshot the running VM into ``dest_dir`` (created, owner-only); the VM is resumed
        afterwards (also when the snapshot fails) unless ``resume`` is False."""
        dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        reqs = self.snapshot_requests(str(dest_dir), resume)
        paused = False
        try:
            for req in reqs:
                self._send(rt, req, what="snapshot")
                paused = paused or req is reqs[0]
        except BaseException:
            if paused and resume:
                try:
                    call(rt.control, *_args(reqs[-1]), timeout=API_TIMEOUT)
                except OSError:
                    pass
            raise

    def _launch(self, plan: MachinePlan, record: Callable[[Runtime], None],
                requests: list[ApiRequest], expect_version: str | None = None) -> Runtime:
        if plan.accel is not Accel.KVM:
            raise HostError(f"{self.binary_name} runs on KVM only, and VM {plan.name} would run "
                            f"under {plan.accel.value}",
                            hint="use a host where KVM works (see `vmforge doctor`), or "
                                 "hypervisor: qemu")
        binary = self.binary()
        Path(plan.run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_sockets(plan.run_dir)
        pidfile = self.pidfile(plan.vm_dir)
        pidfile.unlink(missing_ok=True)
        os.close(os.open(plan.console_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        self.prepare_files(plan)
        api = self.api_socket(plan.run_dir)
        agent = None
        if plan.agent is not None:
            agent = AgentEndpoint(EndpointKind.HYBRID_VSOCK, path=self.vsock_socket(plan.run_dir),
                                  port=AGENT_VSOCK_PORT)
        out = self.output_log(plan.vm_dir)
        rt = Runtime(self.backend, Accel.KVM, api, agent, pid=None, marker=api,
                     extra={"console": plan.console_log, "log": str(out),
                            "vm_dir": plan.vm_dir})
        # Durable before the process exists: its marker is known, so a crash of ours from
        # here on leaves a VMM that `find` recognises.
        record(rt)
        argv = self.argv(binary, api, plan.name)
        # In the VM directory: Firecracker's drives are named relative to it (a snapshot then
        # names them so, and a clone's VMM opens the clone's own files at the load).
        pid = run.spawn_detached(argv, log=out, pidfile=pidfile, cwd=plan.vm_dir)
        rt = replace(rt, pid=pid)
        try:
            record(rt)
            self._wait_api(rt, argv)
            if expect_version is not None and \
                    (version := self.vmm_version(rt)) != expect_version:
                raise LaunchError(f"the saved state was written by {self.binary_name} "
                                  f"{expect_version}; this one is {version}", argv=argv,
                                  hint="a saved state loads only into the version that "
                                       "wrote it; boot the VM cold instead")
            for req in requests:
                self._send(rt, req, what="start", argv=argv)
        except BaseException:
            _kill_child(pid)
            self._remove_sockets(plan.run_dir)
            pidfile.unlink(missing_ok=True)
            raise
        return rt

    def _wait_api(self, rt: Runtime, argv: list[str]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        ping = self.ping_request()
        while True:
            # Our own child, just spawned: its pid alone says whether it runs (its command
            # line, the marker, is briefly empty while it is still inside execve).
            if not pid_alive(rt.pid):
                raise LaunchError(f"{self.binary_name} exited as it started: "
                                  f"{self._out_tail(rt)}", argv=argv,
                                  hint=f"see {rt.extra.get('log')}")
            try:
                if call(rt.control, *_args(ping), timeout=1.0).ok:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.binary_name} did not answer on {rt.control} within "
                                  f"{START_TIMEOUT:.0f}s", argv=argv,
                                  hint=f"see {rt.extra.get('log')}")
            time.sleep(0.01)

    def _send(self, rt: Runtime, req: ApiRequest, *, what: str,
              argv: list[str] | None = None, timeout: float | None = None) -> ApiResponse:
        try:
            resp = call(rt.control, *_args(req), timeout=timeout or API_TIMEOUT)
        except OSError as exc:
            raise LaunchError(f"{self.binary_name} stopped answering at {req.method} "
                              f"{req.path} ({what}): {exc}", argv=argv or (),
                              console_tail=tail_text(rt.extra.get("console", ""), 15),
                              hint=f"see {rt.extra.get('log')}") from exc
        if not resp.ok:
            message = (f"{self.binary_name} refused {req.method} {req.path} ({what}): "
                       f"HTTP {resp.status}: {resp.message}")
            if argv is None:
                raise VmError(message, hint=f"see {rt.extra.get('log')}")
            raise LaunchError(message, argv=argv,
                              console_tail=tail_text(rt.extra.get("console", ""), 15),
                              hint=f"see {rt.extra.get('log')}")
        return resp

    def _out_tail(self, rt: Runtime) -> str:
        tail = tail_text(rt.extra.get("log", ""), 5).strip()
        return tail or "no output"

    def _runtime_for(self, pid: int, vm_dir: Path) -> Runtime:
        paths = VmPaths(vm_dir)
        run_dir = str(paths.sockets)
        api = self.api_socket(run_dir)
        vsock = self.vsock_socket(run_dir)
        agent = AgentEndpoint(EndpointKind.HYBRID_VSOCK, path=vsock, port=AGENT_VSOCK_PORT) \
            if Path(vsock).exists() else None
        return Runtime(self.backend, Accel.KVM, api, agent, pid=pid, marker=api,
                       extra={"console": str(paths.console),
                              "log": str(self.output_log(vm_dir)), "vm_dir": str(vm_dir)})

    def find(self, name: str, vm_dir: Path) -> Runtime | None:
        api = self.api_socket(str(VmPaths(vm_dir).sockets))
        try:
            pid: int | None = int(self.pidfile(vm_dir).read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid_alive(pid, api):
            return self._runtime_for(pid, vm_dir)
        # No (or a stale) pidfile: we may have died between the spawn and writing it. The
        # API socket's path on a command line is this VM's VMM.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                args = _cmdline(int(entry.name))
                if args and any(api in a for a in args):
                    return self._runtime_for(int(entry.name), vm_dir)
        return None

    def status(self, rt: Runtime) -> Liveness:
        if rt.pid is None:
            return Liveness.GONE
        if pid_alive(rt.pid, rt.marker):
            try:
                info = call(rt.control, *_args(self.info_request()), timeout=2.0)
            except OSError:
                return Liveness.RUNNING  # alive but busy: not ours to call it dead
            return self.vm_state(info)
        tail = tail_text(rt.extra.get("console", ""), 5)
        return Liveness.POWERED_OFF if any(m in tail for m in self.power_off_marks) \
            else Liveness.CRASHED

    async def stop(self, rt: Runtime, timeout: float) -> StopOutcome:
        pid, marker = rt.pid, rt.marker
        if not pid_alive(pid, marker):
            return StopOutcome.NOT_RUNNING
        assert pid is not None  # pid_alive(None) is False
        if timeout > 0:
            try:
                resp = await asyncio.to_thread(call, rt.control,
                                               *_args(self.power_button_request()),
                                               timeout=min(5.0, timeout))
                if resp.ok and await _wait_gone(pid, marker, timeout):
                    return StopOutcome.ACPI
            except OSError:
                pass
            try:
                await self.ask_to_quit(rt)
            except OSError:  # a VMM that exits as it answers may not finish the answer
                pass
            if await _wait_gone(pid, marker, 3):
                return StopOutcome.QUIT
        await asyncio.to_thread(kill_pid, pid, marker)
        return StopOutcome.KILLED

    def kill(self, rt: Runtime) -> StopOutcome:
        return kill_runtime(rt)

    def cleanup(self, rt: Runtime | None, name: str, vm_dir: Path) -> None:
        self._remove_sockets(str(VmPaths(vm_dir).sockets))
        self.pidfile(vm_dir).unlink(missing_ok=True)

    def _remove_sockets(self, run_dir: str) -> None:
        Path(self.api_socket(run_dir)).unlink(missing_ok=True)
        vsock = Path(self.vsock_socket(run_dir))
        vsock.unlink(missing_ok=True)
        for p in vsock.parent.glob(vsock.name + "_*"):  # Firecracker's guest-initiated ports
            p.unlink(missing_ok=True)


def _args(req: ApiRequest) -> tuple[str, str, Any]:
    return req.method, req.path, req.body


async def _wait_gone(pid: int, marker: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid, marker):
            return True
        await asyncio.sleep(0.02)
    return not pid_alive(pid, marker)


def _kill_child(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL a VMM we just spawned and wait until it is gone. Not ``kill_pid``: that checks
    the marker on the command line, which a child still inside execve does not show yet."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def sigterm(pid: int | None, marker: str | None) -> None:
    """Ask a VMM to exit (Firecracker has no shutdown call; SIGTERM ends it cleanly)."""
    if pid is not None and pid_alive(pid, marker):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
