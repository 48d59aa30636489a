"""`vmforge doctor`: what the host has, what it lacks, and how to fix each."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from .. import run

if TYPE_CHECKING:
    from ..node.manager import VmManager


def run_doctor(m: VmManager) -> list[dict[str, Any]]:
    from ..hypervisors.host import probe_ovmf, probe_qemu

    checks: list[dict[str, Any]] = []

    def add(name: str, status: str, detail: str, fix: str = "", required: bool = False) -> None:
        checks.append({"name": name, "status": status, "detail": detail, "fix": fix,
                       "required": required})

    try:
        binary, version = probe_qemu()
        add("qemu", "ok", f"{binary} {version}", required=True)
    except Exception as exc:  # noqa: BLE001
        add("qemu", "missing", str(exc), "apt-get install qemu-system-x86", required=True)
        binary = None
    img_tool = run.find_binary("qemu-img")
    add("qemu-img", "ok" if img_tool else "missing", img_tool or "not found",
        "" if img_tool else "apt-get install qemu-utils", required=True)
    if binary:
        kvm = m.host().kvm
        add("kvm", "ok" if kvm.works else "warn",
            kvm.reason + ("" if kvm.works else "; VMs run under TCG (slower)"),
            "" if kvm.works else "enable (nested) virtualisation for this host")
    from ..hypervisors import available_backends, get_driver
    for backend in available_backends():
        if backend.value == "qemu":
            continue  # reported above in detail
        try:
            st = get_driver(backend).probe()
            add(backend.value, "ok" if st.available else "warn", st.detail, st.hint or "")
        except Exception as exc:  # noqa: BLE001 - a broken binding is a finding, not a crash
            add(backend.value, "warn", f"driver unavailable: {exc}",
                "bash scripts/install-deps.sh")
    code, _vars = probe_ovmf()
    add("ovmf (UEFI)", "ok" if code else "warn", code or "not found",
        "" if code else "apt-get install ovmf")
    for tool, pkg, why in (("busybox", "busybox-static", "minimal image (taken from the .deb)"),
                           ("apt-get", "apt", "image builders fetch Debian packages"),
                           ("dpkg-deb", "dpkg", "unpacking packages"),
                           ("debootstrap", "debootstrap", "the Debian cloud image builder"),
                           ("mkfs.ext4", "e2fsprogs", "the Debian cloud image builder")):
        path = run.find_binary(tool)
        add(tool, "ok" if path else "warn", path or f"not found ({why})",
            "" if path else f"apt-get install {pkg}")
    _network_checks(add)
    m.data.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(m.data.root).free
    add("free disk", "ok" if free > 5 * 1024**3 else "warn",
        f"{free / 1024**3:.1f} GiB free in {m.data.root}",
        "" if free > 5 * 1024**3 else "free some space or use --data-dir")
    img = m.library.find("minimal")
    add("minimal image", "ok" if img else "warn", img.ref if img else "not built",
        "" if img else "vmforge image build minimal")
    return checks


def _network_checks(add: Any) -> None:
    """What bridge and managed-network NICs need (vmforge.net); user-mode NICs need none."""
    import os
    import platform
    from pathlib import Path

    from ..net.links import has_net_admin

    why = "bridge/network NICs"
    if Path("/sys/module/bridge").exists():
        add("bridge (kernel)", "ok", "loaded")
    else:
        release = platform.release()
        found = any(Path(f"/lib/modules/{release}").rglob("bridge.ko*")) \
            if Path(f"/lib/modules/{release}").is_dir() else False
        add("bridge (kernel)", "ok" if found else "warn",
            "module available (loaded on first use)" if found else
            f"not loaded and no bridge module for kernel {release} ({why})",
            "" if found else "modprobe bridge (or a kernel with CONFIG_BRIDGE)")
    tun = Path("/dev/net/tun")
    is_char = tun.exists() and tun.is_char_device()
    add("/dev/net/tun", "ok" if is_char else "warn",
        "present" if is_char else f"missing (taps for {why})",
        "" if is_char else "modprobe tun (in a container: mknod /dev/net/tun c 10 200)")
    for tool, pkg, what in (("ip", "iproute2", "bridges and taps"),
                            ("dnsmasq", "dnsmasq-base", "DHCP and DNS of managed networks"),
                            ("nft", "nftables", "NAT and isolation of managed networks")):
        path = run.find_binary(tool)
        add(tool, "ok" if path else "warn", path or f"not found ({what})",
            "" if path else f"apt-get install {pkg}")
    admin = has_net_admin()
    add("CAP_NET_ADMIN", "ok" if admin else "warn",
        "can create bridges and taps" if admin else
        f"missing: {why} need it (user-mode NICs do not)",
        "" if admin else "run vmforge as root" + (" (sudo)" if os.geteuid() else ""))
