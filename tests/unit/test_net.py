"""Networks, pure parts: the address plan, NIC specs and their resolution, the guest's
network-config v2 and kernel tokens, dnsmasq's argv, the nftables ruleset, leases, the NIC part
of QEMU's argv and libvirt's XML, the state migration and the network store."""

from __future__ import annotations

import sqlite3
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from vmforge.enums import NicMode
from vmforge.errors import InvalidState, SpecError
from vmforge.hypervisors.base import Accel
from vmforge.hypervisors.qemu.render import qemu_argv
from vmforge.net import dnsmasq, nft
from vmforge.net.guestconfig import cmdline_tokens, network_config_v2
from vmforge.net.model import NetMode, Network, parse_subnet
from vmforge.net.names import default_bridge_name, derived_mac, tap_name, tap_prefix
from vmforge.net.nics import nic_macs, resolve_nics
from vmforge.node.plan import Inputs, machine_plan
from vmforge.paths import VmPaths
from vmforge.seed.validate import validate_network_config
from vmforge.spec import parse_request

from ..fakes import fake_host
from ..golden import check_golden
from .test_qemu_argv import MINIMAL

HOST = fake_host(tsc_khz=2600000)
PATHS = VmPaths(Path("/data/vms/vm1"))
LAN = Network.new("lan", "10.40.0.0/24", NetMode.NAT, created_at=1.0)
LAB = Network.new("lab", "10.41.0.0/24", NetMode.ISOLATED, created_at=1.0)
NETS = {"lan": LAN, "lab": LAB}
FILES = dnsmasq.DnsmasqFiles(Path("/data/networks/lan"))


def req(nics: list[dict[str, object]], **spec: object) -> object:
    spec.setdefault("kernel", {"image": "minimal"})
    return parse_request({"name": "vm1", "spec": {"nics": nics, **spec}})


# ---------------------------------------------------------------- the address plan

def test_address_plan_of_a_24() -> None:
    assert LAN.bridge == "vmf-lan" and str(LAN.gateway) == "10.40.0.1"
    assert [str(a) for a in LAN.dhcp_range] == ["10.40.0.128", "10.40.0.254"]
    assert [str(a) for a in LAN.static_range] == ["10.40.0.2", "10.40.0.127"]
    assert str(LAN.bridge_address) == "10.40.0.1/24"
    assert LAN.router == LAN.gateway and LAB.router is None


def test_address_plan_of_a_28() -> None:
    net = Network.new("tiny", "192.168.7.16/28", NetMode.HOST)
    assert [str(a) for a in net.dhcp_range] == ["192.168.7.24", "192.168.7.30"]
    assert [str(a) for a in net.static_range] == ["192.168.7.18", "192.168.7.23"]


@pytest.mark.parametrize(("text", "match"), [
    ("10.40.0.1/24", "did you mean 10.40.0.0/24"),
    ("10.40.0.0", "prefix length"),
    ("8.8.8.0/24", "not a private range"),
    ("10.0.0.0/8", "between /16 and /28"),
    ("10.0.0.0/30", "between /16 and /28"),
    ("fd00::/64", "IPv4"),
    ("banana", "not a subnet"),
])
def test_bad_subnets_say_why(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match) as info:
        parse_subnet(text)
    assert info.value.field == "--subnet" or "did you mean" in str(info.value.hint)


def test_static_addresses_live_in_the_lower_half() -> None:
    assert LAN.check_static(IPv4Address("10.40.0.20")) is None
    assert "DHCP range" in str(LAN.check_static(IPv4Address("10.40.0.200")))
    assert "own (bridge) address" in str(LAN.check_static(IPv4Address("10.40.0.1")))
    assert "not in network lan" in str(LAN.check_static(IPv4Address("10.99.0.5")))


