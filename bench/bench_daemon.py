"""The node daemon against the CLI on the same work: time from POST /v1/vms to ready vs
`vmforge run`; exec round trip of `true` over the API (kept-alive connection) vs
`vmforge exec` vs the library's agent client; creates per second with boot excluded.

The minimal image has no sshd (kernel + busybox + python + agent), so `ssh` is not a row: the
agent client without HTTP is the floor an ssh round trip would be compared with
(bench_cloud.py compares agent and ssh on the Debian image). One VM boots at a time.

    .venv/bin/python bench/bench_daemon.py [--boots 3] [--execs 200] [--creates 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import fmt, pct  # noqa: E402
from vmforge.agent.client import AgentClient  # noqa: E402
from vmforge.builders.builtin import register_minimal  # noqa: E402
from vmforge.client import Client  # noqa: E402
from vmforge.node.manager import VmManager  # noqa: E402
from vmforge.paths import DataDir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = "name: {name}\nspec:\n  cpu_cores: 1\n  memory_mib: 256\n  kernel: {{image: minimal}}\n"


def request(name: str) -> dict[str, object]:
    return {"name": name, "spec": {"cpu_cores": 1, "memory_mib": 256,
                                   "kernel": {"image": "minimal"}}}


def cli(env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(ROOT / ".venv/bin/vmforge"), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def row(work: str, samples: list[float], note: str = "") -> tuple[str, str, str, str, str]:
    return (work, fmt(pct(samples, 50)), fmt(pct(samples, 99)), str(len(samples)), note)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--cli-execs", type=int, default=20)
    ap.add_argument("--creates", type=int, default=40)
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="vmforge-bench-daemon-"))
    data = DataDir(home).ensure()
    m = VmManager(data)
    register_minimal(m.library, data.cache)
    m.close()
    env = {**os.environ, "VMFORGE_HOME": str(home)}
    sock = home / "vmforge.sock"
    log = open(home / "daemon.log", "wb")  # noqa: SIM115 - closed at the end
    daemon = subprocess.Popen([sys.executable, "-m", "vmforge", "serve", "--no-access-log",
                               "--log-level", "warning"], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    rows = []
    try:
        c = Client(f"unix://{sock}", timeout=300)
        deadline = time.monotonic() + 30
        while True:
            try:
                c.vms()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

        # 1. create to ready: POST ?wait=ready vs `vmforge run`, alternating, one at a time
        api_boot, cli_boot = [], []
        spec_file = home / "spec.yaml"
        for i in range(args.boots):
            t0 = time.perf_counter()
            c.create(request(f"api-{i}"), wait="ready")
            api_boot.append(time.perf_counter() - t0)
            c.delete(f"api-{i}", force=True, stop_timeout=0)
            spec_file.write_text(SPEC.format(name=f"cli-{i}"))
            cli_boot.append(cli(env, "run", "-f", str(spec_file)))
            cli(env, "rm", "-f", f"cli-{i}")
        rows.append(row("create→ready: POST /v1/vms?wait=ready", api_boot, "unix socket"))
        rows.append(row("create→ready: vmforge run (CLI)", cli_boot, "process start included"))

        # 2. exec `true` round trips on one VM
        c.create(request("bench-exec"), wait="ready")
        c.exec("bench-exec", ["true"])  # warm
        api = []
        for _ in range(args.execs):
            t0 = time.perf_counter()
            res = c.exec("bench-exec", ["true"])
            api.append(time.perf_counter() - t0)
            assert res.exit_code == 0
        rows.append(row("exec true: API (kept-alive, NDJSON)", api, "unix socket"))
        time.sleep(1.5)  # the daemon lets go of the agent channel after 1 s idle
        cli_exec = [cli(env, "exec", "bench-exec", "--", "true")
                    for _ in range(args.cli_execs)]
        rows.append(row("exec true: vmforge exec (CLI)", cli_exec, "process start included"))
        endpoint = c.get("bench-exec")["agent"]

        async def direct() -> list[float]:
            out = []
            async with AgentClient(endpoint) as ac:
                await ac.exec(["true"])
                for _ in range(args.execs):
                    t0 = time.perf_counter()
                    await ac.exec(["true"])
                    out.append(time.perf_counter() - t0)
            return out
        rows.append(row("exec true: agent client (library)", asyncio.run(direct()),
                        "no HTTP; the floor (no sshd in minimal)"))

        # concurrency: 8 clients at once on the VM's one shared agent session
        conc: list[float] = []

        def worker() -> None:
            with Client(f"unix://{sock}") as cc:
                for _ in range(args.execs // 8):
                    t0 = time.perf_counter()
                    cc.exec("bench-exec", ["true"])
                    conc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ts = [threading.Thread(target=worker) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        rows.append(row("exec true: API, 8 clients at once", conc,
                        f"{len(conc) / wall:.0f} execs/s in all"))
        c.delete("bench-exec", force=True, stop_timeout=0)

        # 3. creates per second, boot excluded
        names = [f"c-{i}" for i in range(args.creates)]
        seq = []
        t0 = time.perf_counter()
        for n in names:
            t1 = time.perf_counter()
            c.create(request(n), start=False)
            seq.append(time.perf_counter() - t1)
        rate_seq = len(names) / (time.perf_counter() - t0)
        rows.append(row("create ?start=false, one client", seq, f"{rate_seq:.1f} creates/s"))
        dels = []
        for n in names:
            t1 = time.perf_counter()
            c.delete(n)
            dels.append(time.perf_counter() - t1)
        rows.append(row("delete (created VM)", dels, f"{len(dels) / sum(dels):.1f} deletes/s"))
        par: list[float] = []

        def creator(chunk: list[str]) -> None:
            with Client(f"unix://{sock}") as cc:
                for n in chunk:
                    t1 = time.perf_counter()
                    cc.create(request(n), start=False)
                    par.append(time.perf_counter() - t1)
        t0 = time.perf_counter()
        ts = [threading.Thread(target=creator, args=(names[i::8],)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rate_par = len(names) / (time.perf_counter() - t0)
        rows.append(row("create ?start=false, 8 clients", par,
                        f"{rate_par:.1f} creates/s (target ≥ 5/s)"))
        for n in names:
            c.delete(n)
        # the seed-002 shape: an overlay on a backing file and a cidata ISO
        backing = home / "base.raw"
        with open(backing, "wb") as f:
            f.truncate(64 << 20)
        full: list[float] = []
        t0 = time.perf_counter()
        for n in names:
            req = request(n)
            req["spec"] = {**req["spec"],  # type: ignore[dict-item]
                           "disks": [{"id": "root", "size_gib": 4,
                                      "backing_file": str(backing)}],
                           "cloud_init": {"user_data": f"#cloud-config\nhostname: {n}\n"}}
            t1 = time.perf_counter()
            c.create(req, start=False)
            full.append(time.perf_counter() - t1)
        rate_full = len(names) / (time.perf_counter() - t0)
        rows.append(row("create ?start=false, overlay + seed ISO", full,
                        f"{rate_full:.1f} creates/s"))
        for n in names:
            c.delete(n)
        c.close()
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()
        m2 = VmManager(data)
        for r in m2.vms():
            asyncio.run(m2.delete(r.name, force=True, stop_timeout=0))
        m2.close()
        shutil.rmtree(home, ignore_errors=True)

    print("\nnode daemon vs CLI (minimal image, TCG, 1 vCPU, 256 MiB; noisy 2-core machine)")
    head = ("work", "p50", "p99", "n", "note")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))
              + " |")


if __name__ == "__main__":
    main()
