"""QEMU backend, I/O part: start a MachinePlan, talk QMP, stop, kill, find, check liveness.

QEMU is started with ``-daemonize``: the parent returns only after every socket (QMP, agent)
exists, so nobody races QEMU's start-up, and the VM outlives the command that started it. The
pidfile and the QMP socket path are fixed by the VM directory, so a VM whose starter died before
recording its pid is still found (``find``): no QEMU is ever lost.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ... import run
from ...errors import CommandError, LaunchError
from ...fsutil import tail_text as console_tail
from ...paths import VmPaths
from ..base import (
    AGENT_VSOCK_PORT,
    Accel,
    AgentEndpoint,
    Backend,
    BackendStatus,
    Capabilities,
    Driver,
    EndpointKind,
    Liveness,
    Rendered,
    Runtime,
    StopOutcome,
)
from ..host import HostFacts
from ..plan import MachinePlan
from .render import pidfile, qemu_argv, qmp_socket

__all__ = ["QemuDriver", "pid_alive", "wait_gone", "kill_pid", "kill_runtime", "console_tail",
           "qmp"]

POWER_OFF_MARKS = ("reboot: Power down", "System halted")


def _cmdline(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    return raw.decode(errors="replace").split("\0")


def pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """True if ``pid`` runs and (when given) its command line mentions ``marker``.

    The marker (the VM's QMP socket path) guards against PID reuse after a crash.
    """
    if not pid:
        return False
    args = _cmdline(pid)
    if args is None:
        return False
    return marker is None or any(marker in a for a in args)


def wait_gone(pid: int, marker: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid, marker):
            return True
        time.sleep(0.02)
    return not pid_alive(pid, marker)


async def _wait_gone(pid: int, marker: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid, marker):
            return True
        await asyncio.sleep(0.02)
    return not pid_alive(pid, marker)


def kill_runtime(rt: Runtime) -> StopOutcome:
    """SIGKILL a VMM process we started (QEMU, Cloud Hypervisor, Firecracker), pid-reuse safe."""
    if rt.pid is None or not pid_alive(rt.pid, rt.marker):
        return StopOutcome.NOT_RUNNING
    kill_pid(rt.pid, rt.marker)
    return StopOutcome.KILLED


def kill_pid(pid: int, marker: str | None) -> bool:
    """SIGKILL ``pid`` if it is still the process ``marker`` names; True once it is gone."""
    if pid_alive(pid, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
        return wait_gone(pid, marker, 10)
    return True


async def qmp(socket_path: str, command: str, args: dict[str, Any] | None = None,
              timeout: float = 10.0) -> Any:
    """Run one QMP command on a fresh connection."""
    from qemu.qmp import QMPClient

    client = QMPClient("vmforge")
    await asyncio.wait_for(client.connect(socket_path), timeout)
    try:
        return await asyncio.wait_for(client.execute(command, args), timeout)
    finally:
        try:
            await client.disconnect()
        except (EOFError, OSError):  # QEMU may have closed the socket (quit)
            pass


def _runtime_from_cmdline(pid: int, args: list[str], marker: str, console: str) -> Runtime:
    accel = Accel.KVM if any("accel=kvm" in a for a in args) else Accel.TCG
    agent = None
    for a in args:
        if a.startswith("socket,id=agent,path="):
            agent = AgentEndpoint(EndpointKind.UNIX, path=a.split("path=", 1)[1].split(",")[0])
        elif "guest-cid=" in a:
            cid = int(a.split("guest-cid=", 1)[1].split(",")[0])
            agent = AgentEndpoint(EndpointKind.VSOCK, cid=cid, port=AGENT_VSOCK_PORT)
    return Runtime(Backend.QEMU, accel, marker, agent, pid=pid, marker=marker,
                   extra={"console": console})


class QemuDriver(Driver):
    backend = Backend.QEMU

    def capabilities(self) -> Capabilities:
        from ...enums import DiskFormat, Firmware, Machine
        return Capabilities(
            backend=Backend.QEMU, machines=frozenset(Machine), firmware=frozenset(Firmware),
            disk_formats=frozenset(DiskFormat), cdroms=True, needs_kvm=False,
            agent_transports=frozenset({"virtio-serial", "vsock"}), user_net_forwards=True,
            snapshots=True)

    def render(self, plan: MachinePlan, host: HostFacts) -> Rendered:
        return Rendered(argv=qemu_argv(plan, host))

    def probe(self) -> BackendStatus:
        binary = run.find_binary("qemu-system-x86_64")
        if binary is None:
            return BackendStatus(False, "qemu-system-x86_64 not found",
                                 "apt-get install qemu-system-x86")
        return BackendStatus(True, binary)

    def start(self, plan: MachinePlan, host: HostFacts,
              record: Callable[[Runtime], None]) -> Runtime:
        qmp_path = qmp_socket(plan.run_dir)
        Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
        for sock in (qmp_path, plan.agent.socket if plan.agent else None):
            if sock:
                Path(sock).unlink(missing_ok=True)
        pid_path = Path(pidfile(plan.vm_dir))
        pid_path.unlink(missing_ok=True)
        fd = os.open(plan.console_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        argv = qemu_argv(plan, host)
        agent = None
        if plan.agent and plan.agent.socket:
            agent = AgentEndpoint(EndpointKind.UNIX, path=plan.agent.socket)
        elif plan.agent and plan.agent.cid is not None:
            agent = AgentEndpoint(EndpointKind.VSOCK, cid=plan.agent.cid, port=AGENT_VSOCK_PORT)
        extra = {"console": plan.console_log}
        rt = Runtime(Backend.QEMU, plan.accel, qmp_path, agent, pid=None, marker=qmp_path,
                     extra=extra)
        # Durable before the process exists: the pidfile path and the marker are known, so a
        # crash of ours from here on leaves a QEMU that `find` recognises.
        record(rt)
        try:
            run.run(argv, timeout=60, what="qemu")
        except CommandError as exc:
            last = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else ""
            raise LaunchError(f"QEMU failed to start VM {plan.name}: {last}",
                              argv=argv, returncode=exc.returncode,
                              console_tail=console_tail(plan.console_log),
                              hint="check the spec's files and `vmforge doctor`") from exc
        try:
            pid = int(pid_path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise LaunchError(f"QEMU started but wrote no pid file {pid_path}",
                              argv=argv) from exc
        rt = Runtime(Backend.QEMU, plan.accel, qmp_path, agent, pid=pid, marker=qmp_path,
                     extra=extra)
        record(rt)
        return rt

    def find(self, name: str, vm_dir: Path) -> Runtime | None:
        marker = qmp_socket(str(VmPaths(vm_dir).sockets))
        try:
            pid = int(Path(pidfile(str(vm_dir))).read_text().strip())
        except (OSError, ValueError):
            return None
        args = _cmdline(pid)
        if args is None or not any(marker in a for a in args):
            return None
        return _runtime_from_cmdline(pid, args, marker, str(VmPaths(vm_dir).console))

    def status(self, rt: Runtime) -> Liveness:
        if pid_alive(rt.pid, rt.marker):
            return Liveness.RUNNING
        if rt.pid is None:
            return Liveness.GONE
        # Gone: did the guest power off, or did QEMU die? (The daemon's QMP supervision
        # records SHUTDOWN events; without it the console's last words tell.)
        tail = console_tail(rt.extra.get("console", ""), 5)
        return Liveness.POWERED_OFF if any(m in tail for m in POWER_OFF_MARKS) \
            else Liveness.CRASHED

    async def stop(self, rt: Runtime, timeout: float) -> StopOutcome:
        pid, marker = rt.pid, rt.marker
        if not pid_alive(pid, marker):
            return StopOutcome.NOT_RUNNING
        assert pid is not None  # pid_alive(None) is False
        if timeout > 0:
            try:
                await qmp(rt.control, "system_powerdown", timeout=min(5.0, timeout))
                if await _wait_gone(pid, marker, timeout):
                    return StopOutcome.ACPI
            except Exception:  # noqa: BLE001 - QMP gone or wedged (qemu.qmp has its own
                pass           # error tree besides OSError): the harder ways follow
            try:
                await qmp(rt.control, "quit", timeout=3)
                if await _wait_gone(pid, marker, 3):
                    return StopOutcome.QUIT
            except Exception:  # noqa: BLE001 - qemu.qmp raises its own error tree
                pass
        await asyncio.to_thread(kill_pid, pid, marker)
        return StopOutcome.KILLED

    def kill(self, rt: Runtime) -> StopOutcome:
        return kill_runtime(rt)

    def cleanup(self, rt: Runtime | None, name: str, vm_dir: Path) -> None:
        paths = VmPaths(vm_dir)
        for sock in (paths.sockets / "qmp.sock", paths.agent):
            sock.unlink(missing_ok=True)

    # -- memory snapshots (the optional SavesState protocol; qemu/snapshot.py)
    def save_state(self, rt: Runtime, dest: Path, timeout: float) -> None:
        from . import snapshot
        snapshot.save_state(rt, dest, timeout)

    def top_nodes(self, rt: Runtime) -> dict[str, str]:
        from . import snapshot
        return snapshot.top_nodes(rt)

    def switch_disks(self, rt: Runtime, overlays: Mapping[str, str]) -> None:
        from . import snapshot
        snapshot.switch_disks(rt, overlays)

    def rebase_disk(self, rt: Runtime, disk: str, backing: str) -> None:
        from . import snapshot
        snapshot.rebase_disk(rt, disk, backing)

    def resume(self, rt: Runtime) -> None:
        from . import snapshot
        snapshot.resume(rt)

    def quit(self, rt: Runtime) -> None:
        from . import snapshot
        snapshot.quit_and_wait(rt)

    def run_state(self, rt: Runtime) -> str:
        from . import snapshot
        return snapshot.run_state(rt)

    def cancel_save(self, rt: Runtime) -> None:
        from . import snapshot
        snapshot.cancel_save(rt)

    def incoming(self, state: Path) -> str:
        from . import snapshot
        return snapshot.incoming_uri(state)

    def wait_restored(self, rt: Runtime, vm_dir: Path, timeout: float) -> float:
        from . import snapshot
        return snapshot.wait_restored(rt, vm_dir, timeout)

    def state_info(self, state: Path) -> dict[str, Any]:
        from . import snapshot
        return snapshot.read_state_header(state)

    def generation_id(self, rt: Runtime) -> str | None:
        from . import snapshot
        return snapshot.generation_id(rt)
