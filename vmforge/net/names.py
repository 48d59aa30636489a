"""Names and addresses of the host side of NICs, derived (never stored) so that any command,
even after a crash, can find what an earlier one made. Pure: no I/O.

* A VM's taps are ``vt`` + 10 hex digits of a hash of its directory (unique per data
  directory and VM name) + the NIC's index: ``vt3f9a0c12d40``. Everything with that prefix
  belongs to that VM, so cleanup needs neither the spec nor the row.
* A NIC without a ``mac`` gets ``52:54:00`` + 3 bytes of a hash of the VM name and NIC id:
  stable across restarts and known before the VM exists (the seed's network-config matches
  it at create).
* A managed network's bridge is ``vmf-NAME`` when that fits in 15 bytes, else ``vmf-`` + a
  hash.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["NET_NAME_RE", "IFNAME_RE", "MAC_RE", "TAP_PREFIX", "tap_prefix", "tap_name",
           "derived_mac", "default_bridge_name", "nft_table_name", "IFNAMSIZ"]

IFNAMSIZ = 15  # bytes of an interface name, without the NUL
NET_NAME_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?$")
IFNAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,14}$")
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
TAP_PREFIX = "vt"
BRIDGE_PREFIX = "vmf-"


def _hex(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def tap_prefix(vm_dir: str | Path) -> str:
    return TAP_PREFIX + _hex(str(Path(vm_dir).resolve()), 10)


def tap_name(vm_dir: str | Path, index: int) -> str:
    name = f"{tap_prefix(vm_dir)}{index}"
    if len(name) > IFNAMSIZ:  # 99 NICs is far beyond any hypervisor's slots
        raise ValueError(f"NIC index {index} is too large")
    return name


def derived_mac(vm_name: str, nic_id: str) -> str:
    b = hashlib.sha256(f"{vm_name}/{nic_id}".encode()).digest()[:3]
    return "52:54:00:" + ":".join(f"{x:02x}" for x in b)


def default_bridge_name(network: str) -> str:
    name = BRIDGE_PREFIX + network
    if len(name) <= IFNAMSIZ:
        return name
    return BRIDGE_PREFIX + _hex(network, IFNAMSIZ - len(BRIDGE_PREFIX))


def nft_table_name(network: str) -> str:
    """One nftables table per network (``ip vmforge-NAME``): removing it removes every rule
    vmforge made for that network, nothing else."""
    return f"vmforge-{network}"
