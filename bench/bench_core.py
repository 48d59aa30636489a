"""Core benchmarks, one table, vmforge beside the standard tool on the same work:

* NoCloud seed ISO: vmforge in-process (validate + its ISO 9660 writer) vs `cloud-localds`
* NoCloud seed vfat: vmforge in-process (FAT12 writer) vs `cloud-localds -f vfat`
* per-VM overlay: vmforge create_overlay vs `qemu-img create -b`
* launch to ready: vmforge (create + start + ready marker) vs the bare `qemu-system-x86_64`
  command booting the same kernel + initrd to the same serial marker.

Run: python bench/bench_core.py [--boots N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, timed  # noqa: E402

from vmforge.builders.builtin import register_minimal  # noqa: E402
from vmforge.builders.minimal import READY_MARKER  # noqa: E402
from vmforge.images import qcow2  # noqa: E402
from vmforge.node.manager import VmManager  # noqa: E402
from vmforge.paths import DataDir  # noqa: E402
from vmforge.seed import build_seed, write_iso, write_vfat  # noqa: E402
from vmforge.spec import CloudInit, parse_request  # noqa: E402

USER = "#cloud-config\nhostname: bench\nusers:\n  - name: dev\n    sudo: ALL=(ALL) ALL\n"
META = "instance-id: bench\nlocal-hostname: bench\n"


def bench_seed(tmp: Path, n: int) -> tuple[list[float], list[float]]:
    (tmp / "ud").write_text(USER)
    (tmp / "md").write_text(META)

    # Each run writes a new file, as each VM's seed goes into a new VM directory (on ext4,
    # overwriting an existing file costs a data flush that would swamp both sides).
    counter = iter(range(10**9))

    def ours() -> None:
        write_iso(build_seed("bench", CloudInit(user_data=USER, meta_data=META)),
                  tmp / f"vmforge-{next(counter)}.iso")

    def theirs() -> None:
        subprocess.run(["cloud-localds", str(tmp / f"tool-{next(counter)}.iso"),
                        str(tmp / "ud"), str(tmp / "md")], check=True)
    return timed(ours, n), timed(theirs, n)


def bench_vfat(tmp: Path, n: int) -> tuple[list[float], list[float]]:
    (tmp / "ud").write_text(USER)
    (tmp / "md").write_text(META)
    counter = iter(range(10**9))

    def ours() -> None:
        write_vfat(build_seed("bench", CloudInit(user_data=USER, meta_data=META)),
                   tmp / f"vmforge-{next(counter)}.img")

    def theirs() -> None:
        subprocess.run(["cloud-localds", "-f", "vfat", str(tmp / f"tool-{next(counter)}.img"),
                        str(tmp / "ud"), str(tmp / "md")], check=True)
    return timed(ours, n), timed(theirs, n)


def bench_overlay(tmp: Path, n: int) -> tuple[list[float], list[float]]:
    base = qcow2.create_blank(tmp / "base.qcow2", 2 * qcow2.GIB)

    def ours() -> None:
        (tmp / "o1.qcow2").unlink(missing_ok=True)
        qcow2.create_overlay(base, tmp / "o1.qcow2", 10 * qcow2.GIB, backing_format="qcow2")

    def theirs() -> None:
        (tmp / "o2.qcow2").unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(base), str(tmp / "o2.qcow2"), "10G"], check=True)
    return timed(ours, n), timed(theirs, n)


def bench_boot(tmp: Path, n: int) -> tuple[list[float], list[float]]:
    data = DataDir(tmp / "data").ensure()
    m = VmManager(data)
    img = register_minimal(m.library, data.cache)
    m.host()  # probe once (cached), as any real use would have
    ours, theirs = [], []
    for i in range(n):
        req = parse_request({"name": f"b{i}", "spec": {"memory_mib": 256,
                                                       "kernel": {"image": "minimal"},
                                                       "agent": {"enabled": False}}})
        t0 = time.perf_counter()
        m.run(req, timeout=120)
        ours.append(time.perf_counter() - t0)
        m.delete(req.name, force=True, stop_timeout=0)

        log = tmp / "bare.log"
        log.write_bytes(b"")
        argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "qemu64", "-m", "256",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-kernel", str(img.path("vmlinux")), "-initrd", str(img.path("initrd")),
                "-append", f"{img.cmdline} vmforge.id=bare", "-chardev",
                f"file,id=c,path={log}", "-serial", "chardev:c",
                "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                "-device", "virtio-rng-pci"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            while READY_MARKER.encode() not in log.read_bytes():
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError("bare qemu did not reach the marker")
                time.sleep(0.02)
            theirs.append(time.perf_counter() - t0)
        finally:
            proc.kill()
            proc.wait()
    m.close()
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("-n", type=int, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vmforge-bench-"))
    try:
        s_ours, s_tool = bench_seed(tmp, args.n)
        v_ours, v_tool = bench_vfat(tmp, args.n)
        o_ours, o_tool = bench_overlay(tmp, args.n)
        b_ours, b_tool = bench_boot(tmp, args.boots)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table(f"vmforge core benchmarks (seed/overlay n={args.n}, boots n={args.boots}, TCG)", [
        ("NoCloud seed ISO", s_ours, "cloud-localds", s_tool, ">= 20x faster"),
        ("NoCloud seed vfat", v_ours, "cloud-localds -f vfat", v_tool, "report"),
        ("qcow2 overlay on a backing image", o_ours, "qemu-img create -b", o_tool, "report"),
        ("launch to ready marker (minimal)", b_ours, "bare qemu-system-x86_64", b_tool,
         "vmforge <= 1.05x"),
    ])
    print("\ntool/vmforge > 1 means vmforge is faster; for the launch row vmforge/tool = "
          f"{sorted(b_ours)[len(b_ours) // 2] / sorted(b_tool)[len(b_tool) // 2]:.3f}x")


if __name__ == "__main__":
    main()
