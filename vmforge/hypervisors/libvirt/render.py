"""libvirt backend, pure part: MachinePlan + HostFacts -> domain XML. No I/O here.

The XML is built with ElementTree (no string templates) and expresses the machine the QEMU
backend's argv does (``vmforge.hypervisors.qemu.render``): the same disks, cdroms, boot order,
console, agent port, rng and NICs. Every shape is golden-tested and validated against libvirt's
own schema (``virt-xml-validate``).

Choices, and why:

- Domain type ``kvm`` only when the plan says KVM really works, else ``qemu`` (TCG).
- ``<features><acpi/>``: without it libvirt passes ``-no-acpi`` and a guest ``poweroff`` only
  halts (the domain would never shut off).
- UEFI: ``<os firmware='efi'>`` lets libvirt pick the firmware from the host's descriptors
  (portable to remote hosts); secure boot and enrolled keys are turned off so it picks the
  plain ``OVMF_CODE_4M.fd`` the QEMU backend uses, and ``<nvram>`` is the VM's own copy.
- The seed ISO (``cidata``) is a read-only cdrom on virtio-scsi: cloud kernels (Debian's
  ``cloud-amd64``) have virtio-scsi and sr_mod but no AHCI, so a SATA cdrom would be invisible
  to them. The spec's own cdroms sit on SATA (q35) or IDE (pc), as under QEMU, because
  installers boot from those everywhere.
- User-mode NICs with port forwards: Debian 12's libvirt 9.0 has ``<portForward>`` only with
  the passt backend, which it does not support yet (``<backend type='passt'/>`` is refused). So
  when a user NIC has forwards, the user NICs are passed through to QEMU with
  ``<qemu:commandline>``: a ``-netdev user`` with ``hostfwd=`` (exactly the QEMU backend's) and
  a JSON ``-device`` (JSON so that QEMU creates it after libvirt's own devices) at a fixed PCI
  slot at the top of the root bus, which libvirt's allocator (bottom-up) does not reach.
  ``virsh start`` alone reproduces the VM. libvirt logs such a domain as "tainted:
  custom-argv", which is cosmetic. Without forwards, NICs are plain ``<interface type='user'>``.
- A NIC on a libvirt network or a host bridge (``network``/``bridge`` on the NIC plan, when
  the spec grows them) becomes ``<interface type='network'|'bridge'>``.
- Host folders: ``<filesystem type='mount'>`` (virtio-9p, the QEMU backend's ``-fsdev local``)
  with ``accessmode='squash'``, which is QEMU's ``security_model=none`` (``passthrough`` would
  make QEMU chown every file the guest creates, which fails when QEMU is not root: under
  ``qemu:///system`` it runs as libvirt-qemu), or ``mapped`` for ``mapped-xattr``. The target
  ``dir`` is the mount tag.
- ``<genid/>`` (QEMU's vmgenid device) whenever the plan asks for a VM generation id: libvirt
  picks the GUID, and gives a restored domain a new one, so a clone's kernel reseeds its
  random pool (see ``snapshot``).
- Ownership: ``<metadata>`` holds a ``vmforge:vm`` element with the VM directory, so the driver
  adopts only the domains vmforge defined for that VM.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from ...errors import SpecError
from ...spec import Firmware, Machine
from ..base import AGENT_PORT_NAME, Accel
from ..host import HostFacts
from ..plan import MachinePlan, NicPlan

__all__ = ["domain_xml", "NS_VMFORGE", "NS_QEMU", "MACHINES", "dev_name", "parse_owner",
           "FORWARD_SLOTS"]

NS_VMFORGE = "https://vmforge.dev/xmlns/libvirt/domain/1"
NS_QEMU = "http://libvirt.org/schemas/domain/qemu/1.0"

#: Machine types this backend renders (microvm is QEMU-only here: libvirt's support for it
#: is partial and untested, so the capability check refuses it with a field-named error).
MACHINES = frozenset({Machine.Q35, Machine.PC})

#: PCI slots (on pcie.0 for q35, pci.0 for pc) of user NICs passed through to QEMU, at the top
#: of the bus, which libvirt's bottom-up allocator does not reach with vmforge's few devices.
#: (0x1f is the ICH9 LPC/SATA/SMBus slot on q35.)
FORWARD_SLOTS = {Machine.Q35: (0x1B, 0x1C, 0x1D, 0x1E),
                 Machine.PC: (0x1C, 0x1D, 0x1E, 0x1F)}

ET.register_namespace("vmforge", NS_VMFORGE)
ET.register_namespace("qemu", NS_QEMU)


def dev_name(prefix: str, index: int) -> str:
    """libvirt's target names: vda..vdz, vdaa, vdab, ... (``virDiskNameToIndex`` inverted)."""
    suffix = ""
    n = index
    while True:
        suffix = chr(ord("a") + n % 26) + suffix
        n = n // 26 - 1
        if n < 0:
            return prefix + suffix


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def _boot(parent: ET.Element, order: int | None) -> None:
    if order is not None:
        _sub(parent, "boot", order=str(order))


