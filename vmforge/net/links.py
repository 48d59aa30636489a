"""Host network devices: bridges and taps, through iproute2 (``ip``), in the network namespace
vmforge runs in. Listing uses ``socket.if_nameindex`` (no process).

Creating them needs CAP_NET_ADMIN: ``require_net_admin`` says so before anything is made.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from ipaddress import IPv4Interface

from .. import run
from ..errors import CommandError, HostError

__all__ = ["require_net_admin", "has_net_admin", "link_names", "link_exists", "link_kind",
           "create_bridge", "create_tap", "delete_link", "host_addresses", "bridge_ports",
           "set_ip_forward"]

log = logging.getLogger("vmforge.net")

CAP_NET_ADMIN = 12
_PRIV_HINT = ("run vmforge as root (sudo), or grant it CAP_NET_ADMIN; user-mode NICs "
              "(the default) need no privileges")


def has_net_admin() -> bool:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def require_net_admin(what: str) -> None:
    if not has_net_admin():
        raise HostError(f"{what} needs the CAP_NET_ADMIN privilege, which this process lacks",
                        hint=_PRIV_HINT)
    if not os.path.exists("/dev/net/tun") and "tap" in what:
        raise HostError(f"{what}: /dev/net/tun does not exist",
                        hint="modprobe tun (and mknod /dev/net/tun c 10 200 in containers)")


def _ip(args: list[str], what: str) -> run.Completed:
    binary = run.find_binary("ip")
    if binary is None:
        raise HostError("ip is not installed", hint="apt-get install iproute2")
    try:
        return run.run([binary, *args], timeout=30, what=what)
    except CommandError as exc:
        if "Operation not permitted" in exc.stderr or "Permission denied" in exc.stderr:
            raise HostError(f"{what}: permission denied", hint=_PRIV_HINT) from exc
        raise


def link_names() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


def link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def link_kind(name: str) -> str | None:
    """``bridge``, ``tun``, ``veth``, ... (iproute2's kind); "" for a physical device; None
    if there is no such device."""
    if not link_exists(name):
        return None
    binary = run.find_binary("ip")
    if binary is None:
        return ""
    res = run.run([binary, "-j", "-d", "link", "show", "dev", name], check=False, timeout=30)
    if res.returncode != 0:
        return None
    try:
        info = json.loads(res.stdout)[0].get("linkinfo", {})
    except (ValueError, IndexError, AttributeError):
        return ""
    return str(info.get("info_kind", ""))


def bridge_ports(bridge: str) -> list[str]:
    binary = run.find_binary("ip")
    if binary is None or not link_exists(bridge):
        return []
    res = run.run([binary, "-j", "link", "show", "master", bridge], check=False, timeout=30)
    try:
        return [d["ifname"] for d in json.loads(res.stdout or b"[]")]
    except (ValueError, KeyError, TypeError):
        return []


def create_bridge(name: str, address: IPv4Interface, mac: str) -> None:
    """A bridge with no STP and no forwarding delay (a guest's DHCP must not wait 30 s for the
    port to learn), a fixed MAC (else it takes its lowest port's, and changes as VMs come and
    go), and the network's gateway address."""
    require_net_admin(f"creating bridge {name}")
    what = f"creating bridge {name}"
    _ip(["link", "add", name, "address", mac, "type", "bridge", "stp_state", "0",
         "forward_delay", "0"], what)
    _ip(["addr", "add", str(address), "dev", name], what)
    _ip(["link", "set", name, "up"], what)


def create_tap(name: str, bridge: str, mac: str) -> None:
    """A persistent tap attached to ``bridge`` and up; the hypervisor opens it by name."""
    require_net_admin(f"creating tap {name}")
    what = f"creating tap {name} on {bridge}"
    if link_exists(name):  # left by a start that died before its cleanup: make it anew
        delete_link(name)
    _ip(["tuntap", "add", "dev", name, "mode", "tap"], what)
    try:
        _ip(["link", "set", name, "address", mac, "master", bridge, "up"], what)
    except BaseException:
        delete_link(name)
        raise


def delete_link(name: str) -> bool:
    """Remove a device if it exists; True if it did."""
    if not link_exists(name):
        return False
    require_net_admin(f"removing {name}")
    binary = run.find_binary("ip") or "ip"
    res = run.run([binary, "link", "delete", "dev", name], check=False, timeout=30)
    if res.returncode != 0 and link_exists(name):
        raise HostError(f"cannot remove network device {name}: "
                        f"{res.stderr.decode(errors='replace').strip()}", hint=_PRIV_HINT)
    return True


def host_addresses() -> list[tuple[str, IPv4Interface]]:
    """(device, address) of every IPv4 address in this network namespace."""
    binary = run.find_binary("ip")
    if binary is None:
        return []
    res = run.run([binary, "-j", "-4", "addr", "show"], check=False, timeout=30)
    out = []
    try:
        for dev in json.loads(res.stdout or b"[]"):
            for a in dev.get("addr_info", []):
                out.append((dev["ifname"], IPv4Interface(f"{a['local']}/{a['prefixlen']}")))
    except (ValueError, KeyError, TypeError):
        return []
    return out


def set_ip_forward() -> bool:
    """Turn on IPv4 forwarding (per network namespace; NAT needs it). True if it changed."""
    path = "/proc/sys/net/ipv4/ip_forward"
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return False
        with open(path, "w") as f:
            f.write("1\n")
        log.info("enabled IPv4 forwarding (%s) for NAT", path)
        return True
    except OSError as exc:
        raise HostError(f"cannot enable IPv4 forwarding ({path}): {exc.strerror}",
                        hint=_PRIV_HINT) from None
