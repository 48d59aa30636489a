"""QEMU backend, process part: launch a LaunchPlan, talk QMP, stop, kill, check liveness.

QEMU is started with ``-daemonize``: the parent returns only after every socket (QMP, agent)
exists, so nobody races QEMU's start-up, and the VM outlives the command that started it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from .. import run
from ..errors import CommandError, LaunchError
from .host import HostFacts
from .plan import LaunchPlan
from .qemu import qemu_argv

__all__ = ["launch", "qmp", "pid_alive", "wait_gone", "stop", "kill", "console_tail"]


def console_tail(path: str | Path, lines: int = 25) -> str:
    try:
        data = Path(path).read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """True if ``pid`` runs and (when given) its command line mentions ``marker``.

    The marker (the VM's QMP socket path) guards against PID reuse after a crash.
    """
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if marker is not None:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            return marker in cmdline
        return True
    except (OSError, IndexError):
        return False


def launch(plan: LaunchPlan, host: HostFacts) -> int:
    for sock in (plan.qmp_socket, plan.agent_socket):
        if sock:
            Path(sock).parent.mkdir(parents=True, exist_ok=True)
            Path(sock).unlink(missing_ok=True)
    Path(plan.pidfile).unlink(missing_ok=True)
    Path(plan.console_log).write_bytes(b"")
    argv = qemu_argv(plan, host)
    try:
        run.run(argv, timeout=60, what="qemu")
    except CommandError as exc:
        raise LaunchError(f"QEMU failed to start VM {plan.name}: "
                          f"{exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else ''}",
                          argv=argv, returncode=exc.returncode,
                          console_tail=console_tail(plan.console_log),
                          hint="check the spec's files and `vmforge doctor`") from exc
    try:
        return int(Path(plan.pidfile).read_text().strip())
    except (OSError, ValueError) as exc:
        raise LaunchError(f"QEMU started but wrote no pid file {plan.pidfile}",
                          argv=argv) from exc


async def _qmp(socket_path: str, command: str, args: dict[str, Any] | None,
               timeout: float) -> Any:
    from qemu.qmp import QMPClient

    client = QMPClient("vmforge")
    await asyncio.wait_for(client.connect(socket_path), timeout)
    try:
        return await asyncio.wait_for(client.execute(command, args), timeout)
    finally:
        try:
            await client.disconnect()
        except (EOFError, OSError, Exception):  # QEMU may have closed the socket (quit)
            pass


def qmp(socket_path: str | Path, command: str, args: dict[str, Any] | None = None,
        timeout: float = 10.0) -> Any:
    """Run one QMP command synchronously (a fresh connection each time)."""
    return asyncio.run(_qmp(str(socket_path), command, args, timeout))


def wait_gone(pid: int, marker: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid, marker):
            return True
        time.sleep(0.05)
    return not pid_alive(pid, marker)


def kill(pid: int, marker: str | None = None) -> None:
    if pid_alive(pid, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_gone(pid, marker, 10)


def stop(pid: int, qmp_socket: str, *, timeout: float = 30.0, marker: str | None = None,
         graceful: bool = True) -> str:
    """ACPI power-down, then ``quit`` after ``timeout``, then SIGKILL. Returns what worked."""
    if not pid_alive(pid, marker):
        return "not running"
    if graceful:
        try:
            qmp(qmp_socket, "system_powerdown")
            if wait_gone(pid, marker, timeout):
                return "powerdown"
        except Exception:  # noqa: BLE001 - fall through to the harder ways
            pass
    try:
        qmp(qmp_socket, "quit", timeout=5)
        if wait_gone(pid, marker, 5):
            return "quit"
    except Exception:  # noqa: BLE001
        pass
    kill(pid, marker)
    return "killed"
