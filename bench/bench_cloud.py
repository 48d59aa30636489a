"""Cloud-image benchmarks on the Debian image built here (TCG), one table:

* boot to cloud-init done: vmforge (`vmforge run`: its seed, then ready = agent hello and
  cloud-init finished, read by the agent from /run/cloud-init) vs the same image with a
  `cloud-localds` seed booted by a bare qemu command, polling `cloud-init status --wait`
  over ssh;
* exec round trip over the agent vs `ssh -p PORT host true` on the same guest (target: the
  agent at least 20x faster);
* copy of 100 MiB into the guest: `vmforge cp` vs `scp`.

Run: python bench/bench_cloud.py [--boots N] [--execs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, table  # noqa: E402

from vmforge.agent.client import AgentClient  # noqa: E402
from vmforge.builders.builtin import register_debian  # noqa: E402
from vmforge.images import qcow2  # noqa: E402
from vmforge.node.manager import VmManager  # noqa: E402
from vmforge.paths import DataDir  # noqa: E402
from vmforge.spec import parse_request  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_data(pub: str) -> str:
    return ("#cloud-config\nhostname: bench\nusers:\n  - name: bench\n"
            "    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/bash\n"
            f"    ssh_authorized_keys: ['{pub}']\n")


def ssh_argv(key: Path, port: int) -> list[str]:
    return ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=5", "bench@127.0.0.1"]


def wait_ssh_cloud_init(key: Path, port: int, t0: float, proc: subprocess.Popen[bytes]) -> float:
    while time.perf_counter() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError("bare qemu exited")
        res = subprocess.run(ssh_argv(key, port) + ["cloud-init status --wait"],
                             capture_output=True, text=True)
        if res.returncode == 0 and "done" in res.stdout:
            return time.perf_counter() - t0
        time.sleep(1)
    raise RuntimeError("cloud-init did not finish over ssh")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=1)
    ap.add_argument("--execs", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vmforge-bench-"))
    data = DataDir(tmp / "data").ensure()
    m = VmManager(data)
    key = tmp / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = (tmp / "id.pub").read_text().strip()
    big = tmp / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    ours_boot, bare_boot = [], []
    try:
        img = register_debian(m.library, data.cache, "debian")
        m.host()
        for i in range(args.boots):
            port = free_port()
            req = parse_request({"name": f"c{i}", "spec": {
                "cpu_cores": 2, "memory_mib": 1024,
                "disks": [{"id": "root", "bootable": True, "image": img.ref}],
                "nics": [{"id": "net0", "forwards": [{"host_port": port, "guest_port": 22}]}],
                "cloud_init": {"user_data": user_data(pub)}}})
            t0 = time.perf_counter()
            rec = m.run(req, timeout=600)  # ready = agent hello and cloud-init finished
            ours_boot.append(time.perf_counter() - t0)
            if i == 0:
                execs, sshs, cps, scps = same_guest(rec.agent_endpoint, key, port, big, args.execs)
            m.delete(req.name, force=True, stop_timeout=0)

            # The same image, a cloud-localds seed, a bare qemu command, ssh polling.
            (tmp / "ud").write_text(user_data(pub))
            (tmp / "md").write_text(f"instance-id: bare{i}\nlocal-hostname: bare\n")
            subprocess.run(["cloud-localds", str(tmp / "seed.iso"), str(tmp / "ud"),
                            str(tmp / "md")], check=True)
            ov = tmp / f"bare{i}.qcow2"
            qcow2.create_overlay(img.path("disk"), ov, 4 << 30, "qcow2")  # type: ignore[arg-type]
            port = free_port()
            argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "qemu64",
                    "-smp", "2", "-m", "1024", "-nodefaults", "-display", "none",
                    "-kernel", str(img.path("kernel")), "-initrd", str(img.path("initrd")),
                    "-append", img.cmdline or "", "-serial", "null",
                    "-drive", f"file={ov},if=virtio,format=qcow2",
                    "-drive", f"file={tmp / 'seed.iso'},if=virtio,format=raw,readonly=on",
                    "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
                    "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            try:
                bare_boot.append(wait_ssh_cloud_init(key, port, t0, proc))
            finally:
                proc.kill()
                proc.wait()
    finally:
        m.close()
        shutil.rmtree(tmp, ignore_errors=True)
    table(f"vmforge cloud-image benchmarks (Debian image, TCG, boots n={args.boots}, "
          f"execs n={args.execs})", [
              ("boot to cloud-init done", ours_boot, "cloud-localds + bare qemu", bare_boot,
               "report"),
              ("exec `true` round trip", execs, "ssh -p PORT host true", sshs, ">= 20x faster"),
              ("copy 100 MiB into the guest", cps, "scp", scps, "report"),
          ])
    print(f"(agent exec p50 {fmt(statistics.median(execs))}; ssh p50 "
          f"{fmt(statistics.median(sshs))})")


def same_guest(sock: str, key: Path, port: int, big: Path, n: int
               ) -> tuple[list[float], list[float], list[float], list[float]]:
    async def agent_side() -> tuple[list[float], list[float]]:
        execs, cps = [], []
        async with AgentClient(sock) as c:
            for _ in range(3):
                await c.exec(["true"])
            for _ in range(n):
                t0 = time.perf_counter()
                await c.exec(["true"])
                execs.append(time.perf_counter() - t0)
            for _ in range(2):
                t0 = time.perf_counter()
                await c.put_file(big, "/var/tmp/big.agent")
                cps.append(time.perf_counter() - t0)
        return execs, cps
    execs, cps = asyncio.run(agent_side())
    sshs, scps = [], []
    subprocess.run(ssh_argv(key, port) + ["true"], check=True)
    for _ in range(max(5, n // 5)):
        t0 = time.perf_counter()
        subprocess.run(ssh_argv(key, port) + ["true"], check=True)
        sshs.append(time.perf_counter() - t0)
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(["scp", "-q", "-i", str(key), "-P", str(port), "-o",
                        "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "LogLevel=ERROR", str(big), "bench@127.0.0.1:/var/tmp/big.scp"],
                       check=True)
        scps.append(time.perf_counter() - t0)
    return execs, sshs, cps, scps


if __name__ == "__main__":
    main()