def test_names() -> None:
    assert default_bridge_name("lan") == "vmf-lan"
    long = default_bridge_name("a-very-long-network-name")
    assert len(long) == 15 and long.startswith("vmf-")
    assert tap_name("/data/vms/vm1", 0) == tap_prefix("/data/vms/vm1") + "0"
    assert len(tap_name("/data/vms/vm1", 12)) <= 15
    assert tap_prefix("/data/vms/vm1") != tap_prefix("/other/vms/vm1")
    assert derived_mac("vm1", "net0") == derived_mac("vm1", "net0") != derived_mac("vm2", "net0")
    assert derived_mac("vm1", "net0").startswith("52:54:00:")


# ---------------------------------------------------------------- NIC specs

def test_nic_kind_follows_from_bridge_or_network() -> None:
    r = req([{"id": "a", "network": "lan"}, {"id": "b", "bridge": "br0"}, {"id": "c"}])
    modes = [n.mode for n in r.spec.nics]  # type: ignore[attr-defined]
    assert modes == [NicMode.NETWORK, NicMode.BRIDGE, NicMode.USER]


@pytest.mark.parametrize(("nic", "match"), [
    ({"network": "lan", "bridge": "br0"}, "either bridge or network"),
    ({"mode": "bridge"}, "needs bridge"),
    ({"mode": "user", "network": "lan"}, "takes neither"),
    ({"network": "lan", "forwards": [{"host_port": 1, "guest_port": 2}]}, "forwards are for"),
    ({"ip": "10.0.0.5"}, "needs a bridge or network"),
    ({"bridge": "br0", "ip": "192.168.1.20"}, "prefix length"),
    ({"network": "lan", "ip": "10.40.0.300"}, "not an IP address"),
    ({"network": "lan", "ip": "fd00::5"}, "IPv4"),
    ({"network": "lan", "gateway": "10.40.0.1"}, "goes with a static ip"),
    ({"bridge": "a/b"}, "spec.nics\\[0\\].bridge"),
    ({"network": "-lan"}, "spec.nics\\[0\\].network"),
])
def test_bad_nics_name_the_field(nic: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        req([nic])


def test_old_specs_still_parse() -> None:
    r = req([{"id": "net0", "mode": "user", "mac": "52:54:00:12:34:56",
              "forwards": [{"host_port": 2222, "guest_port": 22}]}])
    assert r.spec.nics[0].mode is NicMode.USER  # type: ignore[attr-defined]


# ---------------------------------------------------------------- resolution

def test_resolve_static_dhcp_and_user() -> None:
    r = req([{"id": "net0", "network": "lan", "ip": "10.40.0.20"},
             {"id": "net1", "network": "lab"}, {"id": "net2"}])
    nics = resolve_nics("vm1", r.spec.nics, NETS)  # type: ignore[attr-defined]
    assert [n.bridge for n in nics] == ["vmf-lan", "vmf-lab", None]
    assert str(nics[0].address) == "10.40.0.20/24" and str(nics[0].gateway) == "10.40.0.1"
    assert nics[0].dns == ("10.40.0.1",)
    assert nics[1].dhcp and nics[1].gateway is None
    assert all(n.mac and n.mac.startswith("52:54:00:") for n in nics)  # user NIC too


def test_user_only_nics_keep_qemus_default_mac() -> None:
    assert nic_macs("vm1", [{"id": "net0", "mode": "user"}]) == [None]
    assert nic_macs("vm1", [{"id": "net0", "mac": "52:54:00:AB:CD:EF"}]) == ["52:54:00:ab:cd:ef"]


@pytest.mark.parametrize(("nics", "field", "match"), [
    ([{"network": "nope"}], "spec.nics[0].network", "no network named 'nope'"),
    ([{"network": "lan", "ip": "10.40.0.200"}], "spec.nics[0].ip", "DHCP range"),
    ([{"network": "lan", "ip": "10.40.0.20/16"}], "spec.nics[0].ip", "is 10.40.0.0/24"),
    ([{"id": "a", "network": "lan"}, {"id": "a"}], "spec.nics", "unique"),
    ([{"id": "a", "mac": "52:54:00:00:00:01"}, {"id": "b", "mac": "52:54:00:00:00:01"}],
     "spec.nics", "share a MAC"),
])
def test_resolution_errors(nics: list[dict[str, object]], field: str, match: str) -> None:
    r = req(nics)
    with pytest.raises(SpecError, match=match) as info:
        resolve_nics("vm1", r.spec.nics, NETS)  # type: ignore[attr-defined]
    assert info.value.field == field


def test_libvirt_networks_by_name_when_vmforge_has_none() -> None:
    r = req([{"network": "default"}])
    (nic,) = resolve_nics("vm1", r.spec.nics, NETS, named_networks=True)  # type: ignore[attr-defined]
    assert nic.libvirt_network == "default" and nic.bridge is None


# ---------------------------------------------------------------- the guest's configuration

def test_network_config_v2_golden_and_schema_valid() -> None:
    r = req([{"id": "net0", "network": "lan", "ip": "10.40.0.20"},
             {"id": "net1", "network": "lab"}, {"id": "net2"},
             {"id": "net3", "bridge": "br0", "ip": "192.168.1.20/24",
              "gateway": "192.168.1.1"}])
    nics = resolve_nics("vm1", r.spec.nics, NETS)  # type: ignore[attr-defined]
    text = network_config_v2(nics)
    assert text is not None
    check_golden("netcfg-v2.yaml", text)
    assert validate_network_config(text, "netcfg", schema=True) == 2


def test_no_network_config_for_user_mode_only() -> None:
    r = req([{"id": "net0"}])
    assert network_config_v2(resolve_nics("vm1", r.spec.nics, NETS)) is None  # type: ignore[attr-defined]


def test_kernel_tokens() -> None:
    r = req([{"id": "net0", "network": "lan", "ip": "10.40.0.20"},
             {"id": "net1", "network": "lab"}, {"id": "net2"}])
    nics = resolve_nics("vm1", r.spec.nics, NETS)  # type: ignore[attr-defined]
    tokens = cmdline_tokens(nics)
    assert tokens == [f"vmforge.net={nics[0].mac},10.40.0.20/24,10.40.0.1",
                      f"vmforge.net={nics[1].mac},dhcp"]


# ---------------------------------------------------------------- dnsmasq, nftables, leases

def test_dnsmasq_argv_golden() -> None:
    nat = dnsmasq.dnsmasq_argv(LAN, FILES)
    iso = dnsmasq.dnsmasq_argv(LAB, dnsmasq.DnsmasqFiles(Path("/data/networks/lab")))
    check_golden("dnsmasq-nat.txt", "\n".join(nat) + "\n")
    check_golden("dnsmasq-isolated.txt", "\n".join(iso) + "\n")
    assert "--conf-file=/dev/null" in nat and "--interface=vmf-lan" in nat
    assert "--dhcp-range=10.40.0.128,10.40.0.254,255.255.255.0,1h" in nat
    assert "--dhcp-option=option:router" not in nat and "--no-resolv" not in nat
    assert "--dhcp-option=option:router" in iso and "--no-resolv" in iso


def test_nft_ruleset_golden() -> None:
    nat, iso = nft.ruleset(LAN), nft.ruleset(LAB)
    assert nat is not None and iso is not None
    check_golden("nft-nat.txt", nat)
    check_golden("nft-isolated.txt", iso)
    assert nft.ruleset(Network.new("h", "10.42.0.0/24", NetMode.HOST)) is None
    script = nft.replace_script(LAN)
    assert script is not None and script.startswith(
        "add table ip vmforge-lan\ndelete table ip vmforge-lan\ntable ip vmforge-lan {")
    assert 'oifname "vmf-lan" drop' in nat and "masquerade" in nat and "masquerade" not in iso


def test_leases() -> None:
    text = ("1700000000 52:54:00:AA:BB:CC 10.40.0.150 vm1 01:52:54:00:aa:bb:cc\n"
            "0 52:54:00:00:00:02 10.40.0.151 * *\n"
            "garbage\nduid 00:01:00:01\n")
    leases = dnsmasq.parse_leases(text)
    assert [(le.mac, le.ip, le.hostname) for le in leases] == [
        ("52:54:00:aa:bb:cc", "10.40.0.150", "vm1"), ("52:54:00:00:00:02", "10.40.0.151", None)]


# ---------------------------------------------------------------- backends

def test_qemu_argv_with_taps_golden() -> None:
    r = req([{"id": "net0", "network": "lan"}, {"id": "net1", "network": "lab",
                                                  "ip": "10.41.0.9"}, {"id": "net2"}])
    plan = machine_plan(r, Inputs({}, MINIMAL), PATHS, HOST, Accel.TCG, NETS)  # type: ignore[arg-type]
    argv = qemu_argv(plan, HOST)
    check_golden("argv-networks.txt", "\n".join(argv) + "\n")
    tap0, tap1 = tap_name(PATHS.dir, 0), tap_name(PATHS.dir, 1)
    assert f"tap,id=net0,ifname={tap0},script=no,downscript=no" in argv
    assert f"tap,id=net1,ifname={tap1},script=no,downscript=no" in argv
    assert "user,id=net2" in argv
    cmdline = argv[argv.index("-append") + 1]
    assert f"vmforge.net={plan.nics[0].mac},dhcp" in cmdline
    assert f"vmforge.net={plan.nics[1].mac},10.41.0.9/24" in cmdline
    assert all(f"mac={n.mac}" in " ".join(argv) for n in plan.nics)


def test_libvirt_gets_the_bridge_and_makes_its_own_tap() -> None:
    import xml.etree.ElementTree as ET

    from vmforge.hypervisors.libvirt.render import domain_xml
    r = req([{"id": "net0", "network": "lan"}, {"id": "net1", "network": "default"},
             {"id": "net2", "bridge": "br0"}], hypervisor="libvirt")
    plan = machine_plan(r, Inputs({}, MINIMAL), PATHS, HOST, Accel.TCG, NETS)  # type: ignore[arg-type]
    assert [n.tap for n in plan.nics] == [None, None, None]
    root = ET.fromstring(domain_xml(plan, HOST))
    ifaces = [(i.get("type"), i.find("source").attrib)  # type: ignore[union-attr]
              for i in root.iter("interface")]
    assert ifaces == [("bridge", {"bridge": "vmf-lan"}), ("network", {"network": "default"}),
                      ("bridge", {"bridge": "br0"})]


def test_qemu_refuses_a_bridge_nic_without_tap() -> None:
    from dataclasses import replace
    r = req([{"id": "net0", "network": "lan"}])
    plan = machine_plan(r, Inputs({}, MINIMAL), PATHS, HOST, Accel.TCG, NETS)  # type: ignore[arg-type]
    plan = replace(plan, nics=(replace(plan.nics[0], tap=None),))
    with pytest.raises(SpecError, match="needs a tap"):
        qemu_argv(plan, HOST)


# ---------------------------------------------------------------- state

def test_migration_2_to_3(tmp_path: Path) -> None:
    from vmforge.state import MIGRATIONS, SCHEMA_V1, SCHEMA_VERSION, Database
    assert SCHEMA_VERSION == 3
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    for stmt in SCHEMA_V1.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    MIGRATIONS[1](conn)
    conn.execute("INSERT INTO vms (name, state, spec, dir, created_at) "
                 "VALUES ('a', 'stopped', '{}', '/d', 0)")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    db = Database(path)
    assert db.query("PRAGMA user_version")[0][0] == 3
    assert db.query("SELECT name, guest_net FROM vms")[0]["guest_net"] is None
    assert db.query("SELECT count(*) FROM networks")[0][0] == 0
    db.close()


def test_store_refuses_to_delete_a_network_in_use(tmp_path: Path) -> None:
    from vmforge.net.store import NetworkStore
    from vmforge.state import Database
    db = Database(tmp_path / "state.db")
    store = NetworkStore(db)
    store.insert(LAN)
    with pytest.raises(InvalidState, match="already exists"):
        store.insert(LAN)
    with pytest.raises(SpecError, match="bridge vmf-lan"):
        store.insert(Network("other", LAB.subnet, "vmf-lan"))
    r = req([{"id": "net0", "network": "lan", "ip": "10.40.0.20"}])
    nics = resolve_nics("vm1", r.spec.nics, {"lan": LAN})  # type: ignore[attr-defined]
    with db.tx() as c:
        c.execute("INSERT INTO vms (name, state, spec, dir, created_at) "
                  "VALUES ('vm1', 'created', '{}', '/d', 0)")
        NetworkStore.record_vm_nics(c, "vm1", nics)
    r2 = parse_request({"name": "vm2", "spec": {"nics": [{"network": "lan",
                                                          "ip": "10.40.0.20"}]}})
    nics2 = resolve_nics("vm2", r2.spec.nics, {"lan": LAN})
    with pytest.raises(SpecError, match="already the address of VM vm1") as info:
        with db.tx() as c:
            c.execute("INSERT INTO vms (name, state, spec, dir, created_at) "
                      "VALUES ('vm2', 'created', '{}', '/d2', 0)")
            NetworkStore.record_vm_nics(c, "vm2", nics2)
    assert info.value.field == "spec.nics[0].ip"
    assert [r["name"] for r in db.query("SELECT name FROM vms")] == ["vm1"]  # rolled back
    with pytest.raises(InvalidState, match="used by VM.s. vm1"):
        store.delete("lan")
    with db.tx() as c:
        c.execute("DELETE FROM vms WHERE name='vm1'")  # its NICs go with it
    store.delete("lan")
    assert store.all() == []
    db.close()


def test_describe_cross_checks_the_lease(tmp_path: Path) -> None:
    import json
    import time

    from vmforge.node.manager import VmManager
    from vmforge.paths import DataDir
    m = VmManager(DataDir(tmp_path))
    m.networks.store.insert(LAN)
    r = req([{"id": "net0", "network": "lan"}, {"id": "net1"}])
    mac0, mac1 = nic_macs("vm1", [{"id": "net0", "network": "lan"}, {"id": "net1"}])
    report = {"at": 1, "interfaces": [
        {"name": "eth0", "mac": mac0, "ipv4": ["10.40.0.150/24"], "ipv6": []},
        {"name": "eth1", "mac": mac1, "ipv4": ["10.0.2.15/24"], "ipv6": []}]}
    with m.db.tx() as c:
        c.execute("INSERT INTO vms (name, state, spec, spec_rev, dir, created_at, guest_net) "
                  "VALUES ('vm1', 'running', ?, 1, ?, 0, ?)",
                  (r.model_dump_json(by_alias=True), str(tmp_path / "vms/vm1"),  # type: ignore[attr-defined]
                   json.dumps(report)))
    files = m.networks.files("lan")
    files.dir.mkdir(parents=True)
    files.leases.write_text(f"{int(time.time()) + 3600} {mac0} 10.40.0.150 vm1 *\n")
    rec = m.get("vm1", reconcile=False)
    assert rec.ipv4 == ["10.40.0.150"]  # host networks only: not user-mode's 10.0.2.15
    d = m.describe(rec)
    assert d["ipv4"] == ["10.40.0.150"]
    assert d["nics"][0]["lease"]["ip"] == "10.40.0.150" and d["nics"][0]["lease_matches"]
    assert d["nics"][1]["ipv4"] == ["10.0.2.15"] and d["nics"][1]["lease"] is None
    m.close()
