"""Real networks, inside a network namespace each test makes (nothing touches the host's own
interfaces): a managed network with DHCP, two minimal VMs that get addresses and ping each
other, the namespace reaching a guest's TCP port, a static address, NAT rules, crash recovery,
missing privileges, and nothing left after `rm` and `network rm` (no tap, bridge, dnsmasq or
nftables table).

vmforge runs as `ip netns exec NS python -m vmforge ...`: QEMU, its taps, the bridge and
dnsmasq all live in the namespace. Every process left in it at teardown was started by the
test; they are killed by PID before the namespace is deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmforge.paths import DataDir

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]

SUBNET = "10.77.0.0/24"


def _need_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces, bridges and taps need root")
    for tool in ("ip", "dnsmasq", "nft", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun")


class Ns:
    """A network namespace of the test's own, and vmforge run inside it."""

    def __init__(self, name: str, home: Path) -> None:
        self.name = name
        self.home = home

    def sh(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, check=check, timeout=120)

    def vmforge(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
                prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", self.name, *prefix, sys.executable, "-m", "vmforge",
                *args]
        full_env = {k: v for k, v in os.environ.items() if k != "VMFORGE_FAILPOINT"}
        full_env.update(VMFORGE_HOME=str(self.home), **(env or {}))
        res = subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=420)
        if check and res.returncode != 0:
            raise AssertionError(f"vmforge {' '.join(args)} exited {res.returncode}:\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.vmforge(*args, "--json").stdout)

    def links(self) -> list[str]:
        out = subprocess.run(["ip", "-n", self.name, "-j", "link", "show"], capture_output=True,
                             text=True, check=True).stdout
        return sorted(d["ifname"] for d in json.loads(out))

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def nft_tables(self) -> str:
        return self.sh("nft", "list", "tables").stdout.strip()

    def taps(self) -> list[str]:
        return [n for n in self.links() if n.startswith("vt")]

    def assert_empty(self) -> None:
        """Nothing of vmforge's left in the namespace."""
        assert self.links() == ["lo"], self.links()
        assert self.pids() == [], self.pids()
        assert self.nft_tables() == ""


@pytest.fixture
def ns(vm_data: DataDir) -> Iterator[Ns]:
    _need_root_tools()
    name = f"vmforge-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    n = Ns(name, vm_data.root)
    try:
        yield n
    finally:
        for pid in n.pids():  # ours: QEMU and dnsmasq of a test that failed half-way
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while n.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for vm in _vm_names(n):
            n.vmforge("rm", "-f", vm, check=False)
        for net in n.json("network", "ls"):
            n.vmforge("network", "rm", net["name"], check=False)
        subprocess.run(["ip", "netns", "del", name], check=False)


def _vm_names(n: Ns) -> list[str]:
    return [v["name"] for v in n.json("ls") if v["name"].startswith("net-")]


def _spec(tmp: Path, name: str, **nic: Any) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"name": name, "spec": {
        "memory_mib": 256, "kernel": {"image": "minimal"}, "nics": [{"id": "net0", **nic}]}}))
    return path


def _wait_tcp(n: Ns, addr: str, port: int, timeout: float = 30) -> str:
    script = ("import socket, sys, time\n"
              "deadline = time.monotonic() + float(sys.argv[3])\n"
              "while True:\n"
              "    try:\n"
              "        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
              "        print(s.recv(100).decode()); break\n"
              "    except OSError:\n"
              "        if time.monotonic() > deadline: raise\n"
              "        time.sleep(0.2)\n")
    return n.sh(sys.executable, "-c", script, addr, str(port), str(timeout)).stdout.strip()


GUEST_SERVER = ("import socket\n"
                "s = socket.socket()\n"
                "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "s.bind(('0.0.0.0', 8080)); s.listen(4)\n"
                "while True:\n"
                "    c, peer = s.accept(); c.sendall(b'hello ' + peer[0].encode()); c.close()\n")


