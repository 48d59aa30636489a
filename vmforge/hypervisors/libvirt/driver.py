"""libvirt backend, I/O part, through libvirt's own Python binding (``libvirt-python``).

libvirt owns the domain: vmforge defines it persistently (``defineXML``) and starts it
(``create``); the VM outlives vmforge, and ``find``/``status`` read the truth back from libvirt.
The binding is imported here only, and only when a method needs it, so neither ``vmforge
--help`` nor ``vmforge doctor`` on a host without it pays for (or fails on) it.

Connection URI: the constructor's ``uri``, else ``$VMFORGE_LIBVIRT_URI``, else
``qemu:///system``. ``qemu:///session`` and remote URIs (``qemu+ssh://host/system``) are passed
to libvirt untouched; with a remote URI the plan's paths must exist on that host.

Ownership: the domain's name is the VM's name, and its ``<metadata>`` carries a ``vmforge:vm``
element with the VM directory. ``find``, ``start`` and ``cleanup`` touch only a domain whose
metadata names the same VM directory; a foreign domain of the same name is refused, never
redefined or destroyed.

File access (``qemu:///system`` on this host): QEMU runs as libvirt's unprivileged account
(``libvirt-qemu``, read from the host's DAC ``baselabel``, with no capabilities), and vmforge's
files are owner-only. Instead of letting libvirt chown them (``dynamic_ownership``, which leaves
shared library blobs owned by ``libvirt-qemu`` and depends on qemu.conf), the domain gets a
static DAC label for that account with ``relabel='no'`` and the driver grants the account
exactly what QEMU opens, through POSIX ACL entries (see :mod:`.access`): search on the
directories above, read on kernel/initrd/ISOs/backing files, read-write on the disks and the
NVRAM. The console log and the agent socket need nothing: libvirtd (root) opens the log and
creates the socket and hands QEMU the descriptors. With ``qemu:///session`` (QEMU runs as you)
or a remote URI (the files are on that host, under its own policy), nothing is granted and no
label is set. Limits: a non-root user on ``qemu:///system`` gets a root-owned agent socket it
cannot connect to (use ``qemu:///session``); SELinux hosts need svirt labels, not handled.

Timings measured here (2 vCPUs, TCG): define 2 ms, create 0.3-0.5 s, then the minimal image's
agent says hello 3-4 s later (UEFI: 9-12 s; the Debian cloud image: 61-68 s). ``last_timings``
keeps define/create of the last ``start``. If ``/dev/kvm`` is root-only (no udev), libvirt
re-probes QEMU on every call and a define takes about a minute: ``probe`` says so.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...errors import HostError, LaunchError, VmError, VmExists
from ...fsutil import tail_text
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
from . import access
from . import snapshot as snap
from .render import MACHINES, NS_VMFORGE, domain_xml, parse_owner

__all__ = ["LibvirtDriver", "DEFAULT_URI", "URI_ENV", "resolve_uri", "is_local", "is_system",
           "start_hint", "version_string"]

DEFAULT_URI = "qemu:///system"
URI_ENV = "VMFORGE_LIBVIRT_URI"

# virDomainState / virDomainShutoffReason / virDomainPausedReason values (stable ABI); kept
# here so that mapping states needs no import of the binding.
_NOSTATE, _RUNNING, _BLOCKED, _PAUSED, _SHUTDOWN, _SHUTOFF, _CRASHED, _PMSUSPENDED = range(8)
_OFF_UNKNOWN, _OFF_SHUTDOWN, _OFF_DESTROYED, _OFF_CRASHED = 0, 1, 2, 3
_OFF_FAILED, _OFF_DAEMON = 6, 8
_PAUSED_CRASHED = 10

#: Names of the overlays snapshots switched a running VM's disks to (node/snapshots.py).
TOP_GLOB = ".disk-*.top-*.qcow2"


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get(URI_ENV) or DEFAULT_URI


def is_local(uri: str) -> bool:
    """No host part, and no transport but the local unix socket."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return not parts.hostname and transport in ("", "unix")


