"""VM specs: frozen, validated models, loaded from YAML or JSON.

The on-disk format is the node daemon's request format: ``{"name": ..., "spec": {...}}``.
Enum values accept both the API spelling (``FIRMWARE_UEFI``, ``BOOT_DEVICE_CDROM``) and the
short one (``uefi``, ``cdrom``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import yamlload
from .enums import (
    AccelChoice,
    AgentTransport,
    Backend,
    BootDevice,
    BootMode,
    DiskFormat,
    Firmware,
    Machine,
    NicMode,
    Protocol,
)
from .errors import SpecError
from .net.names import IFNAME_RE, NET_NAME_RE

__all__ = [
    "Firmware", "BootDevice", "Machine", "DiskFormat", "Backend", "AccelChoice", "BootMode",
    "AgentTransport", "Protocol", "NicMode", "Disk", "Cdrom", "CloudInit",
    "PortForward", "Nic", "Mount", "KernelBoot", "AgentSpec", "HealthCheck", "ProvisionStep",
    "VmSpec", "VmRequest", "NAME_RE", "validate_name", "load_request", "parse_request",
    "dump_request",
]

NAME_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,31}$")


def validate_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError(
            f"invalid VM name {name!r}",
            field=field,
            hint="use 1-63 letters, digits and '-', starting and ending with a letter or digit",
        )
    return name


def _enum_alias(prefix: str) -> Any:
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            v = value.strip()
            if v.upper().startswith(prefix):
                v = v[len(prefix):]
            return v.lower()
        return value
    return BeforeValidator(convert)


FirmwareField = Annotated[Firmware, _enum_alias("FIRMWARE_")]
BootDeviceField = Annotated[BootDevice, _enum_alias("BOOT_DEVICE_")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


def _device_id(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise ValueError("must be 1-32 letters, digits, '-' or '_'")
    return value


DeviceId = Annotated[str, AfterValidator(_device_id)]


def _mib(value: Any) -> Any:
    """``memory_mib: 4G`` means 4096: sizes take suffixes everywhere (vmforge.sizes)."""
    if isinstance(value, str):
        from .sizes import to_mib
        return to_mib(value)
    return value


def _gib(value: Any) -> Any:
    if isinstance(value, str):
        from .sizes import to_gib
        return to_gib(value)
    return value


class Disk(_Model):
    id: DeviceId
    size_gib: Annotated[float | None, BeforeValidator(_gib)] = Field(default=None, gt=0,
                                                                      le=65536)
    bootable: bool = False
    backing_file: str | None = None
    image: str | None = None
    format: DiskFormat = DiskFormat.QCOW2

    @model_validator(mode="after")
    def _source(self) -> Disk:
        if self.backing_file and self.image:
            raise ValueError("give either backing_file or image, not both")
        if not self.backing_file and not self.image and self.size_gib is None:
            raise ValueError("a blank disk needs size_gib")
        return self


class Cdrom(_Model):
    id: DeviceId
    iso_path: str
    bootable: bool = False


class CloudInit(_Model):
    user_data: str | None = None
    meta_data: str | None = None
    network_config: str | None = None
    vendor_data: str | None = None


class PortForward(_Model):
    host_port: int = Field(ge=0, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    protocol: Protocol = Protocol.TCP
    host_addr: str = "127.0.0.1"


class Nic(_Model):
    """A NIC: user-mode NAT (``forwards``), a tap on an existing host bridge (``bridge:
    br0``) or a vmforge-managed network (``network: lan``; under libvirt, a libvirt network
    of that name when vmforge has none). ``mode`` follows from ``bridge``/``network``.
    ``ip`` (with ``gateway``) is a static address instead of DHCP: ``10.0.0.20`` on a managed
    network (its prefix and gateway are the network's), ``192.168.1.20/24`` on a bridge."""
    id: str = "net0"
    mode: NicMode = NicMode.USER
    bridge: str | None = Field(default=None, pattern=IFNAME_RE.pattern)
    network: str | None = Field(default=None, pattern=NET_NAME_RE.pattern)
    mac: str | None = Field(default=None, pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
    ip: str | None = None
    gateway: str | None = None
    forwards: tuple[PortForward, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _mode_from_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") is None:
            if data.get("bridge"):
                data = {**data, "mode": NicMode.BRIDGE.value}
            elif data.get("network"):
                data = {**data, "mode": NicMode.NETWORK.value}
        return data

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import ipaddress
        try:
            iface = ipaddress.ip_interface(v)
        except ValueError:
            raise ValueError(f"not an IP address: {v!r} (e.g. 10.0.0.20 or "
                             "192.168.1.20/24)") from None
        if iface.version != 4:
            raise ValueError("static addresses are IPv4")
        if "/" in v and iface.ip in (iface.network.network_address,
                                     iface.network.broadcast_address) and \
                iface.network.prefixlen < 31:
            raise ValueError(f"{v} is the subnet's network or broadcast address")
        return str(iface) if "/" in v else str(iface.ip)

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import ipaddress
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError(f"not an IPv4 address: {v!r}") from None

    @model_validator(mode="after")
    def _kind(self) -> Nic:
        if self.bridge and self.network:
            raise ValueError("give either bridge or network, not both")
        if self.mode is NicMode.BRIDGE and not self.bridge:
            raise ValueError("mode bridge needs bridge: NAME (an existing host bridge)")
        if self.mode is NicMode.NETWORK and not self.network:
            raise ValueError("mode network needs network: NAME (see `vmforge network ls`)")
        if self.mode is NicMode.USER and (self.bridge or self.network):
            raise ValueError(f"mode user takes neither bridge nor network (got mode "
                             f"{self.mode.value} with {'bridge' if self.bridge else 'network'})")
        if self.forwards and self.mode is not NicMode.USER:
            raise ValueError("port forwards are for user-mode NICs; a bridge or network NIC "
                             "is reached at the guest's own address")
        if self.ip is not None and self.mode is NicMode.USER:
            raise ValueError("a static ip needs a bridge or network NIC (user-mode NAT "
                             "always gives the guest 10.0.2.15)")
        if self.ip is not None and self.mode is NicMode.BRIDGE and "/" not in self.ip:
            raise ValueError("on a host bridge give the prefix length too, e.g. "
                             "192.168.1.20/24 (vmforge does not know the bridge's subnet)")
        if self.gateway is not None and self.ip is None:
            raise ValueError("gateway goes with a static ip")
        return self


class KernelBoot(_Model):
    image: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None

    @model_validator(mode="after")
    def _source(self) -> KernelBoot:
        if not self.image and not self.kernel:
            raise ValueError("give image (a library image) or kernel (a path)")
        if self.image and self.kernel:
            raise ValueError("give either image or kernel, not both")
        return self


class AgentSpec(_Model):
    enabled: bool = True
    inject: bool = True  # add the agent to cloud-init user-data of cloud images
    transport: AgentTransport = AgentTransport.AUTO


class HealthCheck(_Model):
    name: str | None = None
    http_get: str | None = None  # e.g. "http://127.0.0.1:2280/health" (inside the guest)
    expect_status: int = 200
    command: tuple[str, ...] | None = None
    timeout_s: float = Field(default=10, gt=0)

    @model_validator(mode="after")
    def _one(self) -> HealthCheck:
        if bool(self.http_get) == bool(self.command):
            raise ValueError("give exactly one of http_get or command")
        return self

    @property
    def label(self) -> str:
        return self.name or (f"GET {self.http_get}" if self.http_get else
                             " ".join(self.command or ()))


class ProvisionStep(_Model):
    name: str | None = None
    copy_: tuple[str, str] | None = Field(default=None, alias="copy")
    run: tuple[str, ...] | None = None
    shell: str | None = None
    wait_health: bool = False
    timeout_s: float = Field(default=300, gt=0)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one(self) -> ProvisionStep:
        given = [x for x in (self.copy_, self.run, self.shell) if x]
        if len(given) + int(self.wait_health) != 1:
            raise ValueError("give exactly one of copy, run, shell or wait_health")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.copy_:
            return f"copy {self.copy_[0]} -> {self.copy_[1]}"
        if self.run:
            return "run " + " ".join(self.run)
        if self.shell:
            return "shell " + self.shell
        return "wait for health"


MOUNT_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$")


class Mount(_Model):
    """A host directory shared into the guest with virtio-9p and mounted at ``target`` by the
    guest agent, in every image (see the README, "Host folders"). ``source`` is relative to
    the spec file (``~`` expands); ``tag`` is the 9p mount tag (default ``vmforgeN``, N the
    mount's position). ``security_model``: ``none`` (files the guest creates belong to the
    hypervisor's user on the host, and guest chown is ignored) or ``mapped-xattr`` (the guest's
    owners and modes are kept in extended attributes of the host files)."""
    source: str = Field(min_length=1)
    target: str
    readonly: bool = False
    tag: str | None = Field(default=None, pattern=MOUNT_TAG_RE.pattern)
    security_model: Literal["none", "mapped-xattr"] = "none"

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must be an absolute path in the guest, e.g. /mnt/src (got {v!r})")
        if any(ord(c) < 32 for c in v):
            raise ValueError("must not contain control characters")
        norm = "/" + "/".join(p for p in v.split("/") if p not in ("", "."))
        if ".." in norm.split("/"):
            raise ValueError(f"must not contain '..' (got {v!r})")
        if norm == "/":
            raise ValueError("cannot mount over the guest's root directory")
        return norm

    def tag_at(self, index: int) -> str:
        """The 9p mount tag of the mount at ``index`` in ``VmSpec.mounts``."""
        return self.tag or f"vmforge{index}"


class VmSpec(_Model):
    cpu_cores: int = Field(default=1, ge=1, le=256)
    memory_mib: Annotated[int, BeforeValidator(_mib)] = Field(default=512, ge=64,
                                                               le=1024 * 1024)
    machine: Machine = Machine.Q35
    firmware: FirmwareField = Firmware.BIOS
    boot_order: tuple[BootDeviceField, ...] = ()
    disks: tuple[Disk, ...] = ()
    cdroms: tuple[Cdrom, ...] = ()
    nics: tuple[Nic, ...] = (Nic(),)
    kernel: KernelBoot | None = None
    boot_mode: BootMode = BootMode.AUTO
    cloud_init: CloudInit | None = None
    agent: AgentSpec = AgentSpec()
    health_checks: tuple[HealthCheck, ...] = ()
    provision: tuple[ProvisionStep, ...] = ()
    mounts: tuple[Mount, ...] = ()
    accel: AccelChoice = AccelChoice.AUTO
    hypervisor: Backend = Backend.QEMU

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, v: tuple[Mount, ...]) -> tuple[Mount, ...]:
        tags = [m.tag_at(i) for i, m in enumerate(v)]
        targets = [m.target for m in v]
        for what, seen in (("tag", tags), ("target", targets)):
            dup = sorted({x for x in seen if seen.count(x) > 1})
            if dup:
                raise ValueError(f"each mount needs its own {what}; repeated: {', '.join(dup)}"
                                 + (" (a mount without a tag gets vmforgeN, N its position)"
                                    if what == "tag" else ""))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VmSpec:
        ids = [d.id for d in self.disks] + [c.id for c in self.cdroms]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"device ids must be unique; repeated: {', '.join(sorted(dup))}")
        if sum(d.bootable for d in self.disks) > 1:
            raise ValueError("at most one disk may be bootable")
        if len(set(self.boot_order)) != len(self.boot_order):
            raise ValueError("boot_order lists a device twice")
        if BootDevice.CDROM in self.boot_order and not any(c.bootable for c in self.cdroms):
            raise ValueError("boot_order has BOOT_DEVICE_CDROM but no cdrom is bootable")
        if self.machine is Machine.MICROVM and (self.cdroms or self.firmware is Firmware.UEFI):
            raise ValueError("microvm supports neither cdroms nor UEFI; use machine q35")
        return self

    @property
    def boot_disk(self) -> Disk | None:
        for d in self.disks:
            if d.bootable:
                return d
        return self.disks[0] if self.disks and not self.kernel else None


class VmRequest(_Model):
    name: str
    spec: VmSpec = VmSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError("must be 1-63 letters, digits and '-', starting and ending with a "
                             "letter or digit (it becomes a directory name and the hostname)")
        return v


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "json-or-python", "lax-or-strict")) or part in (
                "str", "int", "float", "bool", "list", "tuple", "dict"):
            continue
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _quote(value: Any, limit: int = 80) -> str:
    """The offending input, cut short: error messages never echo a whole (hostile) document."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 5] + " ...>"


def spec_error_from(exc: ValidationError, source: str = "") -> SpecError:
    lines = []
    first_field = None
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("[")))
        field = _loc(loc)
        first_field = first_field or field
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "enum":
            msg = f"{msg} (got {_quote(err.get('input'))})"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif "input" in err and err["type"] not in ("model_type",):
            msg = f"{msg} (got {_quote(err['input'])})"
        lines.append(f"{field}: {msg}")
    where = f"{source}: " if source else ""
    error = SpecError(where + "; ".join(lines), hint="fix the field(s) named above")
    error.field = first_field
    return error


def parse_request(data: Any, source: str = "") -> VmRequest:
    if not isinstance(data, dict):
        raise SpecError(f"{source or 'spec'}: the top level must be a mapping with name and spec")
    try:
        return VmRequest.model_validate(data)
    except ValidationError as exc:
        raise spec_error_from(exc, source) from None


def load_document(text: str, source: str) -> Any:
    """Parse YAML (a superset of JSON); errors carry line and column.

    The loader is :mod:`vmforge.yamlload`'s: duplicate keys, alias bombs and absurd nesting
    are refused before anything walks the data, and no message quotes the (expanded) input.
    """
    if len(text) > yamlload.MAX_DOCUMENT_BYTES:
        raise SpecError(f"{source}: the document is larger than "
                        f"{yamlload.MAX_DOCUMENT_BYTES // 2 ** 20} MiB",
                        hint="specs and recipes are small; refer to big content by path")
    try:
        return yamlload.load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        pos = f"at {yamlload.describe_mark(mark)}" if mark else "(position unknown)"
        kind = "refused YAML" if isinstance(exc, yamlload.DocumentLimitError) else "invalid YAML"
        raise SpecError(f"{source}: {kind} {pos}: {exc.problem}",
                        hint="fix the document at that position") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: invalid YAML: {exc}") from None


def read_document(path: Path, what: str = "spec file") -> Any:
    """Read and parse a YAML/JSON file; unreadable files and bad syntax are SpecErrors."""
    try:
        with open(path, "rb") as f:
            raw = f.read(yamlload.MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{what} {path} is not UTF-8 text (byte {exc.start})",
                        hint="give a YAML or JSON file") from None
    return load_document(text, str(path))


def load_request(path: str | Path, name: str | None = None) -> VmRequest:
    p = Path(path)
    data = read_document(p)
    if isinstance(data, dict) and name is not None:
        data = {**data, "name": name}
    req = parse_request(data, str(p))
    return resolve_paths(req, p.parent)


def resolve_paths(req: VmRequest, base: Path) -> VmRequest:
    """Make relative file paths in a spec relative to the spec file's directory."""
    def fix(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute():
            return value
        return str((base / value).resolve())

    spec = req.spec
    disks = tuple(d.model_copy(update={"backing_file": fix(d.backing_file)}) for d in spec.disks)
    cdroms = tuple(c.model_copy(update={"iso_path": fix(c.iso_path)}) for c in spec.cdroms)
    kernel = spec.kernel
    if kernel and kernel.kernel:
        kernel = kernel.model_copy(update={"kernel": fix(kernel.kernel),
                                           "initrd": fix(kernel.initrd)})
    mounts = tuple(m.model_copy(update={"source": fix(os.path.expanduser(m.source))})
                   for m in spec.mounts)
    new_spec = spec.model_copy(update={"disks": disks, "cdroms": cdroms, "kernel": kernel,
                                       "mounts": mounts})
    return req.model_copy(update={"spec": new_spec})


def dump_request(req: VmRequest) -> str:
    return json.dumps(req.model_dump(mode="json", by_alias=True, exclude_defaults=True),
                      sort_keys=True)
