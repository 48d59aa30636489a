"""QEMU's part of memory snapshots (vmforge.node.snapshots): save a running VM's memory and
device state to a file, put its disks on new top overlays, and start a VM from a state file.

Measured on QEMU 7.2 (see NOTES-machine.md):

* ``stop`` + ``migrate`` to ``exec:cat > FILE`` saves a 256 MiB guest in ~0.65 s (~100 MiB);
  the VM is left ``postmigrate`` with its disk images inactive (flushed, not written).
* Taking the external snapshot (``blockdev-snapshot-sync``, mode ``existing``) *after* the
  migration, while the images are inactive, then ``cont``: the old top image is reopened
  read-only and never written again. Taken *before* the migration (images active), every
  later migration of that QEMU fails in ``bdrv_inactivate_all`` with no error text: so the
  order here is save first, switch second.
* A new QEMU with the same devices and ``-incoming "exec:cat FILE" -S`` is ``paused`` in
  0.15-0.4 s; a failed load (truncated file, other devices) makes it exit, and with ``-D``
  its reason is in the log (a daemonized QEMU's stderr is /dev/null).

The monitor is spoken synchronously here (recovery runs inside the manager's synchronous
reconcile, which may itself run inside an event loop).
"""

from __future__ import annotations

import json
import shlex
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ...errors import LaunchError, VmError
from ...fsutil import tail_text
from ..base import Runtime
from .render import qemu_log

__all__ = ["Qmp", "QmpError", "save_state", "switch_disks", "top_nodes", "rebase_disk",
           "resume", "run_state", "cancel_save", "wait_restored", "incoming_uri",
           "read_state_header", "generation_id", "quit_and_wait"]

QEVM_MAGIC = b"QEVM"
QEVM_VERSION = 3
_SECTION_CONFIGURATION = 0x07


class QmpError(VmError):
    """QEMU refused a monitor command (its error class and description)."""

    def __init__(self, command: str, desc: str, klass: str = "GenericError") -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.desc = desc
        self.klass = klass


class Qmp:
    """A blocking QMP session on the VM's monitor socket. QEMU serves one monitor client at a
    time; the daemon's supervisor lets go of it while the VM's lock is held, so connecting
    waits (up to ``timeout``) for the greeting."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.sock.connect(path)
                self._buf = b""
                greeting = self._read()
                if "QMP" not in greeting:
                    raise OSError(f"not a QMP greeting: {greeting!r}")
                self.execute("qmp_capabilities")
                return
            except (OSError, ValueError) as exc:
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise VmError(f"cannot talk to QEMU's monitor {path}: {exc}",
                                  hint="is the VM running? `vmforge ls`") from exc
                time.sleep(0.05)

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("QEMU closed the monitor")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError(f"unexpected QMP message {msg!r}")
        return msg

    def execute(self, command: str, args: Mapping[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = dict(args)
        self.sock.settimeout(timeout or self.timeout)
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(command, str(err.get("desc")), str(err.get("class")))
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def run_state(rt: Runtime, timeout: float = 10.0) -> str:
    """QEMU's run state: running, paused, postmigrate, inmigrate, finish-migrate, ..."""
    with Qmp(rt.control, timeout) as q:
        return str(q.execute("query-status")["status"])


def save_state(rt: Runtime, dest: Path, timeout: float = 120.0) -> None:
    """Pause the VM and write its memory and device state to ``dest``. The VM is left paused
    (``postmigrate``, images inactive): the caller switches disks and resumes (or quits)."""
    with Qmp(rt.control) as q:
        q.execute("stop")
        q.execute("migrate", {"uri": "exec:cat > " + shlex.quote(str(dest))})
        deadline = time.monotonic() + timeout
        while True:
            info = q.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                why = info.get("error-desc") or "no reason given (see the VM's devices)"
                raise VmError(f"QEMU could not save the VM's state: {why}")
            if time.monotonic() > deadline:
                q.execute("migrate_cancel")
                raise VmError(f"saving the VM's state took longer than {timeout:.0f}s")
            time.sleep(0.01)


def cancel_save(rt: Runtime) -> None:
    with Qmp(rt.control) as q:
        if q.execute("query-migrate").get("status") in ("active", "setup", "device",
                                                         "pre-switchover"):
            q.execute("migrate_cancel")


def top_nodes(rt: Runtime) -> dict[str, str]:
    """Each disk drive's top node name (a switch of its image changes it)."""
    with Qmp(rt.control) as q:
        out = {}
        for b in q.execute("query-block"):
            ins = b.get("inserted")
            if ins and b.get("device"):
                out[str(b["device"])] = str(ins.get("node-name", ""))
        return out


