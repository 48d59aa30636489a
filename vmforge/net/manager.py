"""Managed networks, I/O: create, list, inspect, remove, bring up (again), and the VMs' taps.

Rules (the VM manager's, applied to networks):

* Network changes hold one flock (``DATA/locks/.networks.lock``); a VM start takes it after
  its VM lock (never the other way round), to bring its networks up.
* The row is written before anything is made on the host, and deleted only after everything
  is gone: a vmforge that dies half-way leaves a row whose next ``network rm`` (or a VM start,
  which brings the network up) finishes the work. Nothing on the host is ever unrecorded.
* Bringing a network up is idempotent and repairs what is missing (after a host reboot, or a
  dnsmasq that died): that is how dnsmasq is supervised without a daemon.
* A VM's taps are named after its directory (``names.tap_prefix``), so removing them needs
  neither its spec nor its row.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from ..errors import HostError, InvalidState, SpecError, VmforgeError
from ..paths import DataDir
from ..state import Database
from . import dnsmasq, links, nft
from .model import NetMode, Network
from .names import IFNAME_RE, nft_table_name, tap_prefix
from .store import NetworkStore

__all__ = ["NetworkManager", "TapRequest"]

log = logging.getLogger("vmforge.net")
LOCK_TIMEOUT = 30.0


@dataclass(frozen=True)
class TapRequest:
    tap: str
    bridge: str
    guest_mac: str

    @property
    def host_mac(self) -> str:
        """fe:... on the host side: a bridge takes its lowest port MAC as its own unless set,
        and a guest must never see its own MAC on the host side."""
        return "fe" + self.guest_mac[2:]


def bridge_mac(network: str) -> str:
    """Locally administered (02:...), stable per network name."""
    import hashlib
    b = hashlib.sha256(f"vmforge-bridge/{network}".encode()).digest()[:5]
    return "02:" + ":".join(f"{x:02x}" for x in b)


class NetworkManager:
    def __init__(self, db: Database, data: DataDir) -> None:
        self.store = NetworkStore(db)
        self.data = data

    @property
    def root(self) -> Path:
        return self.data.root / "networks"

    def files(self, name: str) -> dnsmasq.DnsmasqFiles:
        return dnsmasq.DnsmasqFiles(self.root / name)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.data.locks.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.data.locks / ".networks.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise InvalidState("networks are busy: another vmforge process is "
                                           "changing them", hint="try again") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # -- networks
    def create(self, name: str, subnet: str, mode: NetMode, bridge: str | None = None
               ) -> Network:
        net = Network.new(name, subnet, mode, bridge, time.time())
        if bridge is not None and not IFNAME_RE.fullmatch(bridge):
            raise SpecError(f"invalid bridge name {bridge!r}", field="--bridge",
                            hint="1-15 letters, digits, '_', '.' or '-'")
        self._check_host_tools(net)
        links.require_net_admin(f"creating network {name}")
        with self._locked():
            if self.store.find(name) is not None:
                raise InvalidState(f"a network named {name!r} already exists",
                                   hint=f"see `vmforge network inspect {name}`")
            for other in self.store.all():
                if other.subnet.overlaps(net.subnet):
                    raise SpecError(f"{net.subnet} overlaps network {other.name} "
                                    f"({other.subnet})", field="--subnet",
                                    hint="pick a subnet no other network uses")
            self._check_host_conflicts(net)
            self.store.insert(net)
            try:
                self._up(net)
            except BaseException:
                try:
                    self._down(net)
                finally:
                    self.store.delete(name)
                raise
        return net

    @staticmethod
    def _check_host_tools(net: Network) -> None:
        from .. import run
        if run.find_binary("ip") is None:
            raise HostError("ip is not installed", hint="apt-get install iproute2")
        if run.find_binary("dnsmasq") is None:
            raise HostError("dnsmasq is not installed (managed networks use it for DHCP and "
                            "DNS)", hint="apt-get install dnsmasq-base")
        if net.mode.has_rules and run.find_binary("nft") is None:
            raise HostError(f"nft is not installed ({net.mode.value} networks use nftables)",
                            hint="apt-get install nftables")

    @staticmethod
    def _check_host_conflicts(net: Network) -> None:
        if links.link_exists(net.bridge):
            raise SpecError(f"a network device named {net.bridge} already exists on this host",
                            field="--bridge",
                            hint="pick another bridge name with --bridge (vmforge makes its "
                                 "own bridge; `bridge: NAME` NICs use an existing one)")
        for dev, addr in links.host_addresses():
            if addr.network.overlaps(net.subnet) and addr.network.prefixlen < 32:
                raise SpecError(f"{net.subnet} overlaps {addr} on {dev}", field="--subnet",
                                hint="pick a subnet the host does not use")

    def ensure_up(self, name: str) -> Network:
        """Bring a network up, repairing whatever is missing (bridge, rules, dnsmasq)."""
        with self._locked():
            net = self.store.get(name)
            self._up(net)
            return net

    def _up(self, net: Network) -> None:
        links.require_net_admin(f"bringing up network {net.name}")
        kind = links.link_kind(net.bridge)
        if kind is None:
            links.create_bridge(net.bridge, net.bridge_address, bridge_mac(net.name))
        elif kind != "bridge":
            raise HostError(f"{net.bridge} (network {net.name}'s bridge) exists but is a "
                            f"{kind or 'physical'} device", hint="remove it or recreate the "
                            "network with another --bridge")
        if net.mode.has_rules:
            if net.mode is NetMode.NAT:
                links.set_ip_forward()
            nft.apply(net)
        files = self.files(net.name)
        if dnsmasq.find_pid(files) is None:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            dnsmasq.start(net, files)

    def _down(self, net: Network) -> None:
        """Remove everything of the network on the host; each step whether or not the
        earlier ones worked, the first failure raised at the end."""
        errors: list[VmforgeError] = []
        for step in (lambda: dnsmasq.stop(self.files(net.name)),
                     lambda: nft.remove(net.name),
                     lambda: self._delete_bridge(net)):
            try:
                step()
            except VmforgeError as exc:
                errors.append(exc)
        shutil.rmtree(self.files(net.name).dir, ignore_errors=True)
        if errors:
            raise errors[0]

    @staticmethod
    def _delete_bridge(net: Network) -> None:
        if links.link_kind(net.bridge) == "bridge":
            links.delete_link(net.bridge)

    def remove(self, name: str) -> None:
        """Refused while a VM has a NIC on it; else dnsmasq, rules, bridge, files and row."""
        with self._locked():
            net = self.store.get(name)
            users = sorted({u.vm_name for u in self.store.users(name)})
            if users:
                raise InvalidState(f"network {name} is used by VM(s) {', '.join(users)}",
                                   hint=f"remove them first: `vmforge rm -f {' '.join(users)}`")
            if net.mode.has_rules or links.link_exists(net.bridge) or \
                    dnsmasq.find_pid(self.files(name)) is not None:
                links.require_net_admin(f"removing network {name}")
            self._down(net)
            self.store.delete(name)

    def status(self, net: Network, *, rules: bool = True) -> dict[str, Any]:
        """What is on the host for a network: bridge, dnsmasq, nftables table, leases, VMs.
        ``rules`` checks the nftables table (one ``nft`` process)."""
        files = self.files(net.name)
        pid = dnsmasq.find_pid(files)
        kind = links.link_kind(net.bridge) if links.link_exists(net.bridge) else None
        table = nft.exists(net.name) if rules and net.mode.has_rules and \
            links.has_net_admin() else None  # listing rules needs the privilege too
        up = kind == "bridge" and pid is not None and table is not False
        users = self.store.users(net.name)
        return {**net.to_json(),
                "state": "up" if up else ("down" if kind is None and pid is None else
                                          "degraded"),
                "bridge_present": kind == "bridge", "dnsmasq_pid": pid,
                "nft_table": f"ip {nft_table_name(net.name)}" if net.mode.has_rules else None,
                "nft_table_present": table,
                "leases_file": str(files.leases), "dnsmasq_log": str(files.log),
                "leases": [le.to_json() for le in dnsmasq.read_leases(files)],
                "vms": sorted({u.vm_name for u in users}),
                "nics": [{"vm": u.vm_name, "nic": u.nic_id, "mac": u.mac, "ip": u.ip}
                         for u in users]}

    def leases_by_mac(self, names: Iterable[str]) -> dict[str, dnsmasq.Lease]:
        out: dict[str, dnsmasq.Lease] = {}
        for name in set(names):
            for le in dnsmasq.read_leases(self.files(name)):
                prev = out.get(le.mac)
                if prev is None or le.expires > prev.expires:
                    out[le.mac] = le
        return out

    def subnets(self) -> dict[str, IPv4Network]:
        return {n.name: n.subnet for n in self.store.all()}

    # -- the VMs' taps
    def attach(self, networks: Iterable[str], taps: Sequence[TapRequest]) -> None:
        """Before a VM's hypervisor starts (under the VM's lock): its managed networks up,
        then its taps made and plugged into their bridges."""
        for name in sorted(set(networks)):
            self.ensure_up(name)
        for t in taps:
            kind = links.link_kind(t.bridge)
            if kind != "bridge":
                raise SpecError(f"no bridge {t.bridge} on this host" if kind is None else
                                f"{t.bridge} is not a bridge ({kind or 'physical device'})",
                                field="spec.nics", hint="create the bridge first (`ip link add "
                                f"{t.bridge} type bridge`), or use a managed network")
        made: list[str] = []
        try:
            for t in taps:
                links.create_tap(t.tap, t.bridge, t.host_mac)
                made.append(t.tap)
        except BaseException:
            for tap in made:
                try:
                    links.delete_link(tap)
                except VmforgeError as exc:
                    log.warning("could not remove tap %s: %s", tap, exc)
            raise

    @staticmethod
    def vm_taps(vm_dir: str | Path) -> list[str]:
        prefix = tap_prefix(vm_dir)
        return sorted(n for n in links.link_names()
                      if n.startswith(prefix) and n[len(prefix):].isdigit())

    def release_taps(self, vm_dir: str | Path) -> list[str]:
        """Remove a VM's taps (all devices named after its directory); returns their names."""
        gone = []
        for tap in self.vm_taps(vm_dir):
            links.delete_link(tap)
            gone.append(tap)
        return gone