def _os(root: ET.Element, plan: MachinePlan) -> None:
    attrs = {"firmware": "efi"} if plan.firmware is Firmware.UEFI else {}
    os_el = _sub(root, "os", **attrs)
    _sub(os_el, "type", "hvm", arch="x86_64", machine=plan.machine.value)
    if plan.firmware is Firmware.UEFI:
        fw = _sub(os_el, "firmware")
        _sub(fw, "feature", enabled="no", name="enrolled-keys")
        _sub(fw, "feature", enabled="no", name="secure-boot")
        if plan.nvram:
            _sub(os_el, "nvram", plan.nvram)
    if plan.kernel is not None:
        _sub(os_el, "kernel", plan.kernel.kernel)
        if plan.kernel.initrd:
            _sub(os_el, "initrd", plan.kernel.initrd)
        if plan.kernel.cmdline:
            _sub(os_el, "cmdline", plan.kernel.cmdline)


def _cpu(root: ET.Element, plan: MachinePlan) -> None:
    if plan.accel is Accel.KVM:
        cpu = _sub(root, "cpu", mode="host-passthrough", check="none")
    else:  # the QEMU backend's -cpu qemu64 under TCG
        cpu = _sub(root, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", "qemu64", fallback="forbid")
    _sub(cpu, "topology", sockets="1", dies="1", cores=str(plan.cpu_cores), threads="1")


def _disk(devices: ET.Element, *, device: str, path: str, fmt: str, dev: str, bus: str,
          readonly: bool = False, serial: str | None = None, order: int | None = None,
          discard: bool = False) -> None:
    disk = _sub(devices, "disk", type="file", device=device)
    drv = {"name": "qemu", "type": fmt}
    if discard:
        drv["discard"] = "unmap"
    _sub(disk, "driver", **drv)
    _sub(disk, "source", file=path)
    _sub(disk, "target", dev=dev, bus=bus)
    if readonly:
        _sub(disk, "readonly")
    if serial:
        _sub(disk, "serial", serial)
    _boot(disk, order)


def _storage(devices: ET.Element, plan: MachinePlan) -> None:
    for i, d in enumerate(plan.disks):
        _disk(devices, device="disk", path=d.path, fmt=d.format, dev=dev_name("vd", i),
              bus="virtio", serial=d.id[:20], order=d.bootindex, discard=True)
    sd = 0  # sda.. is shared by the SATA and SCSI buses
    for i, c in enumerate(plan.cdroms):
        if plan.machine is Machine.Q35:
            bus, dev = "sata", dev_name("sd", sd)
            sd += 1
        else:
            if i >= 4:
                raise SpecError("machine pc has room for 4 cdroms (two IDE buses)",
                                field=f"spec.cdroms[{i}]", hint="use machine: q35")
            bus, dev = "ide", dev_name("hd", i)
        _disk(devices, device="cdrom", path=c.path, fmt="raw", dev=dev, bus=bus,
              readonly=True, order=c.bootindex)
    if plan.seed:
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
        _disk(devices, device="cdrom", path=plan.seed, fmt="raw", dev=dev_name("sd", sd),
              bus="scsi", readonly=True)


def _nic_kind(nic: NicPlan) -> tuple[str, str | None]:
    """("network", name) | ("bridge", name) | ("user", None). ``network``/``bridge`` are read
    with getattr: the spec's NICs do not have them yet, the renderer is ready for them."""
    network: Any = getattr(nic, "network", None)
    bridge: Any = getattr(nic, "bridge", None)
    if network:
        return "network", str(network)
    if bridge:
        return "bridge", str(bridge)
    return "user", None


def _nics(devices: ET.Element, plan: MachinePlan) -> list[str]:
    """Native interfaces; returns the QEMU arguments of the user NICs passed through.

    When any user NIC needs port forwards, every user NIC is passed through, at ascending
    slots, so the guest enumerates them in the spec's order (as under the QEMU backend)."""
    users = [n for n in plan.nics if _nic_kind(n)[0] == "user"]
    through = any(n.forwards for n in users)
    slots = FORWARD_SLOTS[plan.machine]
    if through and len(users) > len(slots):
        raise SpecError(f"at most {len(slots)} user-mode NICs when one has port forwards "
                        "under libvirt", field="spec.nics")
    passthrough: list[str] = []
    for i, nic in enumerate(plan.nics):
        order = plan.net_bootindex if i == 0 else None
        kind, source = _nic_kind(nic)
        if kind == "user" and through:
            passthrough += _user_nic_args(nic, plan.machine, slots[users.index(nic)], order)
            continue
        iface = _sub(devices, "interface", type=kind)
        if nic.mac:
            _sub(iface, "mac", address=nic.mac)
        if source is not None:
            _sub(iface, "source", **{kind: source})
        _sub(iface, "model", type="virtio")
        _boot(iface, order)
    return passthrough


def _user_nic_args(nic: NicPlan, machine: Machine, slot: int, order: int | None) -> list[str]:
    """``-netdev user`` with the QEMU backend's ``hostfwd=`` list, and its device as JSON (QEMU
    creates JSON ``-device``s in command-line order, so it comes after libvirt's own)."""
    netdev = f"user,id=vmforge-{nic.id}" + "".join(
        f",hostfwd={f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}"
        for f in nic.forwards)
    device: dict[str, Any] = {"driver": "virtio-net-pci", "netdev": f"vmforge-{nic.id}",
                              "id": f"vmforge-nic-{nic.id}",
                              "bus": "pcie.0" if machine is Machine.Q35 else "pci.0",
                              "addr": f"{slot:#04x}"}
    if nic.mac:
        device["mac"] = nic.mac
    if order is not None:
        device["bootindex"] = order
    return ["-netdev", netdev, "-device", json.dumps(device, separators=(",", ":"))]


#: The spec's security models as libvirt's access modes (the same QEMU options).
ACCESS_MODES = {"none": "squash", "mapped-xattr": "mapped"}


def _mounts(devices: ET.Element, plan: MachinePlan) -> None:
    for m in plan.mounts:
        fs = _sub(devices, "filesystem", type="mount", accessmode=ACCESS_MODES[m.security_model])
        _sub(fs, "source", dir=m.source)
        _sub(fs, "target", dir=m.tag)
        if m.readonly:
            _sub(fs, "readonly")


def _agent(devices: ET.Element, plan: MachinePlan) -> None:
    agent = plan.agent
    if agent is None:
        return
    if agent.transport == "vsock":
        if agent.cid is None:
            raise SpecError("the vsock agent transport needs a guest CID",
                            field="spec.agent.transport")
        vsock = _sub(devices, "vsock", model="virtio")
        _sub(vsock, "cid", auto="no", address=str(agent.cid))
        return
    if not agent.socket:
        raise SpecError("the virtio-serial agent transport needs a socket path",
                        field="spec.agent.transport")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=agent.socket)
    _sub(channel, "target", type="virtio", name=AGENT_PORT_NAME)


