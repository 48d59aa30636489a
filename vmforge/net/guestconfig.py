"""How the guest learns its addresses: cloud-init network-config v2 (cloud images, in the
seed) and ``vmforge.net=`` kernel command-line tokens (the minimal image's init). Pure.

NICs are matched by MAC and renamed ``ethN`` (the ifupdown renderer of Debian's cloud-init
breaks on name globs; matching the MAC works everywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from .nics import ResolvedNic

__all__ = ["network_config_v2", "cmdline_tokens"]


def network_config_v2(nics: Sequence[ResolvedNic]) -> str | None:
    """The seed's network-config for NICs on the host (static or DHCP; user-mode NICs get
    DHCP from QEMU), or None when every NIC is user-mode (cloud-init's default is right)."""
    if not any(n.mode.on_host for n in nics):
        return None
    ethernets: dict[str, Any] = {}
    for n in nics:
        if n.mac is None:
            continue
        e: dict[str, Any] = {"match": {"macaddress": n.mac}, "set-name": n.guest_name}
        if n.address is None:
            e["dhcp4"] = True
        else:
            e["dhcp4"] = False
            e["addresses"] = [str(n.address)]
            if n.gateway is not None:
                # Not `routes: [{to: 0.0.0.0/0, ...}]`: Debian 12's cloud-init (22.4) renders a
                # route for ifupdown as `post-up route add` (net-tools, which cloud images
                # lack), while gateway4 becomes ifupdown's own `gateway` line. Deprecated in
                # netplan, still accepted everywhere (and by cloud-init's schema).
                e["gateway4"] = str(n.gateway)
            if n.dns:
                e["nameservers"] = {"addresses": list(n.dns)}
        ethernets[n.guest_name] = e
    doc = {"network": {"version": 2, "ethernets": ethernets}}
    return yaml.safe_dump(doc, sort_keys=False)


def cmdline_tokens(nics: Sequence[ResolvedNic]) -> list[str]:
    """``vmforge.net=MAC,dhcp`` or ``vmforge.net=MAC,ADDRESS/PREFIX[,GATEWAY]`` per NIC on the
    host; a NIC with no token is user-mode (the minimal image gives it QEMU's 10.0.2.15)."""
    out = []
    for n in nics:
        if not n.mode.on_host or n.mac is None:
            continue
        if n.address is None:
            out.append(f"vmforge.net={n.mac},dhcp")
        else:
            gw = f",{n.gateway}" if n.gateway else ""
            out.append(f"vmforge.net={n.mac},{n.address}{gw}")
    return out
