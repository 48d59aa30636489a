"""Create-to-agent-ready, whole command as a user runs it, side by side on the same image:

* `vmforge run -f spec` with `hypervisor: qemu` (vmforge starts QEMU itself)
* `vmforge run -f spec` with `hypervisor: libvirt` (the same spec; libvirt owns the domain)
* `virt-install --import ... --noautoconsole` booting the same kernel + initrd (minimal) or
  the same disk with `--cloud-init` (debian, through the image's own GRUB: what virt-install
  users do; vmforge boots the kernel stored beside the image by default), with the same agent
  channel and the same user-data (agent included); the clock stops at the agent's hello and
  cloud-init done on that channel, the point `vmforge run` returns at.

Needs a libvirtd answering at $VMFORGE_LIBVIRT_URI (default qemu:///system); started here
(and stopped by pid) when none answers. Run: python bench/bench_libvirt.py [--runs N] [--cloud]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt  # noqa: E402

from vmforge.agent.client import AgentClient  # noqa: E402
from vmforge.builders.builtin import register_debian, register_minimal  # noqa: E402
from vmforge.node.manager import VmManager  # noqa: E402
from vmforge.paths import DataDir  # noqa: E402

URI = os.environ.get("VMFORGE_LIBVIRT_URI", "qemu:///system")


def libvirt_answers() -> bool:
    return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True).returncode == 0


def start_libvirtd(tmp: Path) -> list[int]:
    pids = []
    for name in ("virtlogd", "libvirtd"):
        pidfile = tmp / f"{name}.pid"
        subprocess.run([name, "-d", "-p", str(pidfile)], check=True)
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        pids.append(int(pidfile.read_text()))
    for _ in range(300):
        if libvirt_answers():
            break
        time.sleep(0.1)
    return pids


def vf(data: DataDir, *args: str) -> None:
    env = dict(os.environ, VMFORGE_HOME=str(data.root), VMFORGE_LIBVIRT_URI=URI)
    subprocess.run([sys.executable, "-m", "vmforge", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def time_vmforge(data: DataDir, tmp: Path, name: str, hv: str, spec: dict[str, object]
                 ) -> float:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "spec": {**spec, "hypervisor": hv}}))
    t0 = time.perf_counter()
    vf(data, "run", "-f", str(path))
    took = time.perf_counter() - t0
    vf(data, "rm", "-f", name)
    return took


async def _hello(sock: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():  # libvirt creates it when QEMU starts
        if time.monotonic() > deadline:
            raise TimeoutError(f"no agent socket {sock}")
        await asyncio.sleep(0.01)
    async with AgentClient(str(sock)) as c:
        await c.wait_ready(timeout)
        await c.wait_cloud_init(timeout)


def time_virt_install(name: str, args: list[str], sock: Path, timeout: float) -> float:
    argv = ["virt-install", "--connect", URI, "--name", name, "--virt-type", "qemu",
            "--osinfo", "linux2022", "--import", "--noautoconsole", "--graphics", "none",
            "--network", "user", "--channel",
            f"unix,mode=bind,path={sock},target.type=virtio,target.name=org.vmforge.agent.0",
            *args]
    t0 = time.perf_counter()
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
        asyncio.run(_hello(sock, timeout))
        return time.perf_counter() - t0
    finally:
        subprocess.run(["virsh", "-c", URI, "destroy", name], capture_output=True)
        subprocess.run(["virsh", "-c", URI, "undefine", name, "--nvram"], capture_output=True)


def row(work: str, samples: dict[str, list[float]]) -> None:
    q, lv, vi = (statistics.median(samples[k]) for k in ("qemu", "libvirt", "virt-install"))
    print(f"| {work:34} | {fmt(q):>13} | {fmt(lv):>15} | {fmt(vi):>14} | "
          f"{vi / lv:>17.2f}x | {vi / q:>15.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cloud", action="store_true", help="also the Debian cloud image (slow)")
    args = ap.parse_args()
    if shutil.which("virt-install") is None:
        sys.exit("virt-install is not installed (apt-get install virtinst)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-libvirt-"))
    public = Path(tempfile.mkdtemp(prefix="bench-virtinst-", dir="/var/tmp"))
    public.chmod(0o755)  # virt-install's domain runs as libvirt-qemu: its files must be readable
    daemons = [] if libvirt_answers() else start_libvirtd(tmp)
    data = DataDir(tmp / "data").ensure()
    m = VmManager(data)
    try:
        img = register_minimal(m.library, data.cache)
        kernel, initrd = public / "vmlinux", public / "initrd"
        shutil.copyfile(str(img.path("vmlinux")), kernel)
        shutil.copyfile(str(img.path("initrd")), initrd)
        for f in (kernel, initrd):
            f.chmod(0o644)
        spec = {"memory_mib": 256, "kernel": {"image": "minimal"}}
        samples: dict[str, list[float]] = {"qemu": [], "libvirt": [], "virt-install": []}
        for i in range(args.runs):
            samples["qemu"].append(time_vmforge(data, tmp, f"bq{i}", "qemu", spec))
            samples["libvirt"].append(time_vmforge(data, tmp, f"bl{i}", "libvirt", spec))
            samples["virt-install"].append(time_virt_install(
                f"bench-vi-{os.getpid()}-{i}",
                ["--memory", "256", "--vcpus", "1", "--disk", "none", "--boot",
                 f"kernel={kernel},initrd={initrd},"
                 f"kernel_args={img.cmdline} vmforge.id=bench-vi"],
                public / f"agent-{i}.sock", 120))
        print("\ncreate to agent ready, whole command (TCG, medians of "
              f"{args.runs}); ratio > 1: vmforge faster")
        print(f"| {'image':34} | {'vmforge qemu':>13} | {'vmforge libvirt':>15} | "
              f"{'virt-install':>14} | {'virt-inst/libvirt':>17} | {'virt-inst/qemu':>15} |")
        print("|" + "-" * 36 + "|" + "-" * 15 + "|" + "-" * 17 + "|" + "-" * 16 + "|"
              + "-" * 19 + "|" + "-" * 17 + "|")
        row("minimal (direct kernel, 256 MiB)", samples)
        if args.cloud:
            deb = register_debian(m.library, data.cache, "debian")
            disk = public / "debian.qcow2"
            shutil.copyfile(str(deb.path("disk")), disk)
            disk.chmod(0o644)
            from vmforge.agent import guest
            from vmforge.seed import build_seed, inject_agent
            from vmforge.spec import CloudInit
            ud = "#cloud-config\nhostname: bench\n"
            seed = inject_agent(build_seed("bench", CloudInit(user_data=ud)),
                                Path(guest.__file__).read_bytes())
            (public / "user-data").write_bytes(seed.user_data)
            cloud = {"cpu_cores": 2, "memory_mib": 1024, "cloud_init": {"user_data": ud},
                     "disks": [{"id": "root", "bootable": True, "image": deb.ref}]}
            csamples: dict[str, list[float]] = {"qemu": [], "libvirt": [], "virt-install": []}
            csamples["qemu"].append(time_vmforge(data, tmp, "cq", "qemu", cloud))
            csamples["libvirt"].append(time_vmforge(data, tmp, "cl", "libvirt", cloud))
            overlay = public / "vi-overlay.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                            str(disk), str(overlay)], check=True)
            overlay.chmod(0o666)
            csamples["virt-install"].append(time_virt_install(
                f"bench-vic-{os.getpid()}",
                ["--memory", "1024", "--vcpus", "2", "--machine", "pc",
                 "--disk", f"{overlay},bus=virtio", "--boot", "hd",
                 "--cloud-init", f"user-data={public / 'user-data'}"],
                public / "agent-cloud.sock", 600))
            row("debian cloud image (cloud-init)", csamples)
    finally:
        m.close()
        for pid in reversed(daemons):
            subprocess.run(["kill", str(pid)])
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(public, ignore_errors=True)


if __name__ == "__main__":
    main()