def domain_xml(plan: MachinePlan, host: HostFacts, *, dac_label: str | None = None,
               uuid: str | None = None) -> str:
    """The libvirt domain of ``plan``.

    ``dac_label`` (``+UID:+GID``): run QEMU with this static DAC label and let libvirt relabel
    nothing (the driver grants file access itself; see ``driver``). ``uuid``: keep an
    existing domain's identity when it is defined again.
    """
    del host  # the domain names no host binary or firmware file: libvirt picks them
    if plan.machine not in MACHINES:
        raise SpecError(f"libvirt does not support machine {plan.machine.value}",
                        field="spec.machine", hint="use q35 or pc, or hypervisor: qemu")
    root = ET.Element("domain", type="kvm" if plan.accel is Accel.KVM else "qemu")
    _sub(root, "name", plan.name)
    if uuid:
        _sub(root, "uuid", uuid)
    if plan.vmgenid:  # libvirt makes one per start, and a new one for every restore
        _sub(root, "genid")
    meta = _sub(root, "metadata")
    ET.SubElement(meta, f"{{{NS_VMFORGE}}}vm", {"name": plan.name, "vm-dir": plan.vm_dir})
    _sub(root, "memory", str(plan.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(plan.cpu_cores))
    _os(root, plan)
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _cpu(root, plan)
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    _sub(devices, "controller", type="usb", model="none")
    _storage(devices, plan)
    passthrough = _nics(devices, plan)
    _mounts(devices, plan)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=plan.console_log)
    _sub(serial, "target", port="0")
    _agent(devices, plan)
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", model="builtin")
    _sub(devices, "memballoon", model="none")
    # pvpanic, as under QEMU: a guest kernel panic reaches libvirt, which (on_crash: destroy)
    # shuts the domain off with reason "crashed"
    _sub(devices, "panic", model="isa")
    if dac_label:
        sec = _sub(root, "seclabel", type="static", model="dac", relabel="no")
        _sub(sec, "label", dac_label)
    if passthrough:
        cmd = ET.SubElement(root, f"{{{NS_QEMU}}}commandline")
        for arg in passthrough:
            ET.SubElement(cmd, f"{{{NS_QEMU}}}arg", value=arg)
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def parse_owner(metadata_xml: str) -> str | None:
    """The VM directory in a domain's ``vmforge:vm`` metadata element, or None. libvirt's
    metadata call (already scoped to :data:`NS_VMFORGE`) returns the element without its
    namespace; the whole domain XML has it."""
    try:
        el = ET.fromstring(metadata_xml)
    except ET.ParseError:
        return None
    if el.tag not in ("vm", f"{{{NS_VMFORGE}}}vm"):
        return None
    return el.get("vm-dir")
