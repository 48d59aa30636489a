"""nftables rules of a managed network: one table per network (``ip vmforge-NAME``), so that
removing the table removes exactly what vmforge added, and nothing of anyone else's.

* ``nat``: guests reach out through the host (masquerade, except to their own subnet and to
  broadcast/multicast); forwarded traffic into the bridge is accepted only for connections
  the guests opened.
* ``isolated``: nothing is forwarded to or from the bridge (the host's bridge address still
  answers DHCP and DNS).
* ``host``: no table at all.

The ruleset is built from validated names (interface names, network names) and
``ipaddress`` objects only; it is applied as one atomic transaction (``nft -f -``) that first
drops any earlier version of the table. Pure apart from ``apply``/``remove``/``exists``.
"""

from __future__ import annotations

from .. import run
from ..errors import HostError
from .model import NetMode, Network
from .names import nft_table_name

__all__ = ["ruleset", "replace_script", "remove_script", "apply", "remove", "exists"]


def ruleset(net: Network) -> str | None:
    """The network's table in nft syntax, or None when the network needs no rules."""
    if not net.mode.has_rules:
        return None
    br = f'"{net.bridge}"'
    sub = str(net.subnet)
    lines = [f"table ip {nft_table_name(net.name)} {{",
             "\tchain forward {",
             "\t\ttype filter hook forward priority filter; policy accept;"]
    if net.mode is NetMode.NAT:
        lines += [f"\t\tiifname {br} ip saddr {sub} accept",
                  f"\t\toifname {br} ip daddr {sub} ct state established,related accept",
                  f"\t\tiifname {br} drop",
                  f"\t\toifname {br} drop",
                  "\t}",
                  "\tchain postrouting {",
                  "\t\ttype nat hook postrouting priority srcnat; policy accept;",
                  f"\t\tip saddr {sub} ip daddr 224.0.0.0/24 return",
                  f"\t\tip saddr {sub} ip daddr 255.255.255.255 return",
                  f"\t\tip saddr {sub} ip daddr != {sub} masquerade"]
    else:  # isolated
        lines += [f"\t\tiifname {br} drop",
                  f"\t\toifname {br} drop"]
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def remove_script(net_name: str) -> str:
    """Delete the table whether or not it exists (``add`` first makes ``delete`` safe)."""
    t = nft_table_name(net_name)
    return f"add table ip {t}\ndelete table ip {t}\n"


def replace_script(net: Network) -> str | None:
    rules = ruleset(net)
    return None if rules is None else remove_script(net.name) + rules


def _nft() -> str:
    binary = run.find_binary("nft")
    if binary is None:
        raise HostError("nft is not installed (nat and isolated networks use nftables)",
                        hint="apt-get install nftables")
    return binary


def apply(net: Network) -> bool:
    """Install (or replace) the network's table; False when it needs none."""
    script = replace_script(net)
    if script is None:
        return False
    run.run([_nft(), "-f", "-"], input=script.encode(), timeout=30,
            what=f"nft (rules of network {net.name})")
    return True


def remove(net_name: str) -> None:
    binary = run.find_binary("nft")
    if binary is None:
        return  # without nft there can be no table of ours
    run.run([binary, "-f", "-"], input=remove_script(net_name).encode(), timeout=30,
            what=f"nft (removing the rules of network {net_name})")


def exists(net_name: str) -> bool:
    binary = run.find_binary("nft")
    if binary is None:
        return False
    res = run.run([binary, "list", "table", "ip", nft_table_name(net_name)], check=False,
                  timeout=30)
    return res.returncode == 0
