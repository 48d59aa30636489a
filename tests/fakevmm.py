"""Stand-ins for the Cloud Hypervisor and Firecracker binaries, which cannot run here (neither is
installed, and KVM does not boot guests on this machine). They are NOT the VMMs: they boot
nothing. They serve the subset of each VMM's HTTP API that vmforge's drivers use, on the unix
socket the real binary would use, validate every request against the VMM's own API document
(``tests/oracle.py``, strict), and refuse what the real VMM refuses: unknown paths and fields,
calls in the wrong state (``vm.boot`` before ``vm.create``, pre-boot configuration after
``InstanceStart``, a snapshot of a running VM, a load into a configured Firecracker), files
that do not exist, a vsock socket path that is taken.

"Booting" writes a few lines to the serial file, opens the disk files (as the VMMs do, so
``/proc/PID/fd`` shows which file each disk is) and binds the hybrid-vsock socket; a host that
writes ``CONNECT 1024`` there is bridged to a real in-process instance of the guest agent
(``vmforge.agent.guest``), as the guest's vsock listener would be. The power button makes the
"guest" power off and the process exit, as both VMMs do.

That agent runs on the host, not in a guest, so its calls that act on the machine are
replaced in the stand-in process (``_contain_agent``): ``shutdown``/``reboot`` make the
"guest" power off (the VMM exits) instead of running ``poweroff``; ``identity`` records what
it was asked in the run directory (``stand-in-identity.json``) and reports it done, instead of
setting the host's clock, hostname and machine-id. ``exec`` still runs commands here.

Run as a process through a shim named like the binary (``write_shim``), with the binary's own
command line: ``cloud-hypervisor --api-socket path=P`` / ``firecracker --api-sock P --id N``.
Each request is appended to a journal (JSON lines: method, path, body, status) for the tests.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingMixIn, UnixStreamServer
from typing import Any
from urllib.parse import unquote, urlsplit

if __package__ in (None, ""):  # run as a script by a shim
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.oracle import Oracle  # noqa: E402

Reply = tuple[int, Any]
AGENT_PORT = 1024


class _Server(ThreadingMixIn, UnixStreamServer):
    daemon_threads = True


class FakeVmm:
    """The shared machinery: HTTP on a unix socket, oracle validation, journal, vsock bridge,
    exit. Subclasses implement the operations (``op``)."""

    oracle_name = ""

    def __init__(self, api_socket: str, *, journal: str | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.api_socket = api_socket
        self.journal = journal
        self.options = options or {}
        self.oracle = Oracle(self.oracle_name)
        self.lock = threading.RLock()
        self.exited = threading.Event()
        self.started = time.monotonic()
        self.vsock_listener: socket.socket | None = None
        self.server = _Server(api_socket, self._handler())

    # -- HTTP
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body = fake.dispatch(self.command, self.path, raw)
                data = b"" if body is None else (body if isinstance(body, bytes)
                                                 else json.dumps(body).encode())
                try:
                    self.send_response(status)
                    if data:
                        self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if data:  # no empty write: the client may have read it all and gone
                        self.wfile.write(data)
                    self.wfile.flush()
                finally:
                    if fake.exited.is_set():
                        threading.Thread(target=fake.server.shutdown, daemon=True).start()

            do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _any

        return Handler

    def dispatch(self, method: str, raw_path: str, raw: bytes) -> Reply:
        path = urlsplit(raw_path).path
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as exc:
                return self._log(method, path, None, self.error(400, f"bad JSON: {exc}"))
        with self.lock:
            op = self.oracle.operation(method, path)
            if f"{method} {path}" in self.options.get("refuse", ()):  # failure injection
                return self._log(method, path, body, self.error(
                    500, f"the stand-in was told to refuse {method} {path}"))
            if op is None:
                reply = self.not_found(method, path)
            else:
                errs = self.oracle.errors(method, path, body)
                if errs:
                    reply = self.error(400, "; ".join(errs))
                else:
                    params = {k: unquote(v) for k, v in op.params.items()}
                    reply = self.op(method, op.template, params, body)
        return self._log(method, path, body, reply)

    def _log(self, method: str, path: str, body: Any, reply: Reply) -> Reply:
        if self.journal:
            with open(self.journal, "a") as f:
                f.write(json.dumps({"method": method, "path": path, "body": body,
                                    "status": reply[0]}) + "\n")
        return reply

    def error(self, status: int, message: str) -> Reply:
        raise NotImplementedError

    def not_found(self, method: str, path: str) -> Reply:
        raise NotImplementedError

    def op(self, method: str, template: str, params: dict[str, str], body: Any) -> Reply:
        raise NotImplementedError

    # -- the "guest"
    def console(self, path: str | None, text: str) -> None:
        if path:
            with open(path, "a") as f:
                f.write(text)

    def bind_vsock(self, path: str) -> str | None:
        """Bind the hybrid-vsock socket as the VMM does at boot; an error text if taken."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            srv.bind(path)
        except OSError as exc:
            srv.close()
            return f"vsock socket {path}: {exc.strerror}"
        srv.listen(16)
        self.vsock_listener = srv
        threading.Thread(target=self._vsock_accept, args=(srv,), daemon=True).start()
        return None

    def _vsock_accept(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._vsock_conn, args=(conn,), daemon=True).start()

    def _vsock_conn(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            chunk = conn.recv(1)
            if not chunk:
                conn.close()
                return
            line += chunk
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit() \
                or int(words[1]) != AGENT_PORT or self.options.get("no_agent"):
            conn.close()  # nothing listens on that guest port: the VMM drops the connection
            return
        conn.sendall(b"OK 1073741824\n")
        from vmforge.agent import guest
        self._contain_agent(guest)
        guest.serve_stream(conn, self.started)

    def _contain_agent(self, guest: Any) -> None:
        """Keep the in-process guest agent off the host (see the module docstring)."""
        if getattr(guest, "_stand_in", None) is self:
            return
        run_dir = Path(self.api_socket).parent
        fake = self
        guest.IDENTITY_FILE = str(run_dir / "stand-in-id")

        def identity(name: str | None = None, hostname: str | None = None,
                     machine_id: str | None = None, entropy: str | None = None,
                     time_ns: int | None = None,
                     nics: list[dict[str, Any]] | None = None) -> dict[str, Any]:
            asked = {"name": name, "hostname": hostname, "machine_id": machine_id,
                     "entropy": bool(entropy), "time_ns": time_ns, "nics": nics or []}
            (run_dir / "stand-in-identity.json").write_text(json.dumps(asked))
            if name:
                Path(guest.IDENTITY_FILE).write_text(name + "\n")
            done = [k for k, v in (("clock", time_ns), ("random", entropy), ("name", name),
                                   ("hostname", hostname), ("machine-id", machine_id))
                    if v is not None]
            return {"refreshed": done, "failed": {}, "clock_offset": 0.0,
                    "vm_id": guest.vm_id(), "hostname": hostname or "stand-in",
                    "stand_in": "nothing on the host was changed"}

        def power(agent: Any, action: str) -> None:
            fake.guest_exit(fake.serial_file(), "reboot: Power down" if action == "poweroff"
                            else "reboot: Restarting system")
        guest.refresh_identity = identity
        guest.Agent._power = power
        guest._stand_in = self

    def serial_file(self) -> str | None:
        """Where the "guest" console goes (subclasses know their configuration)."""
        return None

    # -- disk files, held open as the VMM holds them
    def open_disks(self, paths: dict[str, str]) -> str | None:
        """Open each disk file (id -> path), closing those held before; an error text if one
        cannot be opened (nothing is held then)."""
        files = {}
        for disk_id, path in paths.items():
            try:
                files[disk_id] = open(path, "rb")  # noqa: SIM115 (held while the VM runs)
            except OSError as exc:
                for f in files.values():
                    f.close()
                return f"{path}: {exc.strerror}"
        self.close_disks()
        self.disk_files = files
        return None

    def close_disks(self, only: str | None = None) -> None:
        for disk_id in list(getattr(self, "disk_files", {})):
            if only is None or disk_id == only:
                self.disk_files.pop(disk_id).close()

    def guest_exit(self, console: str | None, last_words: str) -> None:
        """The guest powered off (or rebooted under ``reboot=k``): the VMM process exits."""
        def later() -> None:
            time.sleep(0.05)
            self.console(console, last_words + "\n")
            self.exit()
        threading.Thread(target=later, daemon=True).start()

    def exit(self, after_reply: bool = False) -> None:
        """End the process: at once, or (a call that ends it) once its answer is written."""
        self.exited.set()
        if self.vsock_listener is not None:
            self.vsock_listener.close()
        if not after_reply:
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    def serve(self) -> int:
        self.server.serve_forever(poll_interval=0.05)
        return 0


def _missing(paths: dict[str, str | None]) -> str | None:
    for what, p in paths.items():
        if p and not Path(p).exists():
            return f"{what} {p}: No such file or directory"
    return None


def _qcow2_backing(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return head[:4] == b"QFI\xfb" and int.from_bytes(head[8:16], "big") != 0


class FakeCloudHypervisor(FakeVmm):
    """A stand-in for the ``cloud-hypervisor`` binary (which cannot run here): its HTTP API on
    ``--api-socket``, checked against Cloud Hypervisor's own OpenAPI document."""

    oracle_name = "cloud-hypervisor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state: str | None = None  # None: no VM; else VmState
        self.config: dict[str, Any] | None = None

    def error(self, status: int, message: str) -> Reply:
        return status, message.encode()  # Cloud Hypervisor answers errors as text

    def not_found(self, method: str, path: str) -> Reply:
        return 404, b""

    def op(self, method: str, template: str, params: dict[str, str], body: Any) -> Reply:
        name = template.lstrip("/")
        handler: Callable[[Any], Reply] | None = getattr(
            self, "op_" + name.replace(".", "_").replace("-", "_"), None)
        if handler is None:
            return self.error(500, f"the stand-in does not implement {name}")
        return handler(body)

    def _need(self, *states: str) -> Reply | None:
        if self.state is None:
            return self.error(404, "VM is not created")
        if self.state not in states:
            return self.error(405, f"VM is {self.state}")
        return None

    def op_vmm_ping(self, body: Any) -> Reply:
        reply = {"version": "53.0-stand-in", "build_version": "stand-in", "pid": os.getpid(),
                 "features": []}
        assert not self.oracle.body_errors("VmmPingResponse", reply)
        return 200, reply

    def op_vm_create(self, body: dict[str, Any]) -> Reply:
        if self.state is not None:
            return self.error(500, "VM is already created")
        payload = body["payload"]
        if not payload.get("kernel") and not payload.get("firmware"):
            return self.error(400, "payload: a kernel or a firmware is needed")
        if payload.get("kernel") and payload.get("firmware"):
            return self.error(400, "payload: kernel and firmware are mutually exclusive")
        self.config, self.state = body, "Created"
        return 204, None

    def op_vm_boot(self, body: Any) -> Reply:
        if (refused := self._need("Created")) is not None:
            return refused
        assert self.config is not None
        cfg = self.config
        payload = cfg["payload"]
        files: dict[str, str | None] = {"kernel": payload.get("kernel"),
                                        "initramfs": payload.get("initramfs"),
                                        "firmware": payload.get("firmware")}
        for i, d in enumerate(cfg.get("disks", [])):
            files[f"disk {i}"] = d.get("path")
        if (missing := _missing(files)) is not None:
            return self.error(500, f"Error booting VM: {missing}")
        for d in cfg.get("disks", []):
            if d.get("image_type") == "Qcow2" and _qcow2_backing(d["path"]) and \
                    not d.get("backing_files"):
                return self.error(500, f"Error booting VM: {d['path']}: backing files are "
                                       "not enabled")
        for n in cfg.get("net", []):
            if not Path(f"/sys/class/net/{n.get('tap')}").exists():
                return self.error(500, f"Error booting VM: tap {n.get('tap')}: not found")
        serial = cfg.get("serial", {})
        console = serial.get("file") if serial.get("mode") == "File" else None
        if (err := self.open_disks({d.get("id") or f"_disk{i}": d["path"]
                                    for i, d in enumerate(cfg.get("disks", []))})):
            return self.error(500, f"Error booting VM: {err}")
        if "vsock" in cfg and (err := self.bind_vsock(cfg["vsock"]["socket"])) is not None:
            return self.error(500, f"Error booting VM: {err}")
        self.console(console, "Linux version 6.1.0 (stand-in: nothing boots here)\n")
        self.state = "Running"
        return 204, None

    def op_vm_info(self, body: Any) -> Reply:
        if self.state is None:
            return self.error(500, "VM is not created")
        return 200, {"config": self.config, "state": self.state}

    def op_vm_power_button(self, body: Any) -> Reply:
        if (refused := self._need("Running")) is not None:
            return refused
        if not self.options.get("ignore_power_button"):
            assert self.config is not None
            self.guest_exit(self.config.get("serial", {}).get("file"), "reboot: Power down")
        return 204, None

    def op_vm_shutdown(self, body: Any) -> Reply:
        if (refused := self._need("Running", "Paused")) is not None:
            return refused
        self.state = "Shutdown"
        if self.vsock_listener is not None:
            self.vsock_listener.close()
            self.vsock_listener = None
        return 204, None

    def op_vmm_shutdown(self, body: Any) -> Reply:
        self.exit(after_reply=True)
        return 204, None

    def op_vm_pause(self, body: Any) -> Reply:
        if (refused := self._need("Running")) is not None:
            return refused
        self.state = "Paused"
        return 204, None

    def op_vm_resume(self, body: Any) -> Reply:
        if (refused := self._need("Paused")) is not None:
            return refused
        self.state = "Running"
        return 204, None

    def op_vm_snapshot(self, body: dict[str, Any]) -> Reply:
        if (refused := self._need("Paused")) is not None:
            return refused
        url = urlsplit(body.get("destination_url", ""))
        if url.scheme != "file" or not Path(url.path).is_dir():
            return self.error(500, f"bad destination {body.get('destination_url')!r}")
        Path(url.path, "config.json").write_text(json.dumps(self.config))
        Path(url.path, "state.json").write_text(json.dumps({"stand-in": True}))
        Path(url.path, "memory-ranges").write_bytes(b"\0" * 4096)
        return 204, None

    def op_vm_restore(self, body: dict[str, Any]) -> Reply:
        if self.state is not None:
            return self.error(404, "VM is already created")
        url = urlsplit(body["source_url"])
        cfg_file = Path(url.path, "config.json")
        if url.scheme != "file" or not cfg_file.is_file():
            return self.error(500, f"no snapshot at {body['source_url']!r}")
        config = json.loads(cfg_file.read_text())
        if (err := self.open_disks({d.get("id") or f"_disk{i}": d["path"]
                                    for i, d in enumerate(config.get("disks", []))})):
            return self.error(500, f"Error restoring VM: {err}")
        self.config = config
        if "vsock" in self.config and \
                (err := self.bind_vsock(self.config["vsock"]["socket"])) is not None:
            self.close_disks()
            return self.error(500, f"Error restoring VM: {err}")
        self.state = "Running" if body.get("resume") else "Paused"
        return 204, None

    def op_vm_delete(self, body: Any) -> Reply:
        # The VM and its devices go (disks closed, the vsock listener closed; the socket file
        # stays, as Cloud Hypervisor leaves it); the VMM process stays for a new VM.
        self.state, self.config = None, None
        self.close_disks()
        if self.vsock_listener is not None:
            self.vsock_listener.close()
            self.vsock_listener = None
        return 204, None

    def serial_file(self) -> str | None:
        serial = (self.config or {}).get("serial", {})
        return serial.get("file") if serial.get("mode") == "File" else None


_PRE_BOOT = {"/logger", "/metrics", "/boot-source", "/machine-config", "/drives/{drive_id}",
             "/network-interfaces/{iface_id}", "/vsock", "/entropy", "/serial", "/mmds/config",
             "/cpu-config", "/balloon", "/pmem/{id}"}


class FakeFirecracker(FakeVmm):
    """A stand-in for the ``firecracker`` binary (which cannot run here): its HTTP API on
    ``--api-sock``, checked against Firecracker's own Swagger document."""

    oracle_name = "firecracker"

    def __init__(self, *args: Any, instance_id: str = "anonymous-instance",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.instance_id = instance_id
        self.state = "Not started"
        self.config: dict[str, Any] = {"drives": {}, "network-interfaces": {}}
        self.loaded = False

    def error(self, status: int, message: str) -> Reply:
        reply = {"fault_message": message}
        assert not self.oracle.body_errors("Error", reply)
        return status, reply

    def not_found(self, method: str, path: str) -> Reply:
        return self.error(400, "Invalid request method and/or path")

    def op(self, method: str, template: str, params: dict[str, str], body: Any) -> Reply:
        if method == "GET" and template == "/":
            reply = {"app_name": "Firecracker", "id": self.instance_id, "state": self.state,
                     "vmm_version": "1.16.1-stand-in"}
            assert not self.oracle.body_errors("InstanceInfo", reply)
            return 200, reply
        if method == "GET" and template == "/vm/config":
            return 200, self._full_config()
        if method == "PATCH" and template == "/drives/{drive_id}":
            return self._patch_drive(params["drive_id"], body)
        if method == "PUT" and template in _PRE_BOOT:
            return self._pre_boot(template, params, body)
        if method == "PUT" and template == "/actions":
            return self._action(body["action_type"])
        if method == "PATCH" and template == "/vm":
            if self.state == "Not started":
                return self.error(400, "The requested operation is not supported before "
                                       "starting the microVM.")
            self.state = "Paused" if body["state"] == "Paused" else "Running"
            return 204, None
        if method == "PUT" and template == "/snapshot/create":
            return self._snapshot_create(body)
        if method == "PUT" and template == "/snapshot/load":
            return self._snapshot_load(body)
        return self.error(400, f"the stand-in does not implement {method} {template}")

    def _pre_boot(self, template: str, params: dict[str, str], body: dict[str, Any]) -> Reply:
        if self.state != "Not started" or self.loaded:
            return self.error(400, "The requested operation is not supported after starting "
                                   "the microVM.")
        key = template.split("/")[1]
        if template == "/drives/{drive_id}":
            if body["drive_id"] != params["drive_id"]:
                return self.error(400, "The id from the path does not match the id from the "
                                       "body!")
            if (missing := _missing({"drive": body.get("path_on_host")})) is not None:
                return self.error(400, f"Unable to create the block device: {missing}")
            self.config["drives"][body["drive_id"]] = body
            return 204, None
        if template == "/network-interfaces/{iface_id}":
            if body["iface_id"] != params["iface_id"]:
                return self.error(400, "The id from the path does not match the id from the "
                                       "body!")
            if not Path(f"/sys/class/net/{body['host_dev_name']}").exists():
                return self.error(400, f"Open tap device failed: {body['host_dev_name']}")
            self.config["network-interfaces"][body["iface_id"]] = body
            return 204, None
        if template == "/boot-source":
            missing = _missing({"kernel": body["kernel_image_path"],
                                "initrd": body.get("initrd_path")})
            if missing is not None:
                return self.error(400, f"Cannot load kernel due to invalid memory "
                                       f"configuration or invalid kernel image: {missing}")
        if template == "/logger" and (missing := _missing({"log": body.get("log_path")})):
            return self.error(400, f"Logger error: {missing}")
        if template == "/machine-config" and body["vcpu_count"] > 1 and body.get("smt") \
                and body["vcpu_count"] % 2:
            return self.error(400, "The vCPU number is invalid! The vCPU number can only be 1 "
                                   "or an even number when SMT is enabled.")
        self.config[key] = body
        return 204, None

    def _action(self, action: str) -> Reply:
        if action == "InstanceStart":
            if self.state != "Not started" or self.loaded:
                return self.error(400, "The requested operation is not supported after "
                                       "starting the microVM.")
            if "boot-source" not in self.config:
                return self.error(400, "Cannot start microvm without kernel configuration.")
            if (err := self.open_disks({k: d["path_on_host"]
                                        for k, d in self.config["drives"].items()})):
                return self.error(400, f"Unable to create the block device: {err}")
            vsock = self.config.get("vsock")
            if vsock and (err := self.bind_vsock(vsock["uds_path"])) is not None:
                return self.error(400, f"Cannot create vsock device: {err}")
            self.console(self._serial(), "Linux version 6.1.0 (stand-in: nothing boots here)\n")
            self.state = "Running"
            return 204, None
        if action == "SendCtrlAltDel":
            if self.state != "Running":
                return self.error(400, "The requested operation is not supported before "
                                       "starting the microVM.")
            if not self.options.get("ignore_power_button"):
                self.guest_exit(self._serial(), "reboot: Restarting system")
            return 204, None
        return 204, None  # FlushMetrics

    def _serial(self) -> str | None:
        serial: dict[str, Any] = self.config.get("serial", {})
        return serial.get("serial_out_path")

    def serial_file(self) -> str | None:
        return self._serial()

    def _full_config(self) -> dict[str, Any]:
        """``GET /vm/config``: the configuration as FullVmConfiguration (lists, not maps)."""
        out = {k: v for k, v in self.config.items()
               if k in ("boot-source", "logger", "machine-config", "vsock", "entropy")}
        out["drives"] = list(self.config["drives"].values())
        out["network-interfaces"] = list(self.config["network-interfaces"].values())
        assert not self.oracle.body_errors("FullVmConfiguration", out), \
            self.oracle.body_errors("FullVmConfiguration", out)
        return out

    def _patch_drive(self, drive_id: str, body: dict[str, Any]) -> Reply:
        """Post-boot only (a loaded snapshot counts): Firecracker reopens the drive's file."""
        if self.state == "Not started" and not self.loaded:
            return self.error(400, "The requested operation is not supported before starting "
                                   "the microVM.")
        if body["drive_id"] != drive_id:
            return self.error(400, "The id from the path does not match the id from the body!")
        drive = self.config["drives"].get(drive_id)
        if drive is None:
            return self.error(400, f"Drive update error: Unable to patch the block device: "
                                   f"no drive with id {drive_id}")
        if "path_on_host" in body:
            held = {k: v.name for k, v in getattr(self, "disk_files", {}).items()}
            if (err := self.open_disks({**held, drive_id: body["path_on_host"]})):
                return self.error(400, f"Drive update error: {err}")
            self.config["drives"][drive_id] = {**drive, "path_on_host": body["path_on_host"]}
        return 204, None

    def _snapshot_create(self, body: dict[str, Any]) -> Reply:
        if self.state != "Paused":
            return self.error(400, "Create snapshot error: the microVM is not paused")
        for p in (body["snapshot_path"], body["mem_file_path"]):
            if not Path(p).parent.is_dir():
                return self.error(400, f"Create snapshot error: {p}: No such directory")
        Path(body["snapshot_path"]).write_text(json.dumps(self.config))
        Path(body["mem_file_path"]).write_bytes(b"\0" * 4096)
        return 204, None

    def _snapshot_load(self, body: dict[str, Any]) -> Reply:
        configured = set(self.config) - {"logger", "metrics", "drives", "network-interfaces"}
        if self.state != "Not started" or self.loaded or configured or \
                self.config["drives"] or self.config["network-interfaces"]:
            return self.error(400, "Loading a microVM snapshot not allowed after configuring "
                                   "boot-specific resources.")
        if ("mem_file_path" in body) == ("mem_backend" in body):
            return self.error(400, "Exactly one of mem_file_path and mem_backend is needed")
        mem = body.get("mem_file_path") or body["mem_backend"]["backend_path"]
        missing = _missing({"snapshot": body["snapshot_path"], "memory": mem})
        if missing is not None:
            return self.error(400, f"Load snapshot error: {missing}")
        logger = self.config.get("logger")
        config = json.loads(Path(body["snapshot_path"]).read_text())
        # The drives are opened again at the paths they had when the snapshot was taken, the
        # taps by name unless overridden (network_overrides), the vsock socket likewise.
        if (err := self.open_disks({k: d["path_on_host"]
                                    for k, d in config["drives"].items()})):
            return self.error(400, f"Load snapshot error: Cannot restore devices: block "
                                   f"device: {err}")
        for o in body.get("network_overrides") or []:
            iface = config["network-interfaces"].get(o["iface_id"])
            if iface is None:
                self.close_disks()
                return self.error(400, f"Load snapshot error: no network interface "
                                       f"{o['iface_id']} to override")
            iface["host_dev_name"] = o["host_dev_name"]
        for iface in config["network-interfaces"].values():
            if not Path(f"/sys/class/net/{iface['host_dev_name']}").exists():
                self.close_disks()
                return self.error(400, f"Load snapshot error: Open tap device failed: "
                                       f"{iface['host_dev_name']}")
        self.config = config
        if logger:
            self.config["logger"] = logger
        vsock = self.config.get("vsock")
        uds = (body.get("vsock_override") or {}).get("uds_path") or (vsock or {}).get("uds_path")
        if uds and (err := self.bind_vsock(uds)) is not None:
            self.close_disks()
            return self.error(400, f"Load snapshot error: {err}")
        if uds and vsock:
            vsock["uds_path"] = uds
        self.loaded = True
        self.state = "Running" if body.get("resume_vm") else "Paused"
        return 204, None


def main(binary: str, argv: list[str], *, journal: str | None = None,
         options: dict[str, Any] | None = None) -> int:
    """Parse the real binary's command line and serve until the "guest" or a call ends it."""
    if (options or {}).get("fail_at_start"):  # e.g. no KVM: the real VMMs exit at once
        print(f"Error: {binary} (stand-in): told to fail at start", file=sys.stderr)
        return 1
    fake: FakeVmm
    if binary == "cloud-hypervisor":
        value = argv[argv.index("--api-socket") + 1]
        path = value.split("path=", 1)[1].split(",")[0] if value.startswith("path=") else value
        fake = FakeCloudHypervisor(path, journal=journal, options=options)
    else:
        path = argv[argv.index("--api-sock") + 1]
        ident = argv[argv.index("--id") + 1] if "--id" in argv else "anonymous-instance"
        fake = FakeFirecracker(path, journal=journal, options=options, instance_id=ident)
    return fake.serve()


def write_shim(bin_dir: Path, binary: str, *, journal: Path,
               options: dict[str, Any] | None = None) -> Path:
    """An executable named like the real binary that runs the stand-in (test use)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / binary
    root = str(Path(__file__).resolve().parents[1])
    shim.write_text(
        f"#!{sys.executable}\n"
        "# Stand-in for a VMM binary that cannot run here: see tests/fakevmm.py\n"
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "from tests.fakevmm import main\n"
        f"sys.exit(main({binary!r}, sys.argv[1:], journal={str(journal)!r}, "
        f"options={options or {}!r}))\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return shim


def read_journal(journal: Path) -> list[dict[str, Any]]:
    if not journal.exists():
        return []
    return [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
