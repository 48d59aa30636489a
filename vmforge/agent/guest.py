#!/usr/bin/env python3
"""vmforge guest agent: one stdlib-only file (python3 >= 3.8) that runs inside the VM.

It talks to the host over the virtio-serial port ``org.vmforge.agent.0`` (or AF_VSOCK where
there is no such port) and listens on nothing else. Framing is RFC 7464 JSON text sequences:
every message is ``0x1E`` + compact JSON + ``0x0A``. RS never occurs inside compact JSON, so a
reader that lost its place (host reconnect mid-message) resynchronises at the next RS.

Messages: guest events ``{"event": "hello", "data": {...}}``; host calls
``{"id": N, "call": NAME, "args": {...}}``; guest stream chunks ``{"id": N, "stream": S,
"data": B64}``; and one final ``{"id": N, "result": ...}`` or ``{"id": N, "error": {...}}``.

Interactive execs (hello ``features`` lists ``tty`` and ``stdin_stream``): ``exec`` with
``interactive: true`` takes its stdin from ``input`` calls while it runs, and with ``tty: true``
(``rows``, ``cols``, ``term``; ``login: true`` for the user's login shell, ``user``) runs on a new
pseudo-terminal whose output is the ``stdout`` stream. Calls naming a running exec by its call
id: ``input {exec, data, eof}`` (answered once written: the host's flow control), ``resize
{exec, rows, cols}`` and ``signal {exec, signum}``. ``boot_timing`` returns raw boot timing
data (kernel log, systemd and cloud-init timestamps) for the host's timeline.

Host folders (virtio-9p): ``mount {mounts: [{tag, target, readonly}]}`` mounts each share at
its target (idempotent: a share already there is left alone). A direct-kernel-booted guest also
gets them on its command line, ``vmforge.mount=TAG:TARGET[:ro]`` (TARGET %-encoded), and the
agent mounts those as it starts, before its hello, so they come back after a reboot of the
guest's own.
"""

from __future__ import annotations

import base64
import errno
import glob
import hashlib
import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

VERSION = "0.3.0"
# What this agent can do beyond the calls of 0.1 (the host checks before relying on them).
FEATURES = ("tty", "stdin_stream", "signal", "boot_timing", "mount", "identity")
PORT_NAME = "org.vmforge.agent.0"
VSOCK_PORT = 1024
RS = b"\x1e"
LF = b"\n"
MAX_RECORD = 8 * 1024 * 1024
CHUNK = 256 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HANGUP_GRACE = 5.0  # seconds between SIGHUP and SIGKILL for a terminal whose host went away


class FramingError(ValueError):
    """Malformed bytes on the agent channel."""


def encode(message: dict[str, Any]) -> bytes:
    return RS + json.dumps(message, separators=(",", ":")).encode() + LF


class Decoder:
    """Incremental RFC 7464 decoder: feed bytes, get messages; garbage is skipped and counted.

    Compact JSON holds neither RS nor LF, so the first of them after a record's RS decides:
    LF ends the record, another RS means it was cut short (resync there). The scan resumes
    where the last one stopped, so a large record arriving in small reads costs O(n).
    """

    _DELIM = re.compile(b"[\x1e\n]")

    def __init__(self, max_record: int = MAX_RECORD) -> None:
        self.buf = bytearray()
        self.max_record = max_record
        self.skipped = 0
        self._scan = 0  # buf[0] is RS and buf[1:_scan] holds no delimiter

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.buf += data
        out: list[dict[str, Any]] = []
        while True:
            if not self._scan:
                start = self.buf.find(RS)
                if start < 0:
                    self.skipped += len(self.buf)
                    self.buf.clear()
                    return out
                if start:
                    self.skipped += start
                    del self.buf[:start]
                self._scan = 1
            m = self._DELIM.search(self.buf, self._scan)
            if m is None:
                self._scan = len(self.buf)
                if len(self.buf) > self.max_record:
                    self.skipped += len(self.buf)
                    self.buf.clear()
                    self._scan = 0
                return out
            end = m.start()
            if self.buf[end] == RS[0]:  # cut short by the next record
                self.skipped += end
                del self.buf[:end]
                self._scan = 1
                continue
            raw = bytes(self.buf[1:end])
            del self.buf[:end + 1]
            self._scan = 0
            try:
                msg = json.loads(raw)
            except ValueError:
                self.skipped += len(raw) + 2
                continue
            if isinstance(msg, dict):
                out.append(msg)
            else:
                self.skipped += len(raw) + 2

    def finish(self) -> None:
        """At end of stream: an unterminated record is a truncated message."""
        if self.buf.find(RS) >= 0:
            n = len(self.buf)
            self.buf.clear()
            raise FramingError(f"truncated message: stream ended {n} bytes into a record "
                               "without its terminating newline")


# ---------------------------------------------------------------------------- guest facts

