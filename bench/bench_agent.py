"""Agent benchmarks on the minimal image (TCG here), one table:

* exec round trip of `true` over the agent (p50/p99), and a bare `ping` round trip;
* boot to agent-ready (the hello) vs the same image booting to its serial ready marker
  (what the agent costs on top of the boot).

Run: python bench/bench_agent.py [--execs N] [--boots N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, pct  # noqa: E402

from vmforge.agent.client import AgentClient  # noqa: E402
from vmforge.builders.builtin import register_minimal  # noqa: E402
from vmforge.node.manager import VmManager  # noqa: E402
from vmforge.paths import DataDir  # noqa: E402
from vmforge.spec import parse_request  # noqa: E402


async def round_trips(sock: str, n: int) -> tuple[list[float], list[float]]:
    execs, pings = [], []
    async with AgentClient(sock) as c:
        await c.wait_ready(60)
        for _ in range(5):
            await c.exec(["true"])
        for _ in range(n):
            t0 = time.perf_counter()
            res = await c.exec(["true"])
            execs.append(time.perf_counter() - t0)
            assert res.exit_code == 0
        for _ in range(n):
            t0 = time.perf_counter()
            await c.ping()
            pings.append(time.perf_counter() - t0)
    return execs, pings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--boots", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vmforge-bench-"))
    data = DataDir(tmp / "data").ensure()
    m = VmManager(data)
    try:
        register_minimal(m.library, data.cache)
        m.host()
        agent_boot, marker_boot = [], []
        for i in range(args.boots):
            for agent, sink in ((True, agent_boot), (False, marker_boot)):
                req = parse_request({"name": f"b{i}-{int(agent)}", "spec": {
                    "memory_mib": 256, "kernel": {"image": "minimal"},
                    "agent": {"enabled": agent}}})
                t0 = time.perf_counter()
                m.run(req, timeout=120)
                sink.append(time.perf_counter() - t0)
                if agent and i == 0:
                    execs, pings = asyncio.run(round_trips(m.get(req.name).agent_endpoint,
                                                           args.execs))
                m.delete(req.name, force=True, stop_timeout=0)
    finally:
        m.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nvmforge agent benchmarks (minimal image, TCG, execs n={args.execs}, "
          f"boots n={args.boots})")
    print("| measure                               | p50        | p99        |")
    print("|---------------------------------------|------------|------------|")
    print(f"| exec `true` round trip over the agent | {fmt(pct(execs, 50)):>10} | "
          f"{fmt(pct(execs, 99)):>10} |")
    print(f"| ping round trip over the agent        | {fmt(pct(pings, 50)):>10} | "
          f"{fmt(pct(pings, 99)):>10} |")
    a, b = statistics.median(agent_boot), statistics.median(marker_boot)
    print("\n| boot of the minimal image             | median     | vs marker  |")
    print("|---------------------------------------|------------|------------|")
    print(f"| launch to serial ready marker         | {fmt(b):>10} |      1.00x |")
    print(f"| launch to agent ready (hello)         | {fmt(a):>10} | {a / b:>9.2f}x |")
    print(f"agent cost on top of the boot: {fmt(a - b)}")


if __name__ == "__main__":
    main()
