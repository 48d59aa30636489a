"""Host facts, probed once and passed into the pure builders.

``/dev/kvm`` existing proves nothing: under broken nested virtualisation a kernel hangs right
after decompression. So KVM is only trusted after a real kernel booted under it, and the answer
is cached per (host kernel, QEMU version).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .. import run
from ..errors import CommandError, HostError
from .base import Accel

__all__ = ["HostFacts", "probe_host", "probe_kvm", "probe_qemu", "probe_ovmf", "probe_tsc_khz",
           "KvmVerdict", "choose_accel"]

OVMF_PAIRS = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
]


@dataclass(frozen=True)
class KvmVerdict:
    works: bool
    reason: str


@dataclass(frozen=True)
class HostFacts:
    """What the host can do. What one spec asks for is decided per VM (``choose_accel``)."""
    qemu_binary: str
    qemu_version: str
    kvm: KvmVerdict
    ovmf_code: str | None
    ovmf_vars: str | None
    tsc_khz: int | None = None
    vsock: bool = False  # /dev/vhost-vsock usable: the agent can use AF_VSOCK


def choose_accel(requested: str, host: HostFacts) -> tuple[Accel, str]:
    """The accelerator for one VM and why: ``kvm`` demands working KVM, ``tcg`` never uses it,
    ``auto`` takes KVM when the probe proved it works."""
    if requested == "tcg":
        return Accel.TCG, "TCG requested"
    if host.kvm.works:
        return Accel.KVM, host.kvm.reason
    if requested == "kvm":
        raise HostError(f"KVM was requested but does not work: {host.kvm.reason}",
                        hint="set accel: auto (or tcg) in the spec")
    return Accel.TCG, host.kvm.reason


def probe_qemu() -> tuple[str, str]:
    binary = run.require_binary("qemu-system-x86_64", "qemu-system-x86")
    out = run.run([binary, "--version"], what="qemu --version").text
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    return binary, m.group(1) if m else "unknown"


def probe_ovmf() -> tuple[str | None, str | None]:
    for code, vars_ in OVMF_PAIRS:
        if os.path.exists(code) and os.path.exists(vars_):
            return code, vars_
    return None, None


def probe_tsc_khz() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    return int(float(m.group(1)) * 1000) if m else None


def _boot_probe(qemu: str, kernel: str, timeout: float) -> KvmVerdict:
    """Boot ``kernel`` under KVM with no root fs: a working KVM panics and exits within ~1 s."""
    argv = [qemu, "-accel", "kvm", "-M", "q35", "-cpu", "host", "-m", "256", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", kernel, "-append", "console=ttyS0 panic=-1 loglevel=4"]
    try:
        res = run.run(argv, timeout=timeout, check=False, what="KVM probe")
    except CommandError as exc:
        if exc.returncode is not None:
            raise
        return KvmVerdict(False, f"a test kernel hung under KVM for {timeout:.0f}s "
                                 "(typical of broken nested virtualisation)")
    out = res.stdout.decode(errors="replace")
    if "Kernel panic" in out or "VFS" in out or "Linux version" in out:
        return KvmVerdict(True, "a test kernel booted under KVM")
    err = res.stderr.decode(errors="replace").strip()
    if "Assertion" in err or "failed to set MSR" in err:
        return KvmVerdict(False, "QEMU aborted setting up a vCPU under KVM (typical of broken "
                                 "nested virtualisation)")
    last = err.splitlines()[-1][:160] if err else f"exit code {res.returncode}"
    return KvmVerdict(False, f"QEMU could not run a guest under KVM: {last}")


def probe_kvm(qemu: str, qemu_version: str, probe_kernel: str | None, cache_dir: Path | None,
              timeout: float = 8.0) -> KvmVerdict:
    if os.environ.get("VMFORGE_ACCEL") == "tcg":
        return KvmVerdict(False, "VMFORGE_ACCEL=tcg")
    if not os.path.exists("/dev/kvm"):
        return KvmVerdict(False, "/dev/kvm does not exist (no hardware virtualisation)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmVerdict(False, "/dev/kvm is not accessible (add yourself to group kvm)")
    key = f"{platform.release()}|{qemu_version}"
    cache = cache_dir / "kvm-probe.json" if cache_dir else None
    if cache and cache.exists():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return KvmVerdict(bool(data["works"]), str(data["reason"]) + " (cached)")
        except (ValueError, KeyError):
            pass
    if not probe_kernel:
        return KvmVerdict(False, "/dev/kvm exists but KVM is unverified: no kernel to test "
                                 "it with yet (build one: vmforge image build minimal)")
    verdict = _boot_probe(qemu, probe_kernel, timeout)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "works": verdict.works,
                                     "reason": verdict.reason, "at": time.time()}))
    return verdict


def probe_host(*, probe_kernel: str | None = None, cache_dir: Path | None = None) -> HostFacts:
    qemu, version = probe_qemu()
    code, vars_ = probe_ovmf()
    verdict = probe_kvm(qemu, version, probe_kernel, cache_dir)
    return HostFacts(qemu_binary=qemu, qemu_version=version, kvm=verdict, ovmf_code=code,
                     ovmf_vars=vars_, tsc_khz=probe_tsc_khz(),
                     vsock=os.access("/dev/vhost-vsock", os.R_OK | os.W_OK))

