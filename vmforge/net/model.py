"""A managed network as data, and the address plan of its subnet. Pure: no I/O.

The subnet's first host address is the bridge's (the guests' gateway and DNS server); the
upper half of the hosts is dnsmasq's DHCP range; the lower half (after the gateway) is for
static addresses, so DHCP never hands out an address a VM was given by its spec.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from ..errors import SpecError
from .names import NET_NAME_RE, default_bridge_name

__all__ = ["NetMode", "Network", "parse_subnet", "validate_network_name", "MIN_PREFIX",
           "MAX_PREFIX"]

MIN_PREFIX = 16  # at most 65534 hosts: dnsmasq's lease table and ARP stay sane
MAX_PREFIX = 28  # at least 14 hosts: a gateway, a static half and a DHCP half


class NetMode(enum.StrEnum):
    """What a managed network reaches beyond its bridge."""
    HOST = "host"          # guests, each other and the host; no rules added, no router given
    NAT = "nat"            # + the outside through the host, masqueraded (nftables)
    ISOLATED = "isolated"  # guests and the host's bridge address only; forwarding dropped

    @property
    def gives_router(self) -> bool:
        """Whether DHCP hands out the bridge address as the default route."""
        return self is NetMode.NAT

    @property
    def has_rules(self) -> bool:
        return self is not NetMode.HOST


def validate_network_name(name: str, field: str = "NAME") -> str:
    if not isinstance(name, str) or not NET_NAME_RE.fullmatch(name):
        raise SpecError(f"invalid network name {name!r}", field=field,
                        hint="use 1-32 letters, digits and '-', starting and ending with a "
                             "letter or digit")
    return name


def parse_subnet(text: str, field: str = "--subnet") -> IPv4Network:
    """An IPv4 private subnet with a prefix between /16 and /28, given as its network
    address (``10.40.0.0/24``; ``10.40.0.1/24`` is refused, it names a host)."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        hint = "give the network address and prefix, e.g. 10.40.0.0/24"
        if "host bits set" in str(exc):
            try:
                fixed = ipaddress.ip_network(text, strict=False)
                hint = f"did you mean {fixed}?"
            except ValueError:
                pass
        raise SpecError(f"not a subnet: {text!r} ({exc})", field=field, hint=hint) from None
    if not isinstance(net, IPv4Network):
        raise SpecError(f"{text}: managed networks are IPv4", field=field)
    if "/" not in text:
        raise SpecError(f"{text}: give the prefix length, e.g. {text}/24", field=field)
    if not (MIN_PREFIX <= net.prefixlen <= MAX_PREFIX):
        raise SpecError(f"{net}: the prefix must be between /{MIN_PREFIX} and /{MAX_PREFIX}",
                        field=field, hint="e.g. a /24")
    if not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
        raise SpecError(f"{net} is not a private range", field=field,
                        hint="use part of 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16")
    return net


@dataclass(frozen=True)
class Network:
    name: str
    subnet: IPv4Network
    bridge: str
    mode: NetMode = NetMode.HOST
    created_at: float = 0.0
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def new(cls, name: str, subnet: str, mode: NetMode, bridge: str | None = None,
            created_at: float = 0.0) -> Network:
        validate_network_name(name)
        return cls(name, parse_subnet(subnet), bridge or default_bridge_name(name), mode,
                   created_at)

    # -- the address plan
    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.network_address + 1

    @property
    def bridge_address(self) -> IPv4Interface:
        return IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")

    @property
    def dhcp_range(self) -> tuple[IPv4Address, IPv4Address]:
        first = self.subnet.network_address + self.subnet.num_addresses // 2
        return first, self.subnet.broadcast_address - 1

    @property
    def static_range(self) -> tuple[IPv4Address, IPv4Address]:
        return self.gateway + 1, self.dhcp_range[0] - 1

    @property
    def router(self) -> IPv4Address | None:
        return self.gateway if self.mode.gives_router else None

    def check_static(self, address: IPv4Address) -> str | None:
        """Why ``address`` cannot be a VM's static address here, or None."""
        lo, hi = self.static_range
        if address not in self.subnet:
            return f"{address} is not in network {self.name}'s subnet {self.subnet}"
        if address == self.gateway:
            return f"{address} is network {self.name}'s own (bridge) address"
        if not (lo <= address <= hi):
            d0, d1 = self.dhcp_range
            if d0 <= address <= d1:
                return (f"{address} is in network {self.name}'s DHCP range ({d0}-{d1}); "
                        f"static addresses go in {lo}-{hi}")
            return f"{address} is not a usable host address of {self.subnet}"
        return None

    # -- storage
    def to_row(self) -> tuple[str, str, str, str, float, str]:
        return (self.name, str(self.subnet), self.bridge, self.mode.value, self.created_at,
                json.dumps(self.options, sort_keys=True))

    @classmethod
    def from_row(cls, row: Any) -> Network:
        return cls(row["name"], IPv4Network(row["subnet"]), row["bridge"], NetMode(row["mode"]),
                   row["created_at"], json.loads(row["options"] or "{}"))

    def to_json(self) -> dict[str, Any]:
        d0, d1 = self.dhcp_range
        s0, s1 = self.static_range
        return {"name": self.name, "subnet": str(self.subnet), "bridge": self.bridge,
                "mode": self.mode.value, "nat": self.mode is NetMode.NAT,
                "isolated": self.mode is NetMode.ISOLATED, "gateway": str(self.gateway),
                "router": str(self.router) if self.router else None,
                "dhcp_range": [str(d0), str(d1)], "static_range": [str(s0), str(s1)],
                "created_at": self.created_at}
