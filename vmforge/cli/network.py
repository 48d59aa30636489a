"""`vmforge network`: managed networks (a bridge, dnsmasq for DHCP and DNS, NAT when asked)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import errors_reported, manager, out, print_json

if TYPE_CHECKING:
    from ..net.manager import NetworkManager

network_app = typer.Typer(no_args_is_help=True, help="Managed networks: a bridge with DHCP and "
                          "DNS (dnsmasq), NAT to the outside when asked (nftables).")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _networks() -> NetworkManager:
    return manager().networks


@network_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Network name (NICs say `network: NAME`).")],
    subnet: Annotated[str, typer.Option("--subnet", help="IPv4 subnet, e.g. 10.40.0.0/24: the "
                      "bridge takes the first address, DHCP the upper half, static "
                      "addresses the lower half.")],
    nat: Annotated[bool, typer.Option("--nat", help="Guests reach the outside through the "
                   "host (masquerade).")] = False,
    isolated: Annotated[bool, typer.Option("--isolated", help="Nothing is forwarded to or "
                        "from the network (guests reach each other and the host's bridge "
                        "address).")] = False,
    bridge: Annotated[str | None, typer.Option("--bridge", help="Name of the bridge vmforge "
                      "makes (default vmf-NAME).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a network and bring it up (bridge, dnsmasq, rules)."""
    from ..errors import SpecError
    from ..net.model import NetMode
    with errors_reported():
        if nat and isolated:
            raise SpecError("--nat and --isolated exclude each other", field="--isolated")
        mode = NetMode.NAT if nat else NetMode.ISOLATED if isolated else NetMode.HOST
        nm = _networks()
        net = nm.create(name, subnet, mode, bridge)
        if json_out:
            print_json(nm.status(net))
            return
        d0, d1 = net.dhcp_range
        s0, s1 = net.static_range
        out.print(f"created network [bold]{net.name}[/] {net.subnet} ({net.mode.value}) on "
                  f"bridge {net.bridge}: gateway {net.gateway}, DHCP {d0}-{d1}, static "
                  f"{s0}-{s1}", highlight=False)


@network_app.command("ls")
def ls(json_out: JsonOpt = False) -> None:
    """List networks."""
    with errors_reported():
        nm = _networks()
        rows = [nm.status(n, rules=json_out) for n in nm.store.all()]
        if json_out:
            print_json(rows)
            return
        from rich.table import Table
        t = Table(box=None, header_style="bold")
        for col in ("NAME", "SUBNET", "MODE", "BRIDGE", "STATE", "DHCP", "LEASES", "VMS"):
            t.add_column(col)
        colour = {"up": "green", "down": "red", "degraded": "yellow"}
        for r in rows:
            t.add_row(r["name"], r["subnet"], r["mode"], r["bridge"],
                      f"[{colour[r['state']]}]{r['state']}[/]",
                      f"pid {r['dnsmasq_pid']}" if r["dnsmasq_pid"] else "-",
                      str(len(r["leases"])), ", ".join(r["vms"]) or "-")
        out.print(t)


@network_app.command("inspect")
def inspect(name: str, json_out: JsonOpt = False) -> None:
    """Everything about a network: addresses, host devices, dnsmasq, leases, VMs."""
    with errors_reported():
        nm = _networks()
        st = nm.status(nm.store.get(name))
        if json_out:
            print_json(st)
            return
        _show(st)


def _show(st: dict[str, Any]) -> None:
    rows = [("name", st["name"]), ("subnet", st["subnet"]), ("mode", st["mode"]),
            ("state", st["state"]), ("bridge", f"{st['bridge']}"
                                     + ("" if st["bridge_present"] else " (missing)")),
            ("gateway", st["gateway"]), ("dhcp range", " - ".join(st["dhcp_range"])),
            ("static range", " - ".join(st["static_range"])),
            ("dnsmasq", f"pid {st['dnsmasq_pid']}" if st["dnsmasq_pid"] else "not running"),
            ("nftables", "-" if st["nft_table"] is None else
             f"{st['nft_table']}" + ("" if st["nft_table_present"] else " (missing)")),
            ("leases file", st["leases_file"]), ("dnsmasq log", st["dnsmasq_log"])]
    for key, value in rows:
        out.print(f"[bold]{key:>12}[/]: {value}", highlight=False)
    for n in st["nics"]:
        out.print(f"[bold]{'nic':>12}[/]: {n['vm']}/{n['nic']} {n['mac']}"
                  + (f" static {n['ip']}" if n["ip"] else " dhcp"), highlight=False)
    for le in st["leases"]:
        out.print(f"[bold]{'lease':>12}[/]: {le['ip']} {le['mac']} {le['hostname'] or ''}",
                  highlight=False)
    if st["state"] != "up":
        out.print("[yellow]hint:[/] starting a VM on it brings it up again, or "
                  f"`vmforge network rm {st['name']}` removes what is left", highlight=False)


@network_app.command("rm")
def rm(names: Annotated[list[str], typer.Argument(help="Network name(s).")]) -> None:
    """Remove network(s): dnsmasq, rules, bridge and files (refused while VMs use one)."""
    with errors_reported():
        nm = _networks()
        for n in names:
            nm.remove(n)
            out.print(f"removed network [bold]{n}[/]")
