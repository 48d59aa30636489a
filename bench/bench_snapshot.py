"""Snapshots, restores and warm pools, side by side with a cold boot of the same VM, one table:

* cold boot to agent ready (``vmforge run``: create, start, kernel, init, cloud-init, hello);
* snapshot (the VM's pause, and the whole command);
* restore to agent ready (``run --from-snapshot``: overlays, QEMU ``-incoming``, ``cont``,
  the agent's hello and its identity refresh), from the library call and as a command;
* pool take (a ready member renamed and its identity refreshed), from the library call and as
  a command (``vmforge pool take``: Python start-up included).

For the minimal image and (unless --no-debian) the Debian cloud image, in one run. Targets
(issue 12): restore at most a tenth of the cold boot; pool take under 100 ms.

Run: python bench/bench_snapshot.py [--boots N] [--restores N] [--takes N] [--no-debian]
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt  # noqa: E402

from vmforge.builders.builtin import register_minimal  # noqa: E402
from vmforge.node import pools, restore, snapshots  # noqa: E402
from vmforge.node.manager import VmManager  # noqa: E402
from vmforge.node.states import VmState  # noqa: E402
from vmforge.paths import DataDir  # noqa: E402
from vmforge.spec import parse_request  # noqa: E402


def cli(data: DataDir, *args: str) -> float:
    env = dict(os.environ, VMFORGE_HOME=str(data.root), NO_COLOR="1")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "vmforge", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"vmforge {' '.join(args)} failed: {res.stderr}")
    return took


def wait_ready(m: VmManager, pool: str, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while sum(r.state is VmState.RUNNING for r in pools.members(m, pool)) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"pool {pool} did not refill")
        time.sleep(0.1)


def measure(m: VmManager, data: DataDir, label: str, spec: dict[str, Any], args: Any,
            boots: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in (
        "cold", "paused", "snapshot", "restore", "restore_cmd", "take", "take_cmd")}
    tag = label.split()[0].lower()
    for i in range(boots):
        name = f"{tag}-cold{i}"
        rec = asyncio.run(m.run(parse_request({"name": name, "spec": spec}), timeout=600))
        out["cold"].append(rec.boot_seconds or 0.0)
        if i < boots - 1:
            asyncio.run(m.delete(name, force=True, stop_timeout=0))
    t0 = time.perf_counter()
    snap = snapshots.create(m, f"{tag}-cold{boots - 1}", f"{tag}-bench", stop=True)
    out["snapshot"].append(time.perf_counter() - t0)
    out["paused"].append(float(snap.meta["paused_seconds"]))
    asyncio.run(m.delete(f"{tag}-cold{boots - 1}", force=True, stop_timeout=0))
    for i in range(args.restores):
        name = f"{tag}-r{i}"
        rec = asyncio.run(restore.restore(m, snap.ref, name))
        out["restore"].append(rec.boot_seconds or 0.0)
        asyncio.run(m.delete(name, force=True, stop_timeout=0))
        out["restore_cmd"].append(cli(data, "run", "--from-snapshot", snap.ref, "--name",
                                      f"{name}c"))
        asyncio.run(m.delete(f"{name}c", force=True, stop_timeout=0))
    pool = f"{tag}-pool"
    asyncio.run(pools.create_pool(m, pool, 1, snapshot_ref=snap.ref))
    try:
        for i in range(args.takes):
            for how in ("lib", "cmd"):
                wait_ready(m, pool, 1)
                name = f"{tag}-t{i}{how}"
                if how == "lib":
                    t0 = time.perf_counter()
                    asyncio.run(pools.take(m, pool, name))
                    out["take"].append(time.perf_counter() - t0)
                else:
                    out["take_cmd"].append(cli(data, "pool", "take", pool, "--name", name))
                asyncio.run(m.delete(name, force=True, stop_timeout=0))
    finally:
        asyncio.run(pools.remove_pool(m, pool))
    snapshots.remove(m, snap.ref)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--restores", type=int, default=5)
    ap.add_argument("--takes", type=int, default=5)
    ap.add_argument("--no-debian", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vmforge-bench-"))
    data = DataDir(tmp / "data").ensure()
    m = VmManager(data)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        register_minimal(m.library, data.cache)
        m.host()
        results["minimal (256 MiB)"] = measure(
            m, data, "minimal (256 MiB)",
            {"memory_mib": 256, "kernel": {"image": "minimal"},
             "disks": [{"id": "data", "size_gib": 1}]}, args, args.boots)
        if not args.no_debian:
            from vmforge.builders.builtin import register_debian
            img = register_debian(m.library, data.cache, "debian")
            results["debian (1 GiB, cloud-init)"] = measure(
                m, data, "debian (1 GiB, cloud-init)",
                {"cpu_cores": 2, "memory_mib": 1024,
                 "disks": [{"id": "root", "bootable": True, "image": img.ref}]},
                args, 1)
    finally:
        for rec in m.vms():
            asyncio.run(m.delete(rec.name, force=True, stop_timeout=0))
        for p in pools.all_pools(m):
            asyncio.run(pools.remove_pool(m, p.name))
        m.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nvmforge snapshots, restores and warm pools (TCG; medians; boots n={args.boots} "
          f"minimal / 1 debian, restores n={args.restores}, takes n={args.takes})")
    rows = (("cold boot -> agent ready", "cold"),
            ("snapshot: VM paused", "paused"),
            ("snapshot: whole call", "snapshot"),
            ("restore -> agent ready (library)", "restore"),
            ("run --from-snapshot (command)", "restore_cmd"),
            ("pool take (library)", "take"),
            ("pool take (command)", "take_cmd"))
    head = f"| {'':34} |" + "".join(f" {label:>26} | {'cold/x':>7} |" for label in results)
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for title, key in rows:
        line = f"| {title:34} |"
        for res in results.values():
            med = statistics.median(res[key])
            cold = statistics.median(res["cold"])
            line += f" {fmt(med):>26} | {cold / med:>6.1f}x |"
        print(line)
    print("targets: restore <= cold boot / 10; pool take < 100 ms")


if __name__ == "__main__":
    main()