def switch_disks(rt: Runtime, overlays: Mapping[str, str]) -> None:
    """Make each drive (``-drive id``) write to its new overlay (already made, its backing the
    old top image): one transaction, all or nothing."""
    if not overlays:
        return
    actions = [{"type": "blockdev-snapshot-sync",
                "data": {"device": dev, "snapshot-file": path, "format": "qcow2",
                         "mode": "existing"}} for dev, path in overlays.items()]
    with Qmp(rt.control) as q:
        q.execute("transaction", {"actions": actions})


def rebase_disk(rt: Runtime, device: str, backing: str) -> None:
    """Name ``backing`` as the backing file in the header of the drive's top image (QEMU
    writes its own image; nothing is reopened)."""
    with Qmp(rt.control) as q:
        node = None
        for b in q.execute("query-block"):
            if b.get("device") == device and b.get("inserted"):
                node = b["inserted"].get("node-name")
        if not node:
            raise VmError(f"QEMU has no drive {device!r}")
        q.execute("change-backing-file", {"device": device, "image-node-name": node,
                                          "backing-file": backing})


def resume(rt: Runtime) -> None:
    """Run the guest again (after a save, images are activated again first, by QEMU)."""
    with Qmp(rt.control) as q:
        if q.execute("query-status")["status"] != "running":
            q.execute("cont")


def quit_and_wait(rt: Runtime, timeout: float = 10.0) -> None:
    from .driver import kill_pid, wait_gone
    try:
        with Qmp(rt.control, 3.0) as q:
            q.execute("quit")
    except (VmError, OSError):
        pass
    if rt.pid and not wait_gone(rt.pid, rt.marker, timeout):
        kill_pid(rt.pid, rt.marker)


def generation_id(rt: Runtime) -> str | None:
    try:
        with Qmp(rt.control, 3.0) as q:
            return str(q.execute("query-vm-generation-id")["guid"])
    except (VmError, OSError, KeyError, TypeError):
        return None


def incoming_uri(state: str | Path) -> str:
    return "exec:cat " + shlex.quote(str(state))


def read_state_header(path: str | Path) -> dict[str, Any]:
    """The start of a QEMU migration stream: its format version and machine type
    (``pc-q35-7.2``). Raises VmError for a file that is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 4 + 1 + 4 + 256)
    except OSError as exc:
        raise VmError(f"cannot read the saved state {path}: {exc.strerror}") from exc
    if len(head) < 8 or head[:4] != QEVM_MAGIC:
        raise VmError(f"{path} is not a QEMU saved state (no QEVM header)")
    version = struct.unpack(">I", head[4:8])[0]
    out: dict[str, Any] = {"version": version, "machine": None}
    if version != QEVM_VERSION:
        raise VmError(f"{path}: QEMU state format {version}, this QEMU reads "
                      f"{QEVM_VERSION}")
    if len(head) > 13 and head[8] == _SECTION_CONFIGURATION:
        n = struct.unpack(">I", head[9:13])[0]
        out["machine"] = head[13:13 + n].decode(errors="replace")
    return out


def wait_restored(rt: Runtime, vm_dir: str | Path, timeout: float = 60.0) -> float:
    """After a start with ``-incoming``: until the state is loaded (QEMU ``paused``); its
    duration. A QEMU that exits instead (a truncated file, another device set or QEMU
    version) raises LaunchError with QEMU's own reason."""
    from .driver import pid_alive
    t0 = time.monotonic()
    deadline = t0 + timeout
    log = qemu_log(str(vm_dir))
    q: Qmp | None = None
    try:
        while True:
            status = "gone"
            if pid_alive(rt.pid, rt.marker):
                try:
                    if q is None:
                        q = Qmp(rt.control, 2.0)
                    status = str(q.execute("query-status")["status"])
                except (VmError, OSError, ValueError):
                    if q is not None:
                        q.close()
                        q = None
                    status = "unknown" if pid_alive(rt.pid, rt.marker) else "gone"
            if status == "paused":
                return time.monotonic() - t0
            if status == "gone":
                reason = " ".join(line.split(": ", 1)[-1] for line in
                                  tail_text(log, 6).splitlines() if line.strip())
                raise LaunchError("QEMU could not load the saved state: "
                                  + (reason or "it exited without a reason"),
                                  hint="the state file is damaged, or was written by another "
                                       "QEMU or for other devices; `vmforge image verify` "
                                       "re-hashes it")
            if status not in ("inmigrate", "unknown", "prelaunch"):
                raise LaunchError(f"QEMU is {status} after loading the saved state, not "
                                  "paused", console_tail=tail_text(log, 10))
            if time.monotonic() > deadline:
                raise LaunchError(f"QEMU did not load the saved state within {timeout:.0f}s",
                                  console_tail=tail_text(log, 10))
            time.sleep(0.01)
    finally:
        if q is not None:
            q.close()

