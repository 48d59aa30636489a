"""Managed networks and the VMs' NICs on them, in the state file (tables ``networks`` and
``vm_nics``, schema version 3). A NIC row is written in the same transaction as its VM's row,
and its foreign key keeps a network that a VM uses from being deleted."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidState, SpecError
from ..state import Database
from .model import Network
from .nics import ResolvedNic

__all__ = ["NetworkStore", "NicUse"]


@dataclass(frozen=True)
class NicUse:
    vm_name: str
    nic_id: str
    network: str
    mac: str
    ip: str | None


class NetworkStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> list[Network]:
        return [Network.from_row(r) for r in
                self.db.query("SELECT * FROM networks ORDER BY created_at, name")]

    def find(self, name: str) -> Network | None:
        rows = self.db.query("SELECT * FROM networks WHERE name=?", (name,))
        return Network.from_row(rows[0]) if rows else None

    def get(self, name: str) -> Network:
        net = self.find(name)
        if net is None:
            raise SpecError(f"no network named {name!r}", hint="see `vmforge network ls`")
        return net

    def insert(self, net: Network) -> None:
        try:
            with self.db.tx() as c:
                c.execute("INSERT INTO networks (name, subnet, bridge, mode, created_at, "
                          "options) VALUES (?,?,?,?,?,?)", net.to_row())
        except sqlite3.IntegrityError:
            other = self.find(net.name)
            if other is not None:
                raise InvalidState(f"a network named {net.name!r} already exists",
                                   hint="see `vmforge network inspect " + net.name + "`") from None
            raise SpecError(f"another network already uses bridge {net.bridge}",
                            field="--bridge", hint="pick another bridge name") from None

    def delete(self, name: str) -> None:
        try:
            with self.db.tx() as c:
                c.execute("DELETE FROM networks WHERE name=?", (name,))
        except sqlite3.IntegrityError:
            users = ", ".join(sorted({u.vm_name for u in self.users(name)}))
            raise InvalidState(f"network {name} is used by VM(s) {users}",
                               hint="remove those VMs first") from None

    def users(self, name: str | None = None) -> list[NicUse]:
        sql = "SELECT vm_name, nic_id, network, mac, ip FROM vm_nics"
        rows = self.db.query(sql + " WHERE network=? ORDER BY vm_name, nic_id", (name,)) \
            if name is not None else self.db.query(sql + " ORDER BY vm_name, nic_id")
        return [NicUse(*tuple(r)) for r in rows]

    @staticmethod
    def record_vm_nics(c: sqlite3.Connection, vm_name: str, nics: Sequence[ResolvedNic]
                       ) -> None:
        """Within the VM's create transaction: its NICs on managed networks; a static address
        or MAC another VM has on the same network is refused, naming that VM."""
        for n in nics:
            if n.network is None or n.mac is None:
                continue
            field = f"spec.nics[{n.index}]"
            ip = str(n.address.ip) if n.address else None
            if ip is not None:
                row = c.execute("SELECT vm_name FROM vm_nics WHERE network=? AND ip=?",
                                (n.network, ip)).fetchone()
                if row is not None:
                    raise SpecError(f"{ip} is already the address of VM {row[0]} on network "
                                    f"{n.network}", field=f"{field}.ip",
                                    hint="pick another static address")
            row = c.execute("SELECT vm_name FROM vm_nics WHERE network=? AND mac=?",
                            (n.network, n.mac)).fetchone()
            if row is not None:
                raise SpecError(f"MAC {n.mac} is already used by VM {row[0]} on network "
                                f"{n.network}", field=f"{field}.mac",
                                hint="leave mac out (vmforge derives one per VM and NIC)")
            try:
                c.execute("INSERT INTO vm_nics (vm_name, nic_id, network, mac, ip) "
                          "VALUES (?,?,?,?,?)", (vm_name, n.id, n.network, n.mac, ip))
            except sqlite3.IntegrityError:  # the network went away since it was resolved
                raise SpecError(f"no network named {n.network!r}", field=f"{field}.network",
                                hint="see `vmforge network ls`") from None