def is_system(uri: str) -> bool:
    return is_local(uri) and urlsplit(uri).path.rstrip("/") == "/system"


def start_hint(uri: str) -> str:
    if not is_local(uri):
        return f"check that libvirtd runs on that host and answers `virsh -c {uri} version`"
    if not is_system(uri):
        return "libvirt's session daemon starts on demand: check `virsh -c " + uri + " version`"
    if os.path.isdir("/run/systemd/system"):
        return "systemctl start libvirtd virtlogd"
    return "start it (no systemd here): virtlogd -d && libvirtd -d"


def version_string(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def _map_state(state: int, reason: int) -> Liveness:
    if state == _SHUTOFF:
        if reason in (_OFF_CRASHED, _OFF_FAILED, _OFF_DAEMON):
            return Liveness.CRASHED
        if reason == _OFF_UNKNOWN:  # defined but never run, or libvirtd lost the record
            return Liveness.GONE
        return Liveness.POWERED_OFF  # the guest shut down; destroyed; saved; migrated
    if state == _CRASHED:
        return Liveness.CRASHED
    if state == _PAUSED:
        return Liveness.CRASHED if reason == _PAUSED_CRASHED else Liveness.PAUSED
    if state == _PMSUSPENDED:
        return Liveness.PAUSED
    return Liveness.RUNNING  # running, blocked, being shut down, no state yet


_binding: Any = None
_binding_lock = threading.Lock()


def _libvirt() -> Any:
    """The binding, imported on first use; its default handler (printing every error to
    stderr, even handled ones) is replaced by a silent one: errors arrive as exceptions."""
    global _binding
    with _binding_lock:
        if _binding is None:
            try:
                import libvirt
            except ImportError as exc:
                raise HostError("the libvirt Python binding (libvirt-python) is not installed",
                                hint="bash scripts/install-deps.sh, or `pip install "
                                     "libvirt-python` with libvirt-dev, pkg-config and gcc "
                                     "installed") from exc
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _binding = libvirt
    return _binding


def _message(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    return str(get() if get else exc) or type(exc).__name__


def _is_no_domain(exc: BaseException) -> bool:
    lv = _libvirt()
    return bool(getattr(exc, "get_error_code", lambda: None)() == lv.VIR_ERR_NO_DOMAIN)


def _same_dir(a: str | Path | None, b: str | Path) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


class LibvirtDriver(Driver):
    """``LibvirtDriver(uri=None)``: see the module docstring for the URI and file access."""

    backend = Backend.LIBVIRT

    def __init__(self, uri: str | None = None) -> None:
        self.uri = resolve_uri(uri)
        self._conns: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._label: str | None = None
        self.last_timings: dict[str, float] = {}

    # -- pure
    def capabilities(self) -> Capabilities:
        from ...spec import DiskFormat, Firmware
        return Capabilities(
            backend=Backend.LIBVIRT, machines=MACHINES, firmware=frozenset(Firmware),
            disk_formats=frozenset(DiskFormat), cdroms=True, needs_kvm=False,
            agent_transports=frozenset({"virtio-serial", "vsock"}),
            user_net_forwards=True,  # through <qemu:commandline> (see render)
            survives_vmforge=True, snapshots=True)

    def render(self, plan: MachinePlan, host: HostFacts) -> Rendered:
        return Rendered(domain_xml=domain_xml(plan, host, dac_label=self._render_label()))

    def _render_label(self) -> str | None:
        """The DAC label the domain will carry: the one libvirt reported if we are connected,
        else Debian's/Fedora's account name resolved here (``vmforge plan`` needs no daemon)."""
        if not is_system(self.uri):
            return None
        if self._label is not None:
            return self._label or None
        for name in ("libvirt-qemu", "qemu"):
            ids = access.parse_label(f"{name}:{name}")
            if ids is not None:
                return f"+{ids[0]}:+{ids[1]}"
        return None

    # -- connection
    def _conn(self, uri: str | None = None) -> Any:
        uri = uri or self.uri
        lv = _libvirt()
        with self._lock:
            conn = self._conns.get(uri)
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except lv.libvirtError:
                    pass
                self._conns.pop(uri, None)
            try:
                conn = lv.open(uri)
            except lv.libvirtError as exc:
                raise HostError(f"libvirt does not answer at {uri}: {_message(exc)}",
                                hint=start_hint(uri)) from exc
            self._conns[uri] = conn
            return conn

    def _uri_of(self, rt: Runtime | None) -> str:
        return str(rt.extra.get("uri") or self.uri) if rt is not None else self.uri

    def _qemu_principal(self, conn: Any, accel: Accel) -> access.Principal | None:
        """The account libvirt runs QEMU as (its DAC ``baselabel``), under qemu:///system."""
        if not is_system(self.uri):
            return None
        root = ET.fromstring(conn.getCapabilities())
        want = "kvm" if accel is Accel.KVM else "qemu"
        label = None
        for model in root.iter("secmodel"):
            if model.findtext("model") == "dac":
                for base in model.iter("baselabel"):
                    if base.get("type") == want or label is None:
                        label = base.text
        ids = access.parse_label(label or "")
        self._label = f"+{ids[0]}:+{ids[1]}" if ids else ""
        return access.principal(*ids) if ids else None

    # -- I/O
    def probe(self) -> BackendStatus:
        try:
            conn = self._conn()
            lib = version_string(conn.getLibVersion())
            hv = version_string(conn.getVersion())
        except HostError as exc:
            return BackendStatus(False, exc.message, exc.hint)
        except Exception as exc:  # noqa: BLE001 - libvirtError from the version calls
            return BackendStatus(False, f"libvirt at {self.uri}: {_message(exc)}",
                                 start_hint(self.uri))
        detail = f"libvirt {lib} at {self.uri} (QEMU {hv})"
        who = self._qemu_principal(conn, Accel.TCG) if is_system(self.uri) else None
        kvm = Path("/dev/kvm")
        if who is not None and kvm.exists() and \
                not access.has_access(kvm, who, access.READ | access.WRITE):
            # libvirt's QEMU probe sees KVM, its account does not: every lookup re-probes
            return BackendStatus(True, detail + f"; slow: /dev/kvm is not usable by QEMU's "
                                 f"account (uid {who.uid}), so libvirt re-probes QEMU on every "
                                 "call", "chgrp kvm /dev/kvm && chmod g+rw /dev/kvm (what udev "
                                 "does)")
        return BackendStatus(True, detail)

    def _lookup_name(self, conn: Any, name: str) -> Any:
        lv = _libvirt()
        try:
            return conn.lookupByName(name)
        except lv.libvirtError as exc:
            if _is_no_domain(exc):
                return None
            raise HostError(f"libvirt at {self.uri}: {_message(exc)}") from exc

    def _lookup_owned(self, conn: Any, name: str, vm_dir: str | Path) -> Any:
        """The domain of the VM in ``vm_dir``: by its name, else the domain whose vmforge
        metadata names that directory (a warm-pool member handed out by ``pool take`` is
        renamed in vmforge while its running domain keeps the member's name)."""
        lv = _libvirt()
        dom = self._lookup_name(conn, name)
        if dom is not None:
            return dom
        try:
            domains = conn.listAllDomains(0)
        except lv.libvirtError:
            return None
        for other in domains:
            if _same_dir(self.owner(other), vm_dir):
                return other
        return None

    def _lookup(self, rt: Runtime) -> Any:
        lv = _libvirt()
        conn = self._conn(self._uri_of(rt))
        try:
            return conn.lookupByUUIDString(rt.control)
        except lv.libvirtError as exc:
            if _is_no_domain(exc):
                return None
            raise HostError(f"libvirt at {self._uri_of(rt)}: {_message(exc)}") from exc

    @staticmethod
    def owner(dom: Any) -> str | None:
        """The VM directory in a domain's vmforge metadata, or None for a foreign domain."""
        lv = _libvirt()
        try:
            text = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, NS_VMFORGE, 0)
        except lv.libvirtError:
            return None
        return parse_owner(text)

    def _runtime(self, dom: Any, uri: str) -> Runtime:
        root = ET.fromstring(dom.XMLDesc(0))
        accel = Accel.KVM if root.get("type") == "kvm" else Accel.TCG
        agent = None
        for channel in root.iterfind("devices/channel"):
            target = channel.find("target")
            source = channel.find("source")
            if target is not None and target.get("name", "").startswith("org.vmforge.agent") \
                    and source is not None and source.get("path"):
                agent = AgentEndpoint(EndpointKind.UNIX, path=source.get("path"))
        cid = root.find("devices/vsock/cid")
        if agent is None and cid is not None and cid.get("address"):
            agent = AgentEndpoint(EndpointKind.VSOCK, cid=int(cid.get("address", "0")),
                                  port=AGENT_VSOCK_PORT)
        return Runtime(Backend.LIBVIRT, accel, dom.UUIDString(), agent, pid=None,
                       marker=None, extra={"uri": uri})

    def _prepare_files(self, plan: MachinePlan, host: HostFacts, conn: Any) -> str | None:
        """Sockets' directory, console log, NVRAM, and QEMU's access to the files; returns
        the DAC label to render (None: leave libvirt's defaults)."""
        if not is_local(self.uri):
            return None
        Path(plan.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        if plan.agent and plan.agent.socket:  # a stale one from a crash: libvirt binds anew
            Path(plan.agent.socket).unlink(missing_ok=True)
        fd = os.open(plan.console_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        if plan.nvram and not os.path.exists(plan.nvram) and host.ovmf_vars:
            shutil.copyfile(host.ovmf_vars, plan.nvram)
            os.chmod(plan.nvram, 0o600)
        who = self._qemu_principal(conn, plan.accel)
        if who is None:
            return None
        if who.uid != os.geteuid():
            read: list[str | Path] = []
            if plan.kernel:
                read += [plan.kernel.kernel] + ([plan.kernel.initrd] if plan.kernel.initrd
                                                else [])
            read += [c.path for c in plan.cdroms] + ([plan.seed] if plan.seed else [])
            for d in plan.disks:
                read += access.backing_chain(d.path)
            write: list[str | Path] = [d.path for d in plan.disks]
            write += [plan.nvram] if plan.nvram else []
            access.apply_grants(who, access.needed_grants(who, read, write))
            access.apply_grants(who, access.mount_grants(
                who, [(m.source, m.readonly) for m in plan.mounts]))
        return who.label

    def start(self, plan: MachinePlan, host: HostFacts,
              record: Callable[[Runtime], None]) -> Runtime:
        lv = _libvirt()
        conn = self._conn()
        existing = self._lookup_owned(conn, plan.name, plan.vm_dir)
        uuid = None
        if existing is not None:
            if not _same_dir(self.owner(existing), plan.vm_dir):
                raise VmExists(f"libvirt at {self.uri} has a domain named {plan.name} that is "
                               "not this vmforge VM's",
                               hint=f"pick another name, or `virsh undefine {plan.name}`")
            if existing.isActive():  # it outlived the row that says otherwise: adopt it
                rt = self._runtime(existing, self.uri)
                record(rt)
                return rt
            if existing.name() != plan.name:  # a renamed VM (pool take): its domain too
                try:
                    existing.rename(plan.name, 0)
                except lv.libvirtError as exc:
                    raise LaunchError(f"libvirt could not rename domain {existing.name()} "
                                      f"to {plan.name}: {_message(exc)}") from exc
            uuid = existing.UUIDString()
        if plan.incoming:
            return self._restore(plan, host, conn, uuid, record)
        # Names the VM's disks were switched to by snapshots while it ran (see
        # snapshot.py): nothing has them open now, and the domain is defined on its own paths.
        for stale in Path(plan.vm_dir).glob(TOP_GLOB):
            stale.unlink(missing_ok=True)
        label = self._prepare_files(plan, host, conn)
        xml = domain_xml(plan, host, dac_label=label, uuid=uuid)
        t0 = time.monotonic()
        try:
            dom = conn.defineXML(xml)
        except lv.libvirtError as exc:
            raise LaunchError(f"libvirt refused the domain of VM {plan.name}: "
                              f"{_message(exc)}", hint="see `vmforge plan` for the XML") from exc
        t1 = time.monotonic()
        rt = Runtime(Backend.LIBVIRT, plan.accel, dom.UUIDString(),
                     self._endpoint(plan), pid=None, marker=None, extra={"uri": self.uri})
        record(rt)  # durable before QEMU exists; libvirt keeps the domain either way
        try:
            dom.create()
        except lv.libvirtError as exc:
            msg = _message(exc)
            if uuid is None:  # defined by this call: leave nothing behind
                try:
                    dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
                except lv.libvirtError:
                    pass
                if is_local(self.uri) and urlsplit(self.uri).scheme.startswith("qemu"):
                    self._remove_log(self.uri, plan.name)  # its message is in the error
            hint = "start virtlogd too: virtlogd -d" if "virtlogd" in msg else \
                "check the spec's files and `vmforge doctor`"
            raise LaunchError(f"libvirt could not start VM {plan.name}: {msg}",
                              console_tail=tail_text(plan.console_log), hint=hint) from exc
        self.last_timings = {"define": t1 - t0, "create": time.monotonic() - t1}
        return rt

    def _restore(self, plan: MachinePlan, host: HostFacts, conn: Any, uuid: str | None,
                 record: Callable[[Runtime], None]) -> Runtime:
        """Start the VM from a saved image (``plan.incoming``), left paused: its domain is
        defined (the plan's, for later cold starts), then restored from a copy of the image
        whose header carries the clone's own XML (libvirt restores an image only as the
        domain that saved it: see snapshot.py)."""
        lv = _libvirt()
        assert plan.incoming is not None
        state = Path(plan.incoming.removeprefix(snap.RESTORE_PREFIX))
        try:
            saved = snap.read_save_image(state)
        except VmError as exc:
            raise LaunchError(f"libvirt could not load the saved state: {exc.message}") \
                from exc
        label = self._prepare_files(plan, host, conn)
        t0 = time.monotonic()
        try:
            dom = conn.defineXML(domain_xml(plan, host, dac_label=label, uuid=uuid))
        except lv.libvirtError as exc:
            raise LaunchError(f"libvirt refused the domain of VM {plan.name}: "
                              f"{_message(exc)}", hint="see `vmforge plan` for the XML") from exc
        rt = Runtime(Backend.LIBVIRT, plan.accel, dom.UUIDString(),
                     self._endpoint(plan), pid=None, marker=None, extra={"uri": self.uri})
        record(rt)
        image = Path(plan.vm_dir) / f".restore-{os.getpid()}.state"
        t1 = time.monotonic()
        try:
            image.unlink(missing_ok=True)
            snap.write_clone_image(state, image, snap.clone_xml(saved.xml, plan,
                                                                dom.UUIDString()))
            t2 = time.monotonic()
            conn.restoreFlags(str(image), None, lv.VIR_DOMAIN_SAVE_PAUSED)
        except (lv.libvirtError, VmError, OSError) as exc:
            if uuid is None:
                self._undefine(dom, plan.name)
                if is_local(self.uri) and urlsplit(self.uri).scheme.startswith("qemu"):
                    self._remove_log(self.uri, plan.name)
            msg = exc.message if isinstance(exc, VmError) else _message(exc)
            raise LaunchError(f"libvirt could not load the saved state: {msg}",
                              hint="the state file is damaged, or was written by another "
                                   "QEMU or for other devices; `vmforge image verify` "
                                   "re-hashes it") from exc
        finally:
            image.unlink(missing_ok=True)
        self.last_timings = {"define": t1 - t0, "copy": t2 - t1,
                             "restore": time.monotonic() - t2}
        return rt

    @staticmethod
    def _endpoint(plan: MachinePlan) -> AgentEndpoint | None:
        if plan.agent is None:
            return None
        if plan.agent.transport == "vsock" and plan.agent.cid is not None:
            return AgentEndpoint(EndpointKind.VSOCK, cid=plan.agent.cid, port=AGENT_VSOCK_PORT)
        return AgentEndpoint(EndpointKind.UNIX, path=plan.agent.socket)

    def find(self, name: str, vm_dir: Path) -> Runtime | None:
        """The runtime of this VM's domain whether it runs or not (``status`` tells), or None
        when libvirt has no domain of that name carrying this VM directory."""
        dom = self._lookup_name(self._conn(), name)
        if dom is None or not _same_dir(self.owner(dom), vm_dir):
            return None
        return self._runtime(dom, self.uri)

    def status(self, rt: Runtime) -> Liveness:
        lv = _libvirt()
        dom = self._lookup(rt)
        if dom is None:
            return Liveness.GONE
        try:
            state, reason = dom.state(0)
        except lv.libvirtError as exc:
            if _is_no_domain(exc):
                return Liveness.GONE
            raise HostError(f"libvirt at {self._uri_of(rt)}: {_message(exc)}") from exc
        return _map_state(int(state), int(reason))

    # -- memory snapshots (SavesState's restore half + SnapshotsInOneStep; snapshot.py)
    def _domain(self, rt: Runtime) -> Any:
        dom = self._lookup(rt)
        if dom is None:
            raise VmError("libvirt has no domain for this VM any more")
        return dom

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        lv = _libvirt()
        try:
            return fn(*args)
        except lv.libvirtError as exc:
            raise VmError(f"libvirt could not {what}: {_message(exc)}") from exc

    def pause(self, rt: Runtime) -> None:
        dom = self._domain(rt)
        if dom.state(0)[0] != _PAUSED:
            self._call("pause the VM", dom.suspend)

    def snapshot(self, rt: Runtime, dest: Path, overlays: Mapping[str, str], *,
                 stop: bool, timeout: float) -> None:
        lv = _libvirt()
        dom = self._domain(rt)
        sources = snap.disk_sources(dom.XMLDesc(0))
        targets = {}
        for disk_id, path in overlays.items():
            found = sources.get(disk_id[:20])
            if found is None:
                raise VmError(f"libvirt's domain has no disk {disk_id}")
            targets[found[0]] = path
        self._grant_disks(rt, dom)  # the running images are reopened read-only by name
        if is_system(self._uri_of(rt)) and is_local(self._uri_of(rt)):
            who = self._qemu_principal(self._conn(self._uri_of(rt)), rt.accel)
            if who is not None and who.uid != os.geteuid():
                access.apply_grants(who, access.needed_grants(who, [], list(overlays.values())))
        flags = (lv.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                 | lv.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
        if stop:
            flags |= lv.VIR_DOMAIN_SNAPSHOT_CREATE_HALT
        xml = snap.snapshot_xml(f"vmforge-{Path(dest).name}", dest, targets)
        self._call("save the VM's state", dom.snapshotCreateXML, xml, flags)

    def adopt_disks(self, rt: Runtime, paths: Mapping[str, str]) -> None:
        lv = _libvirt()
        dom = self._domain(rt)
        inactive = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE)
        xml = snap.with_disk_sources(inactive, {k[:20]: v for k, v in paths.items()})
        self._call("record the VM's disks", self._conn(self._uri_of(rt)).defineXML, xml)

    def save_state(self, rt: Runtime, dest: Path, timeout: float) -> None:
        raise VmError("libvirt saves a VM's state with its disks in one step (snapshot)")

    def switch_disks(self, rt: Runtime, overlays: Mapping[str, str]) -> None:
        raise VmError("libvirt switches a VM's disks with its state in one step (snapshot)")

    def rebase_disk(self, rt: Runtime, disk: str, backing: str) -> None:
        raise VmError("libvirt's overlays name their stored layer from the start")

    def top_nodes(self, rt: Runtime) -> dict[str, str]:
        """Each disk's current image as libvirt runs it (or, stopped, would start it)."""
        dom = self._domain(rt)
        xml = dom.XMLDesc(0) if self._active(dom) else \
            dom.XMLDesc(_libvirt().VIR_DOMAIN_XML_INACTIVE)
        return {serial: source for serial, (_t, source) in snap.disk_sources(xml).items()}

    def resume(self, rt: Runtime) -> None:
        dom = self._domain(rt)
        if dom.state(0)[0] == _PAUSED:
            self._grant_disks(rt, dom)
            self._call("resume the VM", dom.resume)

    def _grant_disks(self, rt: Runtime, dom: Any) -> None:
        """QEMU reopens images by name when it activates them (``cont`` after a restore,
        a snapshot's read-only reopen): grant its account the disks and the directories
        above them again. Any vmforge process's ``DataDir.ensure`` chmods the data
        directories back to 0700, which clears the ACL mask and with it the account's
        search right granted at start."""
        uri = self._uri_of(rt)
        if not (is_system(uri) and is_local(uri)):
            return
        who = self._qemu_principal(self._conn(uri), rt.accel)
        if who is None or who.uid == os.geteuid():
            return
        tops = [source for _t, source in snap.disk_sources(dom.XMLDesc(0)).values()]
        read: list[str | Path] = []
        for top in tops:
            read += access.backing_chain(top)
        access.apply_grants(who, access.needed_grants(who, read, tops))

    def quit(self, rt: Runtime) -> None:
        dom = self._lookup(rt)
        if dom is not None:
            self._destroy(dom)

    def run_state(self, rt: Runtime) -> str:
        dom = self._lookup(rt)
        if dom is None:
            return "gone"
        state = dom.state(0)[0]
        return {_RUNNING: "running", _PAUSED: "paused", _SHUTOFF: "shutoff"}.get(
            state, str(state))

    def cancel_save(self, rt: Runtime) -> None:
        """A snapshot job of a vmforge that died runs on inside libvirtd: let it finish (a
        few seconds at most), then abort what is left."""
        lv = _libvirt()
        dom = self._lookup(rt)
        if dom is None:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if dom.jobInfo()[0] == lv.VIR_DOMAIN_JOB_NONE:
                    return
            except lv.libvirtError:
                return
            time.sleep(0.1)
        try:
            dom.abortJob()
        except lv.libvirtError:
            pass

    def incoming(self, state: Path) -> str:
        return snap.RESTORE_PREFIX + str(state)

    def wait_restored(self, rt: Runtime, vm_dir: Path, timeout: float) -> float:
        """``start`` returns once libvirt loaded the state (restore is synchronous)."""
        state = self.run_state(rt)
        if state != "paused":
            raise LaunchError(f"libvirt's restored VM is {state}, not paused",
                              console_tail=tail_text(Path(vm_dir) / "console.log", 10))
        return self.last_timings.get("restore", 0.0)

    def state_info(self, state: Path) -> dict[str, Any]:
        return snap.state_info(state)

    def generation_id(self, rt: Runtime) -> str | None:
        dom = self._lookup(rt)
        return snap.genid(dom.XMLDesc(0)) if dom is not None else None

    def domain_xml(self, rt: Runtime) -> str | None:
        """What libvirt holds for the domain (``virsh dumpxml``), or None when it is gone."""
        dom = self._lookup(rt)
        return str(dom.XMLDesc(0)) if dom is not None else None

    def _destroy(self, dom: Any) -> bool:
        """Destroy ``dom`` if it runs; True if it did run."""
        lv = _libvirt()
        try:
            if not dom.isActive():
                return False
            dom.destroy()
        except lv.libvirtError as exc:
            if _is_no_domain(exc) or exc.get_error_code() == lv.VIR_ERR_OPERATION_INVALID:
                return False  # it went away by itself meanwhile
            raise HostError(f"libvirt could not destroy the domain: {_message(exc)}") from exc
        return True

    def _active(self, dom: Any) -> bool:
        lv = _libvirt()
        try:
            return bool(dom.isActive())
        except lv.libvirtError:
            return False

    async def stop(self, rt: Runtime, timeout: float) -> StopOutcome:
        lv = _libvirt()
        dom = await asyncio.to_thread(self._lookup, rt)
        if dom is None or not await asyncio.to_thread(self._active, dom):
            return StopOutcome.NOT_RUNNING
        if timeout <= 0:
            gone = await asyncio.to_thread(self._destroy, dom)
            return StopOutcome.KILLED if gone else StopOutcome.NOT_RUNNING
        try:
            await asyncio.to_thread(dom.shutdownFlags, lv.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except lv.libvirtError as exc:
            if exc.get_error_code() in (lv.VIR_ERR_INVALID_ARG, lv.VIR_ERR_NO_SUPPORT):
                try:  # a driver without the ACPI flag: its default shutdown
                    await asyncio.to_thread(dom.shutdown)
                except lv.libvirtError:
                    pass
            # else: not running any more, or no ACPI: the deadline decides
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(self._active, dom):
                return StopOutcome.ACPI
            await asyncio.sleep(0.1)
        if await asyncio.to_thread(self._destroy, dom):
            return StopOutcome.QUIT
        return StopOutcome.ACPI

    def kill(self, rt: Runtime) -> StopOutcome:
        dom = self._lookup(rt)
        if dom is None:
            return StopOutcome.NOT_RUNNING
        return StopOutcome.KILLED if self._destroy(dom) else StopOutcome.NOT_RUNNING

    def cleanup(self, rt: Runtime | None, name: str, vm_dir: Path) -> None:
        """Destroy and undefine this VM's domain with its NVRAM, managed save and snapshot
        metadata; remove the agent socket and libvirt's log of the domain. Idempotent."""
        uri = self._uri_of(rt)
        conn = self._conn(uri)
        dom = self._lookup(rt) if rt is not None else None
        if dom is None:
            dom = self._lookup_owned(conn, name, vm_dir)
        if dom is not None and not _same_dir(self.owner(dom), vm_dir):
            dom = None  # a foreign domain (or another VM's): not ours to remove
        sockets: list[str] = []
        if rt is not None and rt.agent is not None and rt.agent.path:
            sockets.append(rt.agent.path)
        if dom is not None:
            found = self._runtime(dom, uri).agent
            if found is not None and found.path:
                sockets.append(found.path)
            dom_name = dom.name()
            self._destroy(dom)
            self._undefine(dom, dom_name)
            if is_local(uri) and urlsplit(uri).scheme.startswith("qemu"):
                self._remove_log(uri, dom_name)
        if is_local(uri):
            for sock in sockets:
                for path in (sock, sock + ".lock"):
                    Path(path).unlink(missing_ok=True)

    @staticmethod
    def _undefine(dom: Any, name: str) -> None:
        """Undefine with the NVRAM, managed save and snapshot/checkpoint metadata; a libvirt
        that does not know a flag (older ones, the test driver) gets the next smaller set."""
        lv = _libvirt()
        full = (lv.VIR_DOMAIN_UNDEFINE_NVRAM | lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        for flags in (full | lv.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA, full,
                      lv.VIR_DOMAIN_UNDEFINE_NVRAM, 0):
            try:
                dom.undefineFlags(flags)
                return
            except lv.libvirtError as exc:
                if _is_no_domain(exc):
                    return
                if exc.get_error_code() not in (lv.VIR_ERR_INVALID_ARG, lv.VIR_ERR_NO_SUPPORT):
                    raise HostError(f"libvirt could not undefine {name}: "
                                    f"{_message(exc)}") from exc
        raise HostError(f"libvirt could not undefine {name}")

    @staticmethod
    def _remove_log(uri: str, name: str) -> None:
        """libvirt keeps ``NAME.log`` (QEMU's command line and stderr) after undefine."""
        if is_system(uri):
            log_dir = Path("/var/log/libvirt/qemu")
        else:
            cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            log_dir = Path(cache) / "libvirt" / "qemu" / "log"
        for path in log_dir.glob(f"{name}.log*"):
            if path.name == f"{name}.log" or path.name.startswith(f"{name}.log."):
                path.unlink(missing_ok=True)
