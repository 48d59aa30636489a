"""Guest-to-guest TCP over a managed network's bridge vs over QEMU user-mode networking (the
same two minimal VMs, one run), one table:

* bulk transfer: seconds to send ``--mib`` MiB from VM a to VM b (a sink that counts);
* round trip: 1-byte request/response over one TCP connection (p50 and p99).

Over the bridge, a connects to b's address on the network. Over user-mode networking there is
no path between two guests but through the host: a connects to 10.0.2.2 (its slirp's host
alias), which reaches b's forwarded port on the host's loopback. Each VM has both NICs.

Needs root (a network namespace of its own, a bridge, taps, dnsmasq): everything runs inside
that namespace (this script re-runs itself there), and it is deleted at the end.

Run: python bench/bench_net.py [--mib N] [--rounds N] [--trips N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, pct, table  # noqa: E402

SUBNET = "10.90.0.0/24"
A_IP, B_IP = "10.90.0.21", "10.90.0.22"
SINK, ECHO = 5001, 5002

# Runs in guest b (the minimal image's python: socket and threads only).
SERVER = """
import socket, threading
def sink(c):
    n = 0
    while True:
        d = c.recv(1 << 16)
        if not d: break
        n += len(d)
    c.sendall(str(n).encode()); c.close()
def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d: break
        c.sendall(d)
    c.close()
def serve(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(8)
    while True:
        c, _ = s.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(SINK_PORT, sink), daemon=True).start()
serve(ECHO_PORT, echo)
""".replace("SINK_PORT", str(SINK)).replace("ECHO_PORT", str(ECHO))

# Runs in guest a: prints the transfer's seconds, or the round trips' seconds.
CLIENT = """
import socket, sys, time
host, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port), timeout=60)
if mode == "bulk":
    buf = b"x" * (1 << 16)
    t0 = time.perf_counter()
    for _ in range(n * 16):
        s.sendall(buf)
    s.shutdown(socket.SHUT_WR)
    got = int(s.recv(64))
    assert got == n << 20, got
    print(time.perf_counter() - t0)
else:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for _ in range(n):
        t0 = time.perf_counter(); s.sendall(b"x"); s.recv(64)
        out.append(time.perf_counter() - t0)
    print(" ".join(map(str, out)))
"""


def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("bench_net needs root and iproute2 (a network namespace of its own)")
        return 2
    ns = f"vmforge-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inner",
                               *sys.argv[1:]]).returncode
    finally:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in out.stdout.split():  # only what this run started in its namespace
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], check=False)


async def guest(m: object, name: str, argv: list[str], timeout: float = 600) -> str:
    from vmforge.node.manager import VmManager
    assert isinstance(m, VmManager)
    async with m.agent(name) as c:
        res = await c.exec(argv, timeout=timeout)
    assert res.exit_code == 0, (argv[:3], res.stderr.decode()[-2000:])
    return str(res.stdout.decode())


async def measure(m: object, args: argparse.Namespace) -> dict[str, tuple[list[float],
                                                                           list[float]]]:
    await guest(m, "b", ["sh", "-c", f"python3 -S -c '{SERVER}' </dev/null >/dev/null 2>&1 &"])
    time.sleep(2)  # the server's python starts (seconds under TCG)
    paths = {"bridge": (B_IP, SINK, ECHO), "user": ("10.0.2.2", args.sink_fwd, args.echo_fwd)}
    bulk: dict[str, list[float]] = {"bridge": [], "user": []}
    rtt: dict[str, list[float]] = {"bridge": [], "user": []}
    for _ in range(args.rounds):
        for how, (host, sink, echo) in paths.items():
            out = await guest(m, "a", ["python3", "-S", "-c", CLIENT, host, str(sink), "bulk",
                                       str(args.mib)])
            bulk[how].append(float(out))
            out = await guest(m, "a", ["python3", "-S", "-c", CLIENT, host, str(echo), "rtt",
                                       str(args.trips)])
            rtt[how] += [float(x) for x in out.split()]
    return {"bulk": (bulk["bridge"], bulk["user"]), "rtt": (rtt["bridge"], rtt["user"])}


def inner(args: argparse.Namespace) -> int:
    from vmforge.builders.builtin import register_minimal
    from vmforge.net.model import NetMode
    from vmforge.node.manager import VmManager
    from vmforge.paths import DataDir
    from vmforge.spec import parse_request

    tmp = Path(tempfile.mkdtemp(prefix="vmforge-bench-net-"))
    data = DataDir(tmp / "data").ensure()
    m = VmManager(data)
    try:
        register_minimal(m.library, data.cache)
        m.networks.create("bench", SUBNET, NetMode.HOST)
        for name, ip, fwd in (("a", A_IP, []), ("b", B_IP, [
                {"host_port": args.sink_fwd, "guest_port": SINK},
                {"host_port": args.echo_fwd, "guest_port": ECHO}])):
            req = parse_request({"name": name, "spec": {
                "memory_mib": 256, "kernel": {"image": "minimal"},
                "nics": [{"id": "lan", "network": "bench", "ip": ip},
                         {"id": "slirp", "forwards": fwd}]}})
            asyncio.run(m.run(req, timeout=300))
        res = asyncio.run(measure(m, args))
        bb, bu = res["bulk"]
        rb, ru = res["rtt"]
        mib = args.mib
        table(f"guest to guest, TCP (minimal image, TCG, {args.rounds} rounds): bridge + tap "
              "vs QEMU user-mode networking", [
                  (f"send {mib} MiB a -> b", bb, "user-mode (via host fwd)", bu,
                   "bridge faster"),
                  ("1-byte round trip (p50)", rb, "user-mode (via host fwd)", ru,
                   "bridge faster")])
        print(f"\nthroughput: bridge {mib / min(bb):.1f} MiB/s, user-mode {mib / min(bu):.1f} "
              f"MiB/s (best round); round trip p99: bridge {fmt(pct(rb, 99))}, user-mode "
              f"{fmt(pct(ru, 99))}")
        return 0
    finally:
        for name in ("a", "b"):
            try:
                asyncio.run(m.delete(name, force=True, stop_timeout=0))
            except Exception:  # noqa: BLE001 - clean up what exists
                pass
        try:
            m.networks.remove("bench")
        except Exception:  # noqa: BLE001
            pass
        m.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trips", type=int, default=200)
    ap.add_argument("--sink-fwd", type=int, default=15001)
    ap.add_argument("--echo-fwd", type=int, default=15002)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
