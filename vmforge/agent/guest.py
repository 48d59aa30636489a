#!/usr/bin/env python3
"""vmforge guest agent: one stdlib-only file (python3 >= 3.8) that runs inside the VM.

It talks to the host over the virtio-serial port ``org.vmforge.agent.0`` (or AF_VSOCK where
there is no such port) and listens on nothing else. Framing is RFC 7464 JSON text sequences:
every message is ``0x1E`` + compact JSON + ``0x0A``. RS never occurs inside compact JSON, so a
reader that lost its place (host reconnect mid-message) resynchronises at the next RS.

Messages: guest events ``{"event": "hello", "data": {...}}``; host calls
``{"id": N, "call": NAME, "args": {...}}``; guest stream chunks ``{"id": N, "stream": S,
"data": B64}``; and one final ``{"id": N, "result": ...}`` or ``{"id": N, "error": {...}}``.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

VERSION = "0.1.0"
PORT_NAME = "org.vmforge.agent.0"
VSOCK_PORT = 1024
RS = b"\x1e"
LF = b"\n"
MAX_RECORD = 8 * 1024 * 1024
CHUNK = 256 * 1024


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


def vm_id() -> str:
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


# ---------------------------------------------------------------------------- the agent

class Agent:
    def __init__(self, write: Callable[[bytes], None], started: float) -> None:
        self._write_raw = write
        self.lock = threading.Lock()
        self.started_uptime = started
        self.uploads: dict[str, dict[str, Any]] = {}
        self.procs: dict[int, subprocess.Popen] = {}  # type: ignore[type-arg]

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
                "python": sys.version.split()[0], "cloud_init": cloud_init_state()}

    def hello(self) -> None:
        self.send({"event": "hello", "data": self.hello_data()})

    def disconnected(self) -> None:
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
        inline = call in ("ping", "hello", "put_chunk", "put_begin")  # ordered and cheap
        if inline:
            self._run(fn, mid, args)
        else:
            threading.Thread(target=self._run, args=(fn, mid, args), daemon=True).start()

    def _run(self, fn: Callable[..., Any], mid: Any, args: dict[str, Any]) -> None:
        try:
            result = fn(mid, **args)
        except TypeError as exc:
            self.send({"id": mid, "error": {"kind": "bad_args", "message": str(exc)}})
        except Exception as exc:  # reported to the host, never fatal to the agent
            self.send({"id": mid, "error": {"kind": type(exc).__name__, "message": str(exc)}})
        else:
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

    def call_exec(self, mid: Any, argv: list[str], shell: bool = False,
                  env: dict[str, str] | None = None, cwd: str | None = None,
                  stdin: str | None = None, timeout: float | None = None,
                  stream: bool = True) -> dict[str, Any]:
        if not argv:
            raise ValueError("argv is empty")
        full_env = dict(os.environ)
        full_env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        if env:
            full_env.update(env)
        cmd: Any = " ".join(argv) if shell and len(argv) > 1 else (argv[0] if shell else argv)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, shell=shell, cwd=cwd, env=full_env,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        collected: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

        def pump(name: str, pipe: Any) -> None:
            while True:
                chunk = pipe.read1(CHUNK) if hasattr(pipe, "read1") else pipe.read(CHUNK)
                if not chunk:
                    break
                if stream:
                    self.send({"id": mid, "stream": name,
                               "data": base64.b64encode(chunk).decode()})
                else:
                    collected[name].append(chunk)

        pumps = [threading.Thread(target=pump, args=(n, p), daemon=True)
                 for n, p in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for t in pumps:
            t.start()
        if stdin is not None:
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
        for t in pumps:
            t.join(timeout=5)
        rc = proc.returncode
        result: dict[str, Any] = {
            "exit_code": rc if rc is not None and rc >= 0 else None,
            "signal": -rc if rc is not None and rc < 0 else None,
            "timed_out": timed_out, "duration": time.monotonic() - started}
        if not stream:
            result["stdout"] = base64.b64encode(b"".join(collected["stdout"])).decode()
            result["stderr"] = base64.b64encode(b"".join(collected["stderr"])).decode()
        return result

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
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
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
