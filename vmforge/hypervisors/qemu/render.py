"""QEMU backend, pure part: MachinePlan + HostFacts -> argv. No I/O here.

Per-machine quirks live in :func:`machine_args` and the ``Machine`` enum, not at call sites.
"""

from __future__ import annotations

from pathlib import Path

from ...enums import Firmware, Machine
from ...errors import HostError, SpecError
from ..base import Accel
from ..host import HostFacts
from ..plan import AGENT_PORT_NAME, MachinePlan

__all__ = ["qemu_argv", "machine_args", "virtio_device", "kernel_cmdline", "qmp_socket",
           "pidfile", "qemu_log"]


def qmp_socket(plan_run_dir: str) -> str:
    return str(Path(plan_run_dir) / "qmp.sock")


def pidfile(vm_dir: str) -> str:
    return str(Path(vm_dir) / "qemu.pid")


def qemu_log(vm_dir: str) -> str:
    return str(Path(vm_dir) / "qemu.log")

_MICROVM = "microvm,x-option-roms=off,rtc=on,isa-serial=on,pit=on,pic=on"


def virtio_device(kind: str, machine: Machine) -> str:
    """microvm has no PCI bus: its virtio devices sit on virtio-mmio."""
    return f"virtio-{kind}-device" if machine is Machine.MICROVM else f"virtio-{kind}-pci"


def machine_args(plan: MachinePlan, host: HostFacts) -> list[str]:
    m = _MICROVM if plan.machine is Machine.MICROVM else plan.machine.value
    args = ["-machine", f"{m},accel={plan.accel.value}"]
    args += ["-cpu", "host" if plan.accel is Accel.KVM else "max" if plan.machine is Machine.MICROVM
             else "qemu64"]
    return args


def kernel_cmdline(plan: MachinePlan, host: HostFacts) -> str:
    if plan.kernel is None:
        return ""
    cmdline = plan.kernel.cmdline
    if plan.machine is Machine.MICROVM and host.tsc_khz and "tsc_early_khz" not in cmdline:
        # Without it the guest hangs in about half the boots calibrating the TSC.
        cmdline = f"{cmdline} tsc_early_khz={host.tsc_khz}".strip()
    return cmdline


def _cdrom_bus(machine: Machine, index: int) -> str:
    if machine is Machine.Q35:
        return f"ide.{index}"  # one AHCI port each
    return f"ide.{index // 2},unit={index % 2}"


def qemu_argv(plan: MachinePlan, host: HostFacts) -> list[str]:
    """The whole command line; QEMU daemonizes once its sockets exist (see driver.start)."""
    argv = [host.qemu_binary, "-name", f"{plan.name},debug-threads=on", "-nodefaults",
            "-no-user-config", "-display", "none", "-vga", "none"]
    argv += machine_args(plan, host)
    argv += ["-smp", str(plan.cpu_cores), "-m", str(plan.memory_mib)]
    if plan.firmware is Firmware.UEFI:
        if not host.ovmf_code or not plan.nvram:
            raise HostError("UEFI firmware requested but OVMF was not found",
                            hint="apt-get install ovmf")
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={host.ovmf_code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={plan.nvram}"]
    argv += ["-chardev", f"file,id=console,path={plan.console_log}", "-serial", "chardev:console",
             "-qmp", f"unix:{qmp_socket(plan.run_dir)},server=on,wait=off",
             "-pidfile", pidfile(plan.vm_dir), "-daemonize"]
    if plan.kernel:
        argv += ["-kernel", plan.kernel.kernel]
        if plan.kernel.initrd:
            argv += ["-initrd", plan.kernel.initrd]
        argv += ["-append", kernel_cmdline(plan, host)]
    for d in plan.disks:
        opts = f"file={d.path},if=none,id={d.id},format={d.format},discard=unmap"
        dev = f"{virtio_device('blk', plan.machine)},drive={d.id},serial={d.id[:20]}"
        if d.bootindex is not None:
            dev += f",bootindex={d.bootindex}"
        argv += ["-drive", opts, "-device", dev]
    for i, c in enumerate(plan.cdroms):
        dev = f"ide-cd,drive={c.id},bus={_cdrom_bus(plan.machine, i)}"
        if c.bootindex is not None:
            dev += f",bootindex={c.bootindex}"
        argv += ["-drive", f"file={c.path},if=none,id={c.id},media=cdrom,readonly=on,format=raw",
                 "-device", dev]
    if plan.seed:
        argv += ["-drive", f"file={plan.seed},if=none,id=cidata,format=raw,readonly=on",
                 "-device", f"{virtio_device('blk', plan.machine)},drive=cidata,serial=cidata"]
    for i, nic in enumerate(plan.nics):
        if nic.tap:  # made and plugged into its bridge by vmforge (vmforge.net) beforehand
            netdev = f"tap,id={nic.id},ifname={nic.tap},script=no,downscript=no"
        elif nic.bridge or nic.network:
            raise SpecError(f"NIC {nic.id}: QEMU needs a tap for a bridge or network NIC",
                            field="spec.nics", hint="plan it with vmforge.node.plan")
        else:
            netdev = f"user,id={nic.id}"
        for fw in nic.forwards:
            netdev += f",hostfwd={fw.protocol}:{fw.host_addr}:{fw.host_port}-:{fw.guest_port}"
        dev = f"{virtio_device('net', plan.machine)},netdev={nic.id}"
        if nic.mac:
            dev += f",mac={nic.mac}"
        if i == 0 and plan.net_bootindex is not None:
            dev += f",bootindex={plan.net_bootindex}"
        argv += ["-netdev", netdev, "-device", dev]
    agent = plan.agent
    if agent and agent.socket:
        argv += ["-chardev", f"socket,id=agent,path={agent.socket},server=on,wait=off",
                 "-device", f"{virtio_device('serial', plan.machine)},id=vser0",
                 "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}"]
    if agent and agent.cid is not None:
        kind = "vhost-vsock-device" if plan.machine is Machine.MICROVM else "vhost-vsock-pci"
        argv += ["-device", f"{kind},guest-cid={agent.cid}"]
    argv += ["-device", f"{virtio_device('rng', plan.machine)}"]
    for i, m in enumerate(plan.mounts):
        # QEMU's option syntax doubles a comma inside a value.
        fsdev = (f"local,id=mount{i},path={m.source.replace(',', ',,')},"
                 f"security_model={m.security_model}") + (",readonly=on" if m.readonly else "")
        argv += ["-fsdev", fsdev,
                 "-device", f"{virtio_device('9p', plan.machine)},fsdev=mount{i},"
                            f"mount_tag={m.tag}"]
    if plan.machine is not Machine.MICROVM:
        # The guest reports a kernel panic to QEMU (GUEST_PANICKED on QMP): a supervisor can
        # then tell a panic from a power-off. microvm has no ISA bus for it.
        argv += ["-device", "pvpanic"]
        if plan.vmgenid:  # microvm builds no ACPI table for it
            argv += ["-device", f"vmgenid,id=vmgenid0,guid={plan.vmgenid}"]
    if plan.incoming:
        # Load a saved state, then wait paused for `cont`; QEMU's own reason for a failed
        # load goes to the log (a daemonized QEMU's stderr is /dev/null).
        argv += ["-incoming", plan.incoming, "-S", "-D", qemu_log(plan.vm_dir)]
    return argv