def read_text(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def cloud_init_state() -> dict[str, Any]:
    if not (os.path.exists("/usr/bin/cloud-init") or os.path.exists("/usr/local/bin/cloud-init")):
        return {"status": "not-installed", "errors": []}
    if os.path.exists("/run/cloud-init/disabled"):
        return {"status": "disabled", "errors": []}
    result = read_text("/run/cloud-init/result.json")
    if result:
        try:
            errors = json.loads(result).get("v1", {}).get("errors", [])
        except ValueError:
            errors = ["unreadable result.json"]
        return {"status": "error" if errors else "done", "errors": errors}
    status = read_text("/run/cloud-init/status.json")
    if status:
        try:
            stage = json.loads(status).get("v1", {}).get("stage")
        except ValueError:
            stage = None
        return {"status": "running", "stage": stage, "errors": []}
    return {"status": "not-started", "errors": []}


# The VM's name after a restore from a snapshot or a rename (the ``identity`` call): the
# kernel command line still carries the name it booted with. /run is gone after a reboot.
IDENTITY_FILE = "/run/vmforge/id"


def vm_id() -> str:
    override = read_text(IDENTITY_FILE).strip()
    if override:
        return override
    for token in read_text("/proc/cmdline").split():
        if token.startswith("vmforge.id="):
            return token.split("=", 1)[1]
    serial = read_text("/sys/class/dmi/id/product_serial").strip()
    if serial.startswith("vmforge:"):
        return serial.split(":", 1)[1]
    return socket.gethostname()


def boot_id() -> str:
    """The kernel's random id of this boot: tells a host whose connection survived a reboot
    (virtio-serial) the new boot's hello from the old one's."""
    return read_text("/proc/sys/kernel/random/boot_id").strip()


def uptime() -> float:
    """Seconds since the kernel started (``/proc/uptime``'s clock, at full precision)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        pass
    try:
        return float(read_text("/proc/uptime", "0 0").split()[0])
    except ValueError:
        return 0.0


def meminfo() -> dict[str, int]:
    out = {}
    for line in read_text("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "MemFree"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def http_status(url: str, timeout: float) -> int:
    """Minimal HTTP/1.0 GET on the guest's own network (no urllib: keeps the agent small)."""
    if not url.startswith("http://"):
        raise ValueError("only http:// URLs are supported")
    hostport, _, path = url[len("http://"):].partition("/")
    host, _, port = hostport.partition(":")
    with socket.create_connection((host or "127.0.0.1", int(port or 80)), timeout=timeout) as s:
        s.sendall((f"GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").encode())
        head = s.recv(1024).split(b"\r\n", 1)[0].split()
    return int(head[1]) if len(head) >= 2 else 0


def process_started() -> float | None:
    """When this process was started (exec'd), in seconds of uptime: before the interpreter's
    own start-up, which the agent's ``started`` uptime (taken in ``main``) comes after."""
    try:
        fields = read_text("/proc/self/stat").rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


def read_kmsg(limit: int = 4000) -> list[list[Any]] | None:
    """The kernel log's records as ``[microseconds since boot, text]`` (None: unreadable)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    records: list[list[Any]] = []
    try:
        while len(records) < limit:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while we read: skip it
                    continue
                break
            if not rec:
                break
            head, _, text = rec.decode("utf-8", "replace").partition(";")
            fields = head.split(",")
            if len(fields) >= 3 and fields[2].isdigit():
                records.append([int(fields[2]), text.split("\n", 1)[0][:300]])
    finally:
        os.close(fd)
    return records


SYSTEMD_TIMESTAMPS = ("FirmwareTimestampMonotonic", "LoaderTimestampMonotonic",
                      "KernelTimestampMonotonic", "InitRDTimestampMonotonic",
                      "UserspaceTimestampMonotonic", "FinishTimestampMonotonic")


def systemd_timestamps() -> dict[str, int] | None:
    """systemd's boot timestamps (microseconds, monotonic clock; 0: not reached)."""
    if not os.path.isdir("/run/systemd/system"):
        return None
    try:
        res = subprocess.run(["systemctl", "show", "--property=" + ",".join(SYSTEMD_TIMESTAMPS)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    out = {}
    for line in res.stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


CLOUD_INIT_LOG = "/var/log/cloud-init.log"
CLOUD_INIT_EVENT_MARKS = ("start:", "finish:", "Cloud-init v.")  # what `analyze dump` reads


def read_json_file(path: str) -> Any:
    text = read_text(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def cloud_init_timing() -> dict[str, Any] | None:
    """cloud-init's own timing data, raw: status.json and result.json of this boot (/run), and
    the event lines of its log (the lines ``cloud-init analyze dump`` parses; running that
    command would cost seconds of Python start-up under TCG)."""
    if not (os.path.exists("/usr/bin/cloud-init") or os.path.exists("/usr/local/bin/cloud-init")):
        return None
    lines: list[str] = []
    try:
        with open(CLOUD_INIT_LOG, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 32 * 1024 * 1024))
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if any(m in line for m in CLOUD_INIT_EVENT_MARKS):
                    lines.append(line[:500])
    except OSError:
        pass
    return {"status": read_json_file("/run/cloud-init/status.json"),
            "result": read_json_file("/run/cloud-init/result.json"), "log": lines[-5000:]}


def _netlink_addresses() -> dict[int, dict[str, list[str]]]:
    """ifindex -> {"ipv4": [...], "ipv6": [...]} (``ADDRESS/PREFIX``) from one netlink
    RTM_GETADDR dump: every address of every interface, with no tool (busybox ``ip`` has no
    JSON) and no ioctl per address."""
    out: dict[int, dict[str, list[str]]] = {}
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
    try:
        nl.settimeout(2)
        nl.bind((0, 0))
        # nlmsghdr(len, RTM_GETADDR, NLM_F_REQUEST|NLM_F_DUMP, seq, pid) + an empty ifaddrmsg
        nl.send(struct.pack("=IHHII", 24, 22, 0x301, 1, 0) + struct.pack("=BBBBI", 0, 0, 0, 0, 0))
        done = False
        while not done:
            data = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                if length < 16 or mtype in (2, 3):  # NLMSG_ERROR, NLMSG_DONE
                    done = True
                    break
                if mtype == 20 and length >= 24:  # RTM_NEWADDR
                    family, prefix, _flags, _scope, index = struct.unpack_from("=BBBBI", data,
                                                                                off + 16)
                    attrs: dict[int, bytes] = {}
                    a, end = off + 24, off + length
                    while a + 4 <= end:
                        alen, atype = struct.unpack_from("=HH", data, a)
                        if alen < 4:
                            break
                        attrs[atype] = data[a + 4:a + alen]
                        a += (alen + 3) & ~3
                    raw = attrs.get(2) or attrs.get(1)  # IFA_LOCAL, else IFA_ADDRESS
                    if raw and family in (socket.AF_INET, socket.AF_INET6):
                        key = "ipv4" if family == socket.AF_INET else "ipv6"
                        entry = out.setdefault(index, {"ipv4": [], "ipv6": []})
                        entry[key].append(f"{socket.inet_ntop(family, raw)}/{prefix}")
                off += (length + 3) & ~3
    finally:
        nl.close()
    return out


def interfaces() -> list[dict[str, Any]]:
    """The guest's network interfaces but loopback: name, MAC, operstate, addresses."""
    try:
        addrs = _netlink_addresses()
    except OSError:
        addrs = {}
    out = []
    for index, name in socket.if_nameindex():
        if name == "lo":
            continue
        base = "/sys/class/net/" + name
        a = addrs.get(index, {})
        out.append({"name": name, "index": index,
                    "mac": read_text(base + "/address").strip().lower(),
                    "state": read_text(base + "/operstate").strip(),
                    "ipv4": a.get("ipv4", []), "ipv6": a.get("ipv6", [])})
    return out


def hello_interfaces() -> list[dict[str, Any]]:
    try:
        return interfaces()
    except Exception:  # never let a fact cost the hello
        return []


# ---------------------------------------------------------------------------- terminals

def find_user(user: str | int | None) -> Any:
    """The passwd entry of ``user`` (a name or uid), or of the agent's own user when None
    (None if it has none)."""
    import pwd
    if user is None:
        try:
            return pwd.getpwuid(os.getuid())
        except KeyError:
            return None
    try:
        if isinstance(user, int) or str(user).isdigit():
            return pwd.getpwuid(int(user))
        return pwd.getpwnam(str(user))
    except KeyError:
        raise ValueError(f"no user {user!r} in the guest") from None


def login_shell(pw: Any) -> str:
    shell = getattr(pw, "pw_shell", "") or ""
    if shell and os.access(shell, os.X_OK):
        return shell
    return "/bin/sh"


def ensure_devpts() -> None:
    """Pseudo-terminals need devpts on /dev/pts; a bare initramfs may not have mounted it."""
    if " /dev/pts devpts " in read_text("/proc/mounts"):
        return
    os.makedirs("/dev/pts", exist_ok=True)
    subprocess.call(["mount", "-t", "devpts", "devpts", "/dev/pts"], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import termios
    rows, cols = max(1, min(int(rows), 65535)), max(1, min(int(cols), 65535))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class NoSession(LookupError):
    """A call named an exec that is not running (any more)."""


DEFERRED = object()  # a call's result that is sent later, by another thread


class Session:
    """An exec whose stdin the host streams (``input`` calls). It is registered on the
    reader's thread when the ``exec`` call arrives, so that input sent right behind the call
    waits for the process instead of missing it; ``start`` gives it the process and ``fd``: the
    master of its pseudo-terminal (tty) or the write end of its stdin pipe. Both are
    non-blocking, and writes wait in ``select``: a process that stops reading never wedges
    the agent."""

    def __init__(self, agent: Agent, tty: bool, rows: int = 24, cols: int = 80) -> None:
        self.agent = agent
        self.tty = tty
        self.size = (rows, cols)
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self.fd = -1
        self.stdin_open = True
        self.fd_open = False
        self.hung_up = False
        self.exited = threading.Event()
        self.closing = threading.Event()
        self.inputs: queue.Queue[Any] = queue.Queue()
        self.writer = threading.Thread(target=self._write_loop, daemon=True)

    def start(self, proc: subprocess.Popen, fd: int) -> None:  # type: ignore[type-arg]
        self.proc, self.fd, self.fd_open = proc, fd, True
        os.set_blocking(fd, False)
        if self.tty:
            set_winsize(fd, *self.size)  # a resize may have come before the process
        self.writer.start()
        if self.hung_up:
            self.hangup()

    def abandon(self, why: str) -> None:
        """The process never started: answer the input that waited for it."""
        while True:
            try:
                item = self.inputs.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.agent.send({"id": item[0], "error": {"kind": "NoSession",
                                                          "message": why}})

    # -- input
    def feed(self, mid: Any, data: bytes, eof: bool) -> None:
        self.inputs.put((mid, data, eof))

    def _write_loop(self) -> None:
        while True:
            item = self.inputs.get()
            if item is None:
                return
            mid, data, eof = item
            written = 0
            if self.stdin_open:
                try:
                    if data:
                        self._write(data)
                        written = len(data)
                    if eof:
                        if self.tty:
                            self._write(b"\x04")  # the terminal's end-of-file character
                        else:
                            self.stdin_open = self.fd_open = False
                            os.close(self.fd)
                except OSError:
                    self.stdin_open = False  # the process closed its stdin or exited
            self.agent.send({"id": mid, "result": {"written": written,
                                                   "open": self.stdin_open}})

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.closing.is_set():
                raise OSError(errno.EPIPE, "the session is closing")
            _, ready, _ = select.select([], [self.fd], [], 0.2)
            if not ready:
                if self.exited.is_set():
                    raise OSError(errno.EPIPE, "the process has exited")
                continue
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                continue

    # -- output (terminal)
    def pump_terminal(self, emit: Callable[[str, bytes], None]) -> None:
        """Terminal output until every process holding it has closed it (EIO), or, once the
        command has exited, until it stays quiet for 50 ms (a background job may keep the
        terminal open) or 2 s have passed."""
        deadline = None
        while True:
            done = self.exited.is_set()
            if done and deadline is None:
                deadline = time.monotonic() + 2.0
            ready, _, _ = select.select([self.fd], [], [], 0.05 if done else 0.5)
            if not ready:
                if done:
                    return
                continue
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                return  # EIO: the terminal's last user is gone
            if not data:
                return
            emit("stdout", data)
            if deadline is not None and time.monotonic() > deadline:
                return

    # -- control
    def resize(self, rows: int, cols: int) -> None:
        if not self.tty:
            raise ValueError("this exec has no terminal to resize")
        self.size = (rows, cols)
        if self.fd_open:
            set_winsize(self.fd, rows, cols)

    def signal(self, signum: int) -> None:
        """To the terminal's foreground process group (the job the user sees), else to the
        command's own group."""
        if self.proc is None:
            raise NoSession("the command has not started yet")
        pgrp = self.proc.pid
        if self.tty:
            try:
                pgrp = os.tcgetpgrp(self.fd)
            except OSError:
                pass
        os.killpg(pgrp, signum)

    def hangup(self) -> None:
        """The host went away: a terminal hangs up (SIGHUP, then SIGKILL if it lingers), a
        pipe reaches end of file."""
        self.hung_up = True
        if self.proc is None:
            return  # start() hangs up
        if not self.tty:
            self._close_input()
            return
        for sig in (signal.SIGHUP, signal.SIGCONT):
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass

        pid = self.proc.pid

        def reap() -> None:
            if not self.exited.wait(HANGUP_GRACE):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        threading.Thread(target=reap, daemon=True).start()

    def _close_input(self) -> None:
        """Stop the writer (what is queued is answered, not written) and close the fd."""
        self.closing.set()
        self.inputs.put(None)
        if self.writer.ident is not None:
            self.writer.join(5)
        if not self.writer.is_alive() and self.fd_open:
            self.stdin_open = self.fd_open = False
            try:
                os.close(self.fd)
            except OSError:
                pass

    def finish(self) -> None:
        """After the command and its output pump ended."""
        self.exited.set()
        self._close_input()


# ---------------------------------------------------------------------------- host folders

MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144"
# The minimal image lists its 9p modules here, in load order (flat .ko files in /lib/modules,
# no modprobe index); elsewhere modprobe finds them.
MINIMAL_9P_MODULES = "/etc/modules.9p"
MOUNT_TOKEN = "vmforge.mount="
_MOUNT_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-+@~=")
_mount_lock = threading.Lock()


class MountError(Exception):
    """A host folder could not be mounted (the message says why)."""


def mount_token(tag: str, target: str, readonly: bool) -> str:
    """One share on the kernel command line: ``vmforge.mount=TAG:TARGET[:ro]``, with every
    byte of TARGET outside a small safe set %-encoded (no spaces, colons or commas)."""
    enc = "".join(chr(b) if b in _MOUNT_SAFE else f"%{b:02X}" for b in target.encode())
    return MOUNT_TOKEN + tag + ":" + enc + (":ro" if readonly else "")


def cmdline_mounts(cmdline: str) -> list[dict[str, Any]]:
    """The shares ``vmforge.mount=`` tokens name (malformed ones are skipped)."""
    out = []
    for token in cmdline.split():
        if not token.startswith(MOUNT_TOKEN):
            continue
        parts = token[len(MOUNT_TOKEN):].split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/") or \
                (len(parts) == 3 and parts[2] != "ro"):
            continue
        target = re.sub(b"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                        parts[1].encode()).decode("utf-8", "surrogateescape")
        out.append({"tag": parts[0], "target": target, "readonly": len(parts) == 3})
    return out


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted_9p() -> dict[str, str]:
    """Mount point -> tag of every 9p mount (``/proc/self/mountinfo``)."""
    out = {}
    for line in read_text("/proc/self/mountinfo").splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if sep and len(fields) >= 5 and len(rest) >= 2 and rest[0] == "9p":
            out[_unescape_mountinfo(fields[4])] = _unescape_mountinfo(rest[1])
    return out


def _run_quiet(argv: list[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={"PATH": DEFAULT_PATH}, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, proc.stdout.decode(errors="replace").strip()


def share_tags() -> list[str]:
    """The mount tags of the virtio-9p devices the guest sees (once 9pnet_virtio is in)."""
    tags = []
    for path in glob.glob("/sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag"):
        tags.append(read_text(path).strip("\x00\n"))
    return sorted(tags)


def load_9p() -> None:
    """Load the 9p file system and its virtio transport, as this image keeps them."""
    if os.path.isdir("/sys/module/9pnet_virtio") and "\t9p\n" in read_text("/proc/filesystems"):
        return
    listed = read_text(MINIMAL_9P_MODULES).split()
    why = ""
    if listed:
        for name in listed:
            if not os.path.isdir("/sys/module/" + name):
                code, text = _run_quiet(["insmod", f"/lib/modules/{name}.ko"])
                why = why or (text if code else "")
    else:
        code, why = _run_quiet(["modprobe", "-a", "9pnet_virtio", "9p"])
    if "\t9p\n" not in read_text("/proc/filesystems"):
        raise MountError(f"the guest kernel ({os.uname().release}) has no 9p file system "
                         "(CONFIG_9P_FS and CONFIG_NET_9P_VIRTIO; Debian's cloud kernels lack "
                         "them, its generic linux-image-amd64 has them)"
                         + (f": {why}" if why else ""))


def mount_share(tag: str, target: str, readonly: bool) -> str:
    """Mount the share ``tag`` at ``target``: "mounted", or "already" when it is there."""
    if not isinstance(tag, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$", tag):
        raise MountError(f"bad mount tag {tag!r}")
    if not isinstance(target, str) or not target.startswith("/"):
        raise MountError(f"mount target must be an absolute path: {target!r}")
    if mounted_9p().get(target) == tag:
        return "already"
    load_9p()
    tags = share_tags()
    if tag not in tags:
        raise MountError(f"no shared folder with tag {tag} in this VM (it has: "
                         f"{', '.join(tags) or 'none'})")
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as exc:
        raise MountError(f"cannot make mount point {target}: {exc.strerror}") from None
    opts = MOUNT_OPTIONS + (",ro" if readonly else "")
    code, text = _run_quiet(["mount", "-t", "9p", "-o", opts, tag, target])
    if code:
        raise MountError(f"mount {tag} on {target} failed: {text or f'exit {code}'}")
    return "mounted"


def mount_shares(mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mount each share; every one is tried, then the first failure is raised."""
    results, errors = [], []
    with _mount_lock:
        for m in mounts:
            tag, target, ro = m.get("tag"), m.get("target"), bool(m.get("readonly"))
            try:
                status = mount_share(str(tag), str(target), ro)
            except MountError as exc:
                errors.append(str(exc))
                status = f"failed: {exc}"
            results.append({"tag": tag, "target": target, "readonly": ro, "status": status})
    if errors:
        raise MountError("; ".join(errors))
    return results


def boot_mounts() -> None:
    """Mount the shares on the kernel command line, before the agent's hello (about 0.15 s
    under TCG, and only for a VM with shares). Failures go to the kernel log (the console);
    the host's ``mount`` call after the hello tries again and reports them."""
    mounts = cmdline_mounts(read_text("/proc/cmdline"))
    if not mounts:
        return
    try:
        mount_shares(mounts)
    except MountError as exc:
        try:
            with open("/dev/kmsg", "w") as f:
                f.write(f"<4>vmforge-agent: {exc}\n")
        except OSError:
            pass


# ---------------------------------------------------------------------------- the agent

class Agent:
    def __init__(self, write: Callable[[bytes], None], started: float) -> None:
        self._write_raw = write
        self.lock = threading.Lock()
        self.started_uptime = started
        self.uploads: dict[str, dict[str, Any]] = {}
        self.sessions: dict[Any, Session] = {}  # interactive execs by their call id

    # -- output
    def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        with self.lock:
            try:
                self._write_raw(data)
            except OSError:
                pass  # host went away: the next hello resynchronises

    def hello_data(self) -> dict[str, Any]:
        return {"vm_id": vm_id(), "agent_version": VERSION, "kernel": os.uname().release,
                "boot_id": boot_id(), "uptime_at_start": self.started_uptime,
                "uptime": uptime(),
                "python": sys.version.split()[0], "cloud_init": cloud_init_state(),
                "features": list(FEATURES), "interfaces": hello_interfaces()}

    def hello(self) -> None:
        self.send({"event": "hello", "data": self.hello_data()})

    def disconnected(self) -> None:
        for session in list(self.sessions.values()):
            session.hangup()
        for up in list(self.uploads.values()):
            up["queue"].put(None)
            up["worker"].join()
            try:
                up["file"].close()
                os.unlink(up["tmp"])
            except OSError:
                pass
        self.uploads.clear()

    # -- dispatch
    def handle(self, msg: dict[str, Any]) -> None:
        call = msg.get("call")
        mid = msg.get("id")
        args = msg.get("args") or {}
        fn = getattr(self, "call_" + str(call), None)
        if fn is None:
            self.send({"id": mid, "error": {"kind": "unknown_call",
                                            "message": f"unknown call {call!r}"}})
            return
        # Ordered and cheap: run on the reader's thread, in the order they arrived.
        inline = call in ("ping", "hello", "put_chunk", "put_begin", "input", "resize", "signal")
        if call == "exec" and isinstance(args, dict) and (args.get("tty") or
                                                          args.get("interactive")):
            try:
                self.sessions[mid] = Session(self, bool(args.get("tty")),
                                             int(args.get("rows") or 24),
                                             int(args.get("cols") or 80))
            except (TypeError, ValueError):
                pass  # bad sizes: call_exec reports them
        if inline:
            self._run(fn, mid, args)
        else:
            threading.Thread(target=self._run, args=(fn, mid, args), daemon=True).start()

    def _run(self, fn: Callable[..., Any], mid: Any, args: dict[str, Any]) -> None:
        try:
            result = fn(mid, **args)
        except Exception as exc:  # reported to the host, never fatal to the agent
            kind = "bad_args" if isinstance(exc, TypeError) else type(exc).__name__
            session = self.sessions.get(mid)
            if session is not None and session.proc is None:  # an exec that never started
                self.sessions.pop(mid, None)
                session.abandon(f"the command did not start: {exc}")
            self.send({"id": mid, "error": {"kind": kind, "message": str(exc)}})
        else:
            if result is not DEFERRED:
                self.send({"id": mid, "result": result})

    # -- calls
    def call_hello(self, mid: Any) -> dict[str, Any]:
        # Every host connection starts with this call. virtio-serial carries one host
        # connection at a time, so whatever earlier sessions left (half uploads) is dead;
        # a reader blocked in a write across the reconnect never saw their EOF.
        self.disconnected()
        return self.hello_data()

    def call_ping(self, mid: Any) -> dict[str, Any]:
        return {"pong": True, "uptime": uptime(), "boot_id": boot_id()}

    def call_health(self, mid: Any, checks: list[dict[str, Any]] | None = None
                    ) -> dict[str, Any]:
        st = os.statvfs("/")
        results = []
        for chk in checks or []:
            results.append(self._check(chk))
        return {"agent": "ok", "load": list(os.getloadavg()), "memory": meminfo(),
                "disk": {"total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize},
                "uptime": uptime(), "cloud_init": cloud_init_state(), "checks": results,
                "healthy": all(r["ok"] for r in results)}

    def _check(self, chk: dict[str, Any]) -> dict[str, Any]:
        timeout = float(chk.get("timeout_s", 10))
        name = chk.get("name") or chk.get("http_get") or " ".join(chk.get("command") or [])
        try:
            if chk.get("http_get"):
                code = http_status(chk["http_get"], timeout)
                want = int(chk.get("expect_status", 200))
                return {"name": name, "ok": code == want, "detail": f"HTTP {code}"}
            proc = subprocess.run(chk["command"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            return {"name": name, "ok": proc.returncode == 0,
                    "detail": f"exit {proc.returncode}: "
                              f"{proc.stdout.decode(errors='replace')[-200:]}"}
        except Exception as exc:
            return {"name": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"}

    def call_cloud_init_status(self, mid: Any) -> dict[str, Any]:
        return cloud_init_state()

    def call_interfaces(self, mid: Any) -> list[dict[str, Any]]:
        return interfaces()

    def _command(self, argv: list[str], shell: bool, env: dict[str, str] | None,
                 cwd: str | None, tty: bool, term: str | None, login: bool,
                 user: str | int | None) -> tuple[Any, dict[str, str], str | None,
                                                  dict[str, Any]]:
        """What to run, its environment, directory and Popen's user switch."""
        pw = find_user(user) if (login or user is not None) else None
        if login:
            if argv:
                raise ValueError("login runs the user's login shell: give no argv")
            cmd: Any = [login_shell(pw), "-l"]
            shell = False
            full_env = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ")}
            full_env["PATH"] = DEFAULT_PATH
        else:
            if not argv:
                raise ValueError("argv is empty")
            cmd = " ".join(argv) if shell and len(argv) > 1 else (argv[0] if shell else argv)
            full_env = dict(os.environ)
            full_env.setdefault("PATH", DEFAULT_PATH)
        if pw is not None:
            home = pw.pw_dir or "/"
            full_env.update(HOME=home, USER=pw.pw_name, LOGNAME=pw.pw_name,
                            SHELL=login_shell(pw))
            if login and cwd is None:
                cwd = home if os.path.isdir(home) else "/"
        if tty:
            full_env["TERM"] = term or full_env.get("TERM") or "xterm"
        if env:
            full_env.update(env)
        switch: dict[str, Any] = {}
        if pw is not None and user is not None and pw.pw_uid != os.getuid():
            switch = {"user": pw.pw_uid, "group": pw.pw_gid,
                      "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}
        return cmd, full_env, cwd, switch

    @staticmethod
    def _spawn_tty(cmd: Any, shell: bool, env: dict[str, str], cwd: str | None, rows: int,
                   cols: int, switch: dict[str, Any]
                   ) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
        """The command on a new pseudo-terminal, as the leader of a new session whose
        controlling terminal it is (job control, Ctrl-C, SIGWINCH work as at a console)."""
        import fcntl
        import termios  # imported here, not in the child: importing after fork can deadlock

        ensure_devpts()
        master, slave = os.openpty()
        try:
            set_winsize(master, rows, cols)
            if "user" in switch:
                os.fchown(slave, switch["user"], -1)

            def take_terminal() -> None:  # in the child, after setsid()
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                # A terminal's command gets Ctrl-C and Ctrl-\ whatever the agent inherited
                # (ignored ones survive exec(): a shell started it in the background).
                for sig in (signal.SIGINT, signal.SIGQUIT):
                    signal.signal(sig, signal.SIG_DFL)

            proc = subprocess.Popen(cmd, shell=shell, cwd=cwd, env=env, stdin=slave,
                                    stdout=slave, stderr=slave, start_new_session=True,
                                    preexec_fn=take_terminal, **switch)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return proc, master

    def call_exec(self, mid: Any, argv: list[str] | None = None, shell: bool = False,
                  env: dict[str, str] | None = None, cwd: str | None = None,
                  stdin: str | None = None, timeout: float | None = None,
                  stream: bool = True, tty: bool = False, rows: int = 24, cols: int = 80,
                  term: str | None = None, interactive: bool = False, login: bool = False,
                  user: str | int | None = None) -> dict[str, Any]:
        cmd, full_env, cwd, switch = self._command(list(argv or []), shell, env, cwd, tty, term,
                                                   login, user)
        if login:
            shell = False
        started = time.monotonic()
        collected: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

        def emit(name: str, chunk: bytes) -> None:
            if stream:
                self.send({"id": mid, "stream": name, "data": base64.b64encode(chunk).decode()})
            else:
                collected[name].append(chunk)

        def pump(name: str, pipe: Any) -> None:
            while True:
                chunk = pipe.read1(CHUNK) if hasattr(pipe, "read1") else pipe.read(CHUNK)
                if not chunk:
                    break
                emit(name, chunk)

        session: Session | None = None
        if tty or interactive:
            session = self.sessions.get(mid)
            if session is None:  # called directly rather than through handle()
                session = self.sessions[mid] = Session(self, tty, rows, cols)
        try:
            if tty:
                proc, master = self._spawn_tty(cmd, shell, full_env, cwd, rows, cols, switch)
            else:
                piped = interactive or stdin is not None
                proc = subprocess.Popen(cmd, shell=shell, cwd=cwd, env=full_env,
                                        stdin=subprocess.PIPE if piped else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True, **switch)
        except BaseException:
            if session is not None:
                self.sessions.pop(mid, None)
            raise
        if tty:
            assert session is not None
            session.start(proc, master)
            pumps = [threading.Thread(target=session.pump_terminal, args=(emit,), daemon=True)]
        else:
            if session is not None:
                assert proc.stdin is not None
                # The session owns its own descriptor: the file object's would be closed
                # again whenever it is collected, perhaps after the number was reused.
                fd = os.dup(proc.stdin.fileno())
                proc.stdin.close()
                session.start(proc, fd)
            pumps = [threading.Thread(target=pump, args=(n, p), daemon=True)
                     for n, p in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        try:
            for t in pumps:
                t.start()
            if stdin is not None and session is None:
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(base64.b64decode(stdin))
                    proc.stdin.close()
                except OSError:
                    pass
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except OSError:
                        pass
                    try:
                        proc.wait(timeout=2)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            if session is not None:
                session.exited.set()
            for t in pumps:
                t.join(timeout=5)
        finally:
            if session is not None:
                self.sessions.pop(mid, None)
                session.finish()
        rc = proc.returncode
        result: dict[str, Any] = {
            "exit_code": rc if rc is not None and rc >= 0 else None,
            "signal": -rc if rc is not None and rc < 0 else None,
            "timed_out": timed_out, "duration": time.monotonic() - started}
        if not stream:
            result["stdout"] = base64.b64encode(b"".join(collected["stdout"])).decode()
            result["stderr"] = base64.b64encode(b"".join(collected["stderr"])).decode()
        return result

    def _session(self, exec_id: Any) -> Session:
        session = self.sessions.get(exec_id)
        if session is None:
            raise NoSession(f"no running interactive exec with call id {exec_id!r}")
        return session

    def call_input(self, mid: Any, exec: Any, data: str = "", eof: bool = False) -> object:
        """Bytes for a running exec's stdin; answered by the writer once written."""
        self._session(exec).feed(mid, base64.b64decode(data) if data else b"", bool(eof))
        return DEFERRED

    def call_resize(self, mid: Any, exec: Any, rows: int, cols: int) -> dict[str, Any]:
        self._session(exec).resize(rows, cols)
        return {"rows": rows, "cols": cols}

    def call_signal(self, mid: Any, exec: Any, signum: int | str) -> dict[str, Any]:
        if isinstance(signum, str):
            name = signum.upper()
            signum = int(getattr(signal, name if name.startswith("SIG") else "SIG" + name))
        self._session(exec).signal(int(signum))
        return {"signal": int(signum)}

    def call_boot_timing(self, mid: Any) -> dict[str, Any]:
        """Raw boot timing data, parsed on the host (vmforge.node.timeline): the kernel log,
        systemd's boot timestamps, cloud-init's status and log events, and this agent's start;
        ``uptime`` and ``time`` are read together last (the guest's clocks side by side)."""
        data: dict[str, Any] = {
            "boot_id": boot_id(), "agent_started": self.started_uptime,
            "agent_exec": process_started(), "kmsg": read_kmsg(),
            "systemd": systemd_timestamps(), "cloud_init": cloud_init_timing()}
        data["uptime"] = uptime()
        data["time"] = time.time()
        return data

    @staticmethod
    def _abs(path: str) -> str:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"path must be absolute: {path!r}")
        return os.path.normpath(path)

    def call_put_begin(self, mid: Any, path: str, size: int, sha256: str,
                       mode: int | None = None, owner: str | None = None,
                       group: str | None = None, mkdirs: bool = True) -> dict[str, Any]:
        path = self._abs(path)
        parent = os.path.dirname(path)
        if mkdirs:
            os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.vmforge-{os.getpid()}")
        handle = f"{mid}-{time.monotonic()}"
        up: dict[str, Any] = {"path": path, "tmp": tmp, "file": open(tmp, "wb"),
                              "hash": hashlib.sha256(), "size": size, "sha256": sha256,
                              "mode": mode, "owner": owner, "group": group, "written": 0,
                              "queue": queue.Queue(maxsize=8), "error": None}
        # Hashing and writing run on their own thread (both release the GIL), overlapping
        # with the reader's JSON and base64 decoding of the next chunk.
        up["worker"] = threading.Thread(target=self._sink, args=(up,), daemon=True)
        up["worker"].start()
        self.uploads[handle] = up
        return {"handle": handle}

    @staticmethod
    def _sink(up: dict[str, Any]) -> None:
        while True:
            raw = up["queue"].get()
            if raw is None:
                return
            try:
                up["hash"].update(raw)
                up["file"].write(raw)
            except OSError as exc:
                up["error"] = exc

    def call_put_chunk(self, mid: Any, handle: str, data: str) -> dict[str, Any]:
        up = self.uploads.get(handle)
        if up is None:
            raise ValueError("unknown or expired upload handle")
        raw = base64.b64decode(data)
        up["queue"].put(raw)
        up["written"] += len(raw)
        return {"written": up["written"]}

    def call_put_end(self, mid: Any, handle: str) -> dict[str, Any]:
        up = self.uploads.pop(handle, None)
        if up is None:
            raise ValueError("unknown or expired upload handle")
        up["queue"].put(None)
        up["worker"].join()
        f = up["file"]
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if up["error"] is not None:
            os.unlink(up["tmp"])
            raise up["error"]
        digest = up["hash"].hexdigest()
        if digest != up["sha256"] or up["written"] != up["size"]:
            os.unlink(up["tmp"])
            raise ValueError(f"checksum mismatch: got {digest} ({up['written']} bytes), "
                             f"expected {up['sha256']} ({up['size']} bytes)")
        if up["mode"] is not None:
            os.chmod(up["tmp"], int(up["mode"]))
        if up["owner"] or up["group"]:
            import grp
            import pwd
            uid = pwd.getpwnam(up["owner"]).pw_uid if up["owner"] else -1
            gid = grp.getgrnam(up["group"]).gr_gid if up["group"] else -1
            os.chown(up["tmp"], uid, gid)
        os.replace(up["tmp"], up["path"])
        return {"path": up["path"], "size": up["written"], "sha256": digest}

    def call_get_file(self, mid: Any, path: str) -> dict[str, Any]:
        path = self._abs(path)
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                size += len(chunk)
                self.send({"id": mid, "stream": "data",
                           "data": base64.b64encode(chunk).decode()})
        return {"path": path, "size": size, "sha256": h.hexdigest(), "mode": st.st_mode & 0o7777}

    def call_list_tree(self, mid: Any, path: str) -> dict[str, Any]:
        root = self._abs(path)
        if not os.path.isdir(root):
            return {"root": root, "is_dir": False, "entries": []}
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for d in sorted(dirnames):
                p = os.path.join(dirpath, d)
                entries.append({"path": os.path.normpath(os.path.join(rel, d)), "type": "dir",
                                "mode": os.stat(p).st_mode & 0o7777})
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                entries.append({"path": os.path.normpath(os.path.join(rel, name)),
                                "type": "file", "mode": os.stat(p).st_mode & 0o7777})
        return {"root": root, "is_dir": True, "entries": entries}

    def call_mount(self, mid: Any, mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not isinstance(mounts, list) or not all(isinstance(m, dict) for m in mounts):
            raise TypeError("mounts must be a list of {tag, target, readonly}")
        return mount_shares(mounts)

    def call_mkdir(self, mid: Any, path: str, mode: int = 0o755) -> dict[str, Any]:
        path = self._abs(path)
        os.makedirs(path, mode=mode, exist_ok=True)
        return {"path": path}

    def _power(self, action: str) -> None:
        time.sleep(0.3)  # let the reply reach the host first
        os.sync()
        if os.path.isdir("/run/systemd/system"):
            subprocess.call(["systemctl", action])
        else:
            subprocess.call([action, "-f"])

    def call_shutdown(self, mid: Any) -> dict[str, Any]:
        threading.Thread(target=self._power, args=("poweroff",), daemon=True).start()
        return {"accepted": True}

    def call_reboot(self, mid: Any) -> dict[str, Any]:
        threading.Thread(target=self._power, args=("reboot",), daemon=True).start()
        return {"accepted": True}

    def call_identity(self, mid: Any, **args: Any) -> dict[str, Any]:
        return refresh_identity(**args)


# ---------------------------------------------------------------------------- identity
# After a restore from a memory snapshot every clone wakes up as the VM that was saved: the
# host's ``identity`` call makes what must be unique unique again. What cannot be refreshed
# here (keys and random state held by running programs, the kernel command line, boot_id,
# SSH host keys) is listed in docs/snapshots.md.

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207      # _IO('R', 0x07)


def _write_file(path: str, text: str, mode: int = 0o644) -> None:
    tmp = path + ".vmforge-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def set_hostname(name: str) -> None:
    old = socket.gethostname()
    socket.sethostname(name)
    if os.path.exists("/etc/hostname"):
        _write_file("/etc/hostname", name + "\n")
    hosts = read_text("/etc/hosts")
    if hosts and old and old != name and old != "localhost":
        lines = [" ".join(name if w == old else w for w in line.split())
                 if not line.lstrip().startswith("#") and old in line.split() else line
                 for line in hosts.splitlines()]
        _write_file("/etc/hosts", "\n".join(lines) + "\n")


def set_machine_id(machine_id: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{32}", machine_id):
        raise ValueError(f"not a machine id: {machine_id!r}")
    _write_file("/etc/machine-id", machine_id + "\n", 0o444)
    dbus = "/var/lib/dbus/machine-id"
    if os.path.isfile(dbus) and not os.path.islink(dbus):
        _write_file(dbus, machine_id + "\n", 0o444)


def add_entropy(data: bytes) -> bool:
    """Mix ``data`` into the kernel's pool, credited (RNDADDENTROPY) where allowed, and
    reseed the CRNG now; True if credited."""
    import fcntl
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            credited = True
        except OSError:
            os.write(fd, data)
            credited = False
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError:
            pass
    finally:
        os.close(fd)
    return credited


def _procs(word: str) -> list[tuple[int, list[str]]]:
    out = []
    for d in glob.glob("/proc/[0-9]*/cmdline"):
        args = read_text(d).split("\0")
        if (args and os.path.basename(args[0]) == word) or \
                (args[:1] == ["busybox"] and args[1:2] == [word]):
            out.append((int(d.split("/")[2]), args))
    return out


def renew_dhcp(iface: str) -> str:
    """Ask the interface's DHCP client for a new lease (its MAC changed): udhcpc, dhclient
    or systemd-networkd; which one answered, or "none"."""
    for pid, args in _procs("udhcpc"):
        if iface in args:
            os.kill(pid, signal.SIGUSR2)  # release the old lease, then ask again
            time.sleep(0.05)
            os.kill(pid, signal.SIGUSR1)
            return "udhcpc"
    for _pid, args in _procs("dhclient"):
        if iface in args or len(args) <= 2:
            subprocess.call(["dhclient", "-r", iface], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
            subprocess.call(["dhclient", "-nw", iface], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
            return "dhclient"
    if os.path.isdir("/run/systemd/netif") and subprocess.call(
            ["networkctl", "renew", iface], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL) == 0:
        return "systemd-networkd"
    return "none"


def set_mac(old: str, new: str) -> str | None:
    """Give the interface with MAC ``old`` the MAC ``new``; its name, or None."""
    for dev in glob.glob("/sys/class/net/*/address"):
        if read_text(dev).strip().lower() == old.lower():
            iface = dev.split("/")[4]
            for argv in (["ip", "link", "set", "dev", iface, "down"],
                         ["ip", "link", "set", "dev", iface, "address", new],
                         ["ip", "link", "set", "dev", iface, "up"]):
                if subprocess.call(argv, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) != 0:
                    raise OSError(f"{' '.join(argv)} failed")
            return iface
    return None


def refresh_identity(name: str | None = None, hostname: str | None = None,
                     machine_id: str | None = None, entropy: str | None = None,
                     time_ns: int | None = None,
                     nics: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Make this guest a new VM: each part is tried, and reported as done or why not."""
    done: list[str] = []
    failed: dict[str, str] = {}

    def step(what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            result = fn()
        except Exception as exc:  # reported to the host, the other parts still run
            failed[what] = str(exc) or type(exc).__name__
            return False, None
        done.append(what)
        return True, result
    clock_offset = None
    if time_ns is not None:  # first: the rest may log with timestamps
        before = time.time_ns()
        if step("clock", lambda: time.clock_settime_ns(time.CLOCK_REALTIME, time_ns))[0]:
            clock_offset = (time_ns - before) / 1e9
    if entropy is not None:
        ok, credited = step("random", lambda: add_entropy(base64.b64decode(entropy)))
        if ok and not credited:
            failed["random-credit"] = "RNDADDENTROPY refused: mixed in without credit"
    if name is not None:
        def write_id() -> None:
            os.makedirs(os.path.dirname(IDENTITY_FILE), exist_ok=True)
            _write_file(IDENTITY_FILE, name + "\n")
        step("name", write_id)
    if hostname is not None:
        step("hostname", lambda: set_hostname(hostname))
    if machine_id is not None:
        step("machine-id", lambda: set_machine_id(machine_id))
    for nic in nics or []:
        old, new = str(nic.get("old_mac", "")), str(nic.get("mac", ""))
        if old.lower() == new.lower():
            continue

        def change(o: str = old, n: str = new) -> str | None:
            return set_mac(o, n)
        iface = step(f"nic {new}", change)[1]
        if iface and nic.get("dhcp"):
            def renew(i: str = iface) -> str:
                return renew_dhcp(i)
            step(f"dhcp {iface}", renew)
    return {"refreshed": done, "failed": failed, "clock_offset": clock_offset,
            "vm_id": vm_id(), "hostname": socket.gethostname()}


# ---------------------------------------------------------------------------- transports

def find_port(name: str = PORT_NAME) -> str | None:
    link = "/dev/virtio-ports/" + name
    if os.path.exists(link):
        return link
    for path in glob.glob("/sys/class/virtio-ports/*/name"):
        if read_text(path).strip() == name:
            dev = "/dev/" + os.path.basename(os.path.dirname(path))
            if os.path.exists(dev):
                return dev
    return None


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def serve_virtio(path: str, started: float) -> None:
    fd = os.open(path, os.O_RDWR)
    agent = Agent(lambda data: write_all(fd, data), started)
    decoder = Decoder()
    agent.hello()  # blocks until the host side is connected
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            # The host closed its end. Reads return EOF until it reconnects; the hello write
            # blocks until then, so this is no busy loop, and every host gets a fresh hello.
            agent.disconnected()
            decoder = Decoder()
            agent.hello()
            continue
        for msg in decoder.feed(data):
            agent.handle(msg)


def serve_stream(conn: socket.socket, started: float) -> None:
    """One host connection on a stream socket (vsock): its own Agent, so its own uploads."""
    agent = Agent(conn.sendall, started)
    decoder = Decoder()
    try:
        agent.hello()
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            for msg in decoder.feed(data):
                agent.handle(msg)
    except OSError:
        pass
    finally:
        agent.disconnected()
        conn.close()


def serve_listener(srv: socket.socket, started: float) -> None:
    """Accept host connections and serve each on its own thread: unlike a virtio-serial
    port, vsock carries any number of connections, and one host's long exec must not hold
    up the others."""
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve_stream, args=(conn, started), daemon=True).start()


def serve_vsock(port: int, started: float) -> None:
    srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    srv.bind((socket.VMADDR_CID_ANY, port))
    srv.listen(128)
    serve_listener(srv, started)


def main() -> int:
    started = uptime()
    # A write to a pipe or socket whose reader is gone must be an error, not the agent's
    # death (commands get the default disposition back: Popen restores signals).
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Started as a background job of a shell (the minimal image's rc.boot), the agent inherits
    # SIGINT and SIGQUIT ignored, and so would every command it runs: Ctrl-C on a terminal
    # would not interrupt them. Handled signals are reset by exec(); ignored ones are not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    boot_mounts()  # before the hello: a hello of this boot means they are mounted
    deadline = time.monotonic() + 60
    while True:
        port = find_port()
        if port:
            serve_virtio(port, started)
        if os.path.exists("/dev/vsock") and hasattr(socket, "AF_VSOCK"):
            serve_vsock(VSOCK_PORT, started)
        if time.monotonic() > deadline:
            sys.stderr.write(f"vmforge-agent: no virtio-serial port {PORT_NAME} and no vsock\n")
            return 1
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