def test_managed_network_dhcp_static_ping_tcp_and_cleanup(ns: Ns, tmp_path: Path) -> None:
    st = ns.json("network", "create", "lan", "--subnet", SUBNET, "--nat")
    assert st["state"] == "up" and st["dnsmasq_pid"] and st["nft_table_present"]
    assert "vmf-lan" in ns.links() and "vmforge-lan" in ns.nft_tables()

    ns.vmforge("run", "-f", str(_spec(tmp_path, "net-a", network="lan")))
    ns.vmforge("run", "-f", str(_spec(tmp_path, "net-b", network="lan", ip="10.77.0.20")))

    a, b = ns.json("inspect", "net-a"), ns.json("inspect", "net-b")
    (a_ip,) = a["ipv4"]
    assert 128 <= int(a_ip.rsplit(".", 1)[1]) <= 254, a_ip  # the DHCP half
    nic = a["nics"][0]
    assert nic["network"] == "lan" and nic["guest_interface"] == "eth0"
    assert nic["lease"]["ip"] == a_ip and nic["lease_matches"] is True
    assert b["ipv4"] == ["10.77.0.20"]  # exactly the static address
    assert b["nics"][0]["lease"] is None
    listed = {v["name"]: v["ipv4"] for v in ns.json("ls")}
    assert listed["net-a"] == [a_ip] and listed["net-b"] == ["10.77.0.20"]
    assert len(ns.taps()) == 2

    # each pings the other, through the bridge
    ns.vmforge("exec", "net-a", "--", "ping", "-c", "2", "-W", "5", "10.77.0.20")
    ns.vmforge("exec", "net-b", "--", "ping", "-c", "2", "-W", "5", a_ip)
    # the host side (the namespace) reaches a guest TCP port by its address
    ns.vmforge("exec", "net-b", "--", "sh", "-c",
               f"python3 -S -c \"{GUEST_SERVER}\" </dev/null >/dev/null 2>&1 &")
    assert _wait_tcp(ns, "10.77.0.20", 8080) == "hello 10.77.0.1"
    # the default route (NAT network) is the bridge; DNS is dnsmasq's
    route = ns.vmforge("exec", "net-a", "--", "ip", "route").stdout
    assert "default via 10.77.0.1" in route

    refused = ns.vmforge("network", "rm", "lan", check=False)
    assert refused.returncode == 6 and "used by VM(s) net-a, net-b" in refused.stderr

    # QEMU dies behind vmforge's back: the next command sees the crash and removes its tap
    os.kill(a["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{a['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    states = {v["name"]: v["state"] for v in ns.json("ls")}
    assert states["net-a"] == "crashed"
    assert len(ns.taps()) == 1

    ns.vmforge("stop", "net-b")
    assert ns.taps() == []
    ns.vmforge("rm", "-f", "net-a", "net-b")
    ns.vmforge("network", "rm", "lan")
    ns.assert_empty()
    assert not (ns.home / "networks" / "lan").exists()


def test_crash_after_taps_then_next_command_cleans_up(ns: Ns, tmp_path: Path) -> None:
    """vmforge dies after making the taps and before QEMU starts: the row says starting, the
    lock is free; the next command rolls the start back and removes the tap. Before that,
    the network's dnsmasq died: starting a VM on the network brings it back."""
    old = ns.json("network", "create", "crash", "--subnet", "10.78.0.0/24")["dnsmasq_pid"]
    os.kill(old, signal.SIGKILL)  # ours, in our namespace
    deadline = time.monotonic() + 10
    while ns.json("network", "inspect", "crash")["state"] != "degraded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    died = ns.vmforge("run", "-f", str(_spec(tmp_path, "net-crash", network="crash")),
                      env={"VMFORGE_FAILPOINT": "start.taps:kill"}, check=False)
    assert died.returncode in (-9, 137), died.stderr
    assert len(ns.taps()) == 1
    st = ns.json("network", "inspect", "crash")
    assert st["state"] == "up" and st["dnsmasq_pid"] not in (None, old)
    (vm,) = [v for v in ns.json("ls") if v["name"] == "net-crash"]
    assert vm["state"] == "stopped" and "interrupted" in (vm["last_error"] or "")
    assert ns.taps() == []
    ns.vmforge("rm", "net-crash")
    ns.vmforge("network", "rm", "crash")
    ns.assert_empty()


def test_missing_privileges_are_clear_errors(ns: Ns, tmp_path: Path) -> None:
    drop = ("setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin")
    res = ns.vmforge("network", "create", "nope", "--subnet", "10.79.0.0/24", check=False,
                     prefix=drop)
    assert res.returncode == 3 and "CAP_NET_ADMIN" in res.stderr, res.stderr
    assert ns.json("network", "ls") == [] and ns.links() == ["lo"]

    ns.vmforge("network", "create", "priv", "--subnet", "10.79.0.0/24")
    ns.vmforge("create", "-f", str(_spec(tmp_path, "net-priv", network="priv")))
    res = ns.vmforge("start", "net-priv", check=False, prefix=drop)
    assert res.returncode == 3 and "CAP_NET_ADMIN" in res.stderr, res.stderr
    vm = ns.json("inspect", "net-priv")
    assert vm["state"] == "created" and "CAP_NET_ADMIN" in vm["last_error"]
    assert ns.taps() == []
    ns.vmforge("rm", "net-priv")
    ns.vmforge("network", "rm", "priv")
    ns.assert_empty()


def test_debian_cloud_image_addresses_from_network_config(ns: Ns, tmp_path: Path,
                                                          debian_image: str) -> None:
    """A cloud image learns a static address (and DHCP on a second NIC) from the seed's
    network-config v2, matched by MAC."""
    ns.vmforge("network", "create", "cloud", "--subnet", "10.80.0.0/24", "--nat")
    ns.vmforge("network", "create", "cloud2", "--subnet", "10.81.0.0/24")
    path = tmp_path / "deb.json"
    path.write_text(json.dumps({"name": "net-deb", "spec": {
        "memory_mib": 1024, "cpu_cores": 2,
        "disks": [{"id": "root", "size_gib": 4, "bootable": True, "image": debian_image}],
        "nics": [{"id": "net0", "network": "cloud", "ip": "10.80.0.30"},
                 {"id": "net1", "network": "cloud2"}]}}))
    ns.vmforge("run", "-f", str(path), "--timeout", "400")
    d = ns.json("inspect", "net-deb")
    static, dhcp = d["ipv4"]
    assert static == "10.80.0.30"
    assert dhcp.startswith("10.81.0.") and int(dhcp.rsplit(".", 1)[1]) >= 128
    assert d["nics"][1]["lease"]["ip"] == dhcp and d["nics"][1]["lease_matches"] is True
    assert [n["guest_interface"] for n in d["nics"]] == ["eth0", "eth1"]
    route = ns.vmforge("exec", "net-deb", "--", "ip", "route").stdout
    assert "default via 10.80.0.1" in route, route
    for addr in (static, dhcp):  # the namespace reaches the guest's sshd at both
        assert _wait_tcp(ns, addr, 22).startswith("SSH-2.0-")
    ns.vmforge("rm", "-f", "net-deb")
    ns.vmforge("network", "rm", "cloud", "cloud2")
    ns.assert_empty()
