"""A spec's NICs resolved against the managed networks: kind, MAC, the host bridge to plug
into, the static address with its prefix and gateway. Pure: the networks are passed in.

Errors name the field (``spec.nics[1].ip``) and say how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import TYPE_CHECKING, Any

from ..enums import NicMode
from ..errors import SpecError
from .model import Network
from .names import derived_mac

if TYPE_CHECKING:
    from ..spec import Nic

__all__ = ["ResolvedNic", "resolve_nics", "nic_macs"]


@dataclass(frozen=True)
class ResolvedNic:
    index: int
    id: str
    mode: NicMode
    mac: str | None                 # lower case; set for every NIC when any is on the host
    bridge: str | None = None       # the host bridge (a managed network's, or the spec's)
    network: str | None = None      # the managed network's name
    libvirt_network: str | None = None  # a libvirt network by name (libvirt only)
    address: IPv4Interface | None = None
    gateway: IPv4Address | None = None
    dns: tuple[str, ...] = ()

    @property
    def dhcp(self) -> bool:
        return self.mode.on_host and self.address is None

    @property
    def guest_name(self) -> str:
        """The name the guest's network-config gives it (NICs enumerate in spec order)."""
        return f"eth{self.index}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode.value, "mac": self.mac,
                "bridge": self.bridge, "network": self.network or self.libvirt_network,
                "ip": str(self.address) if self.address else None,
                "gateway": str(self.gateway) if self.gateway else None}


def nic_macs(vm_name: str, nics: Sequence[Mapping[str, Any]]) -> list[str | None]:
    """The MAC of each NIC of a stored spec (plain dicts: the listing path has no models):
    the spec's own, else derived when any NIC is on the host (the guest's network-config then
    matches every NIC by MAC), else None (QEMU's default)."""
    any_host = any((n.get("mode") or "user") != "user" or n.get("bridge") or n.get("network")
                   for n in nics)
    out: list[str | None] = []
    for n in nics:
        mac = n.get("mac")
        if mac:
            out.append(str(mac).lower())
        elif any_host:
            out.append(derived_mac(vm_name, str(n.get("id") or "net0")))
        else:
            out.append(None)
    return out


def resolve_nics(vm_name: str, nics: Sequence[Nic], networks: Mapping[str, Network], *,
                 named_networks: bool = False) -> tuple[ResolvedNic, ...]:
    """``named_networks``: the backend has networks of its own by name (libvirt), used when
    vmforge has none of that name."""
    ids = [n.id for n in nics]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SpecError(f"NIC ids must be unique; repeated: {', '.join(dup)}", field="spec.nics")
    macs = nic_macs(vm_name, [n.model_dump(mode="json") for n in nics])
    seen = [m for m in macs if m]
    dup = sorted({m for m in seen if seen.count(m) > 1})
    if dup:
        raise SpecError(f"NICs share a MAC address: {', '.join(dup)}", field="spec.nics")
    out = []
    for i, (nic, mac) in enumerate(zip(nics, macs, strict=True)):
        field = f"spec.nics[{i}]"
        if nic.mode is NicMode.USER:
            out.append(ResolvedNic(i, nic.id, nic.mode, mac))
            continue
        gateway = IPv4Address(nic.gateway) if nic.gateway else None
        if nic.mode is NicMode.BRIDGE:
            address = IPv4Interface(nic.ip) if nic.ip else None
            out.append(ResolvedNic(i, nic.id, nic.mode, mac, bridge=nic.bridge,
                                   address=address, gateway=gateway))
            continue
        assert nic.network is not None
        net = networks.get(nic.network)
        if net is None:
            if named_networks:
                if nic.ip and "/" not in nic.ip:
                    raise SpecError("on a libvirt network give the prefix length too, e.g. "
                                    "192.168.122.20/24", field=f"{field}.ip")
                out.append(ResolvedNic(i, nic.id, nic.mode, mac,
                                       libvirt_network=nic.network,
                                       address=IPv4Interface(nic.ip) if nic.ip else None,
                                       gateway=gateway))
                continue
            raise SpecError(f"no network named {nic.network!r}", field=f"{field}.network",
                            hint=f"create it: `vmforge network create {nic.network} --subnet "
                                 "10.X.Y.0/24`, or see `vmforge network ls`")
        address = None
        dns: tuple[str, ...] = ()
        if nic.ip:
            address = _static_on(net, nic.ip, f"{field}.ip")
            gateway = gateway or net.router
            dns = (str(net.gateway),)
        out.append(ResolvedNic(i, nic.id, nic.mode, mac, bridge=net.bridge, network=net.name,
                               address=address, gateway=gateway, dns=dns))
    return tuple(out)


def _static_on(net: Network, ip: str, field: str) -> IPv4Interface:
    if "/" in ip:
        iface = IPv4Interface(ip)
        if iface.network.prefixlen != net.subnet.prefixlen:
            raise SpecError(f"{ip}: network {net.name} is {net.subnet}", field=field,
                            hint=f"give the address alone ({iface.ip}); the prefix is the "
                                 "network's")
    else:
        iface = IPv4Interface(f"{ip}/{net.subnet.prefixlen}")
    why = net.check_static(iface.ip)
    if why:
        lo, hi = net.static_range
        raise SpecError(why, field=field, hint=f"pick a free address in {lo}-{hi}")
    return iface
