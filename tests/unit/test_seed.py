from __future__ import annotations

import email
import gzip
from pathlib import Path

import pytest
import yaml

from vmforge.errors import SeedError
from vmforge.seed import build_seed, default_user_data, inject_agent
from vmforge.seed.validate import validate_network_config, validate_user_data
from vmforge.spec import CloudInit

from ..golden import check_golden


def test_meta_data_defaults_from_name() -> None:
    seed = build_seed("web-01", CloudInit(user_data="#cloud-config\nhostname: x\n"))
    assert yaml.safe_load(seed.meta_data) == {"instance-id": "web-01", "local-hostname": "web-01"}
    assert seed.user_data == b"#cloud-config\nhostname: x\n"
    assert [n for n, _ in seed.files()] == ["meta-data", "user-data"]


def test_meta_data_given_is_kept() -> None:
    seed = build_seed("web-01", CloudInit(meta_data="instance-id: i-1\n"))
    assert yaml.safe_load(seed.meta_data) == {"instance-id": "i-1", "local-hostname": "web-01"}


def test_optional_files_present_when_given() -> None:
    seed = build_seed("a", CloudInit(network_config="version: 2\nethernets: {}\n",
                                     vendor_data="#cloud-config\n{}\n"))
    assert [n for n, _ in seed.files()] == ["meta-data", "user-data", "network-config",
                                            "vendor-data"]


def test_default_user_data_golden() -> None:
    data = default_user_data("web-01", "ssh-ed25519 AAAAC3Nza test@host", user="alice")
    check_golden("seed-default-user-data.yaml", data.decode())
    doc = yaml.safe_load(data)
    assert doc["users"][1]["ssh_authorized_keys"] == ["ssh-ed25519 AAAAC3Nza test@host"]


def test_seed_files_golden() -> None:
    seed = build_seed("vm1", CloudInit(
        user_data="#cloud-config\nhostname: vm1\nruncmd:\n  - [touch, /marker]\n",
        network_config="version: 2\nethernets:\n  eth0:\n    match: {macaddress: "
                       "'52:54:00:12:34:56'}\n    set-name: eth0\n    dhcp4: true\n"))
    check_golden("seed-files.txt", "".join(f"== {n}\n{d.decode()}" for n, d in seed.files()))


@pytest.mark.parametrize("text,where", [
    ("#cloud-config\nhostname: [a\n", "line 3, column 1"),
    ("#cloud-config\nusers:\n  - name: a\n   bad: 1\n", "line 4"),
])
def test_user_data_yaml_error_has_line_and_column(text: str, where: str) -> None:
    with pytest.raises(SeedError) as exc:
        validate_user_data(text.encode(), "spec.cloud_init.user_data")
    assert where in str(exc.value)
    assert exc.value.field == "spec.cloud_init.user_data"


def test_user_data_must_be_a_mapping() -> None:
    with pytest.raises(SeedError, match="mapping"):
        validate_user_data(b"#cloud-config\n- a\n- b\n")


def test_user_data_kinds() -> None:
    assert validate_user_data(b"#cloud-config\nhostname: a\n") == "cloud-config"
    assert validate_user_data(b"#!/bin/sh\necho hi\n") == "script"
    assert validate_user_data(gzip.compress(b"#cloud-config\nhostname: a\n")) == "gzip"
    assert validate_user_data(b"") == "empty"
    mime = inject_agent(build_seed("a", None), b"print(1)\n").user_data
    assert validate_user_data(mime) == "mime"


def test_user_data_gzip_of_bad_yaml_is_caught() -> None:
    with pytest.raises(SeedError, match="line"):
        validate_user_data(gzip.compress(b"#cloud-config\na: [\n"))


def test_unknown_user_data_is_rejected_with_hint() -> None:
    with pytest.raises(SeedError) as exc:
        validate_user_data(b"hostname: a\n")
    assert "#cloud-config" in (exc.value.hint or "")


@pytest.mark.parametrize("text,ok", [
    ("version: 2\nethernets:\n  eth0: {dhcp4: true}\n", 2),
    ("network:\n  version: 2\n  ethernets: {}\n", 2),
    ("version: 1\nconfig:\n  - type: physical\n    name: eth0\n", 1),
])
def test_network_config_versions(text: str, ok: int) -> None:
    assert validate_network_config(text) == ok


@pytest.mark.parametrize("text,msg", [
    ("version: 3\n", "version must be 1 or 2"),
    ("version: 2\nethernet: {}\n", "unknown key 'ethernet'.*did you mean 'ethernets'"),
    ("version: 2\nethernets: [eth0]\n", "must be a mapping"),
    ("version: 1\nconfig: {}\n", "config"),
])
def test_network_config_errors(text: str, msg: str) -> None:
    with pytest.raises(SeedError, match=msg):
        validate_network_config(text)


def test_agent_injection_keeps_user_config_and_appends() -> None:
    user = "#cloud-config\nhostname: keep-me\nwrite_files:\n  - path: /etc/mine\n    content: x\n"
    seed = inject_agent(build_seed("a", CloudInit(user_data=user)), b"AGENT SOURCE\n")
    msg = email.message_from_bytes(seed.user_data)
    parts = [p for p in msg.walk() if not p.is_multipart()]
    assert len(parts) == 2
    first = parts[0].get_payload(decode=True)
    assert isinstance(first, bytes) and first.decode() == user  # byte for byte
    agent_doc = yaml.safe_load(parts[1].get_payload(decode=True))  # type: ignore[arg-type]
    assert {"name": "list", "settings": ["append"]} in agent_doc["merge_how"]
    assert agent_doc["write_files"][0]["path"] == "/usr/local/lib/vmforge/agent.py"


def test_agent_source_is_the_real_guest_file() -> None:
    import vmforge.agent.guest as g
    src = Path(g.__file__).read_text()
    assert "def main()" in src and "import vmforge" not in src


def test_iso_matches_an_independent_reader(tmp_path: Path) -> None:
    """Our ISO writer, read back by pycdlib (a separate ISO 9660 implementation)."""
    import io

    import pycdlib

    from vmforge.seed import write_iso
    seed = build_seed("vm1", CloudInit(user_data="#cloud-config\nhostname: vm1\n",
                                       network_config="version: 2\nethernets: {}\n",
                                       vendor_data=""))
    iso_path = write_iso(seed, tmp_path / "seed.iso", mtime=0)
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        assert iso.has_rock_ridge() and iso.has_joliet()
        assert iso.pvd.volume_identifier.rstrip() == b"cidata"
        for name, data in seed.files():
            for kw in ({"rr_path": "/" + name}, {"joliet_path": "/" + name}):
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, **kw)
                assert buf.getvalue() == data, (name, kw)
    finally:
        iso.close()


def test_iso_bytes_are_reproducible_golden(tmp_path: Path) -> None:
    import hashlib

    from vmforge.seed import write_iso
    seed = build_seed("vm1", CloudInit(user_data="#cloud-config\nhostname: vm1\n"))
    a = write_iso(seed, tmp_path / "a.iso", mtime=1_700_000_000).read_bytes()
    b = write_iso(seed, tmp_path / "b.iso", mtime=1_700_000_000).read_bytes()
    assert a == b
    check_golden("seed-iso.sha256", hashlib.sha256(a).hexdigest() + "\n")


def test_vfat_layout_and_long_names(tmp_path: Path) -> None:
    import struct

    from vmforge.seed.vfat import build_vfat
    img = build_vfat([("network-config", b"version: 2\n" * 100), ("user-data", b"x")],
                     mtime=1_700_000_000)
    assert img[510:512] == b"\x55\xaa" and img[54:62] == b"FAT12   "
    assert img[43:54] == b"CIDATA     "
    fat_sectors = struct.unpack_from("<H", img, 22)[0]
    root = img[(1 + 2 * fat_sectors) * 512:][:64 * 32]
    names = []
    for i in range(0, len(root), 32):
        e = root[i:i + 32]
        if e[0] and e[11] == 0x0F:
            names.append(e[1:11] + e[14:26] + e[28:32])
    text = b"".join(reversed(names)).decode("utf-16-le")
    assert "network-config" in text and "user-data" in text
    assert build_vfat([("a", b"1")], mtime=0) == build_vfat([("a", b"1")], mtime=0)


# ------------------------------------------------------------------ hostile input (issue 14 §5)

def test_oversized_user_data_is_refused_with_the_limit_in_the_hint() -> None:
    from vmforge.seed.validate import MAX_SEED_FILE_BYTES
    big = "#cloud-config\n" + "#" * MAX_SEED_FILE_BYTES + "\n"
    with pytest.raises(SeedError) as exc:
        build_seed("a", CloudInit(user_data=big))
    assert exc.value.field == "spec.cloud_init.user_data"
    assert "1 MiB" in str(exc.value) and len(str(exc.value)) < 400
    ok = "#cloud-config\n" + "#" * (MAX_SEED_FILE_BYTES - 100) + "\n"
    assert build_seed("a", CloudInit(user_data=ok)).user_data == ok.encode()


def test_oversized_network_config_and_meta_data_are_refused() -> None:
    from vmforge.seed.validate import MAX_SEED_FILE_BYTES
    pad = "#" * MAX_SEED_FILE_BYTES + "\n"
    with pytest.raises(SeedError) as exc:
        build_seed("a", CloudInit(network_config=pad + "version: 2\n"))
    assert exc.value.field == "spec.cloud_init.network_config"
    with pytest.raises(SeedError) as exc:
        build_seed("a", CloudInit(meta_data=pad + "instance-id: x\n"))
    assert (exc.value.field or "").endswith("meta_data")  # build.py names it "meta_data"


def test_gzip_bomb_user_data_is_refused_without_inflating_it() -> None:
    import time
    bomb = gzip.compress(b"#cloud-config\n" + b" " * (200 * 2 ** 20), compresslevel=9)
    assert len(bomb) < 2 ** 20
    t0 = time.perf_counter()
    with pytest.raises(SeedError, match="decompress") as exc:
        validate_user_data(bomb, "spec.cloud_init.user_data")
    assert time.perf_counter() - t0 < 2
    assert exc.value.field == "spec.cloud_init.user_data"


def test_alias_bomb_and_duplicate_keys_in_user_data() -> None:
    lines = ["#cloud-config", 'a0: &a0 "lol"']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    with pytest.raises(SeedError, match="alias") as exc:
        validate_user_data("\n".join(lines).encode(), "spec.cloud_init.user_data")
    assert len(str(exc.value)) < 400
    # repeated keys are read as cloud-init reads them (the last wins): its own documentation
    # repeats `apt:` and `disk_setup:` in examples (spec files, unlike seeds, refuse them)
    assert validate_user_data(b"#cloud-config\nruncmd: [a]\nruncmd: [b]\n") == "cloud-config"
    assert validate_user_data(b"#cloud-config\nhostname: a\nhostname: b\n") == "cloud-config"


@pytest.mark.parametrize("text,path,where", [
    ("version: 2\nethernets:\n  eth0:\n    dhcp4: yes\n    adresses: [10.0.0.2/24]\n",
     "ethernets.eth0.adresses", "line 5, column 5"),
    ("version: 2\nethernets: {eth0: {dhcp4: true, adresses: [10.0.0.2/24]}}\n",
     "ethernets.eth0.adresses", "line 2, column 33"),
    ("network:\n  version: 2\n  ethernets:\n    id0:\n"
     "      match: {macadress: '52:54:00:12:34:56'}\n",
     "network.ethernets.id0.match.macadress", "line 5, column 15"),
    ("version: 2\nethernets:\n  eth0:\n    dhcp4: maybe\n", "ethernets.eth0.dhcp4",
     "line 4, column 5"),
    ("version: 2\nethernets:\n  eth0:\n    dhcp4: 1\n", "ethernets.eth0.dhcp4",
     "line 4, column 5"),
    ("version: 2\nbonds:\n  bond0:\n    interfaces: [eth0]\n    parameters: {mode: fast}\n",
     "bonds.bond0.parameters.mode", "line 5, column 18"),
])
def test_network_config_v2_typos_below_the_top_level(text: str, path: str, where: str) -> None:
    with pytest.raises(SeedError) as exc:
        validate_network_config(text, "spec.cloud_init.network_config")
    msg = str(exc.value)
    assert exc.value.field == "spec.cloud_init.network_config"
    assert path in msg and where in msg, msg


def test_network_config_typo_suggests_the_key() -> None:
    with pytest.raises(SeedError, match="did you mean 'addresses'"):
        validate_network_config("version: 2\nethernets: {eth0: {adresses: [10.0.0.2/24]}}\n")


@pytest.mark.parametrize("text", [
    # netplan keys that cloud-init's schema does not list still pass (netplan renders them)
    "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n    link-local: [ipv6]\n"
    "    macaddress: '52:54:00:12:34:56'\n    critical: true\n",
    "version: 2\nwifis:\n  wlan0:\n    access-points: {home: {password: x}}\n",
    "version: 2\nethernets:\n  eth0:\n    match: {macaddress: '52:54:00:12:34:56'}\n"
    "    set-name: eth0\n    addresses: [192.168.1.2/24]\n    routes:\n"
    "      - {to: default, via: 192.168.1.1}\n    nameservers: {addresses: [1.1.1.1]}\n",
])
def test_valid_network_config_v2_passes(text: str) -> None:
    assert validate_network_config(text) == 2


def test_network_config_v1_type_typo() -> None:
    with pytest.raises(SeedError) as exc:
        validate_network_config("version: 1\nconfig:\n  - type: physical\n    name: eth0\n"
                                "    subnets: [{type: dhcp, adress: 10.0.0.2}]\n")
    assert "config[0].subnets[0].adress" in str(exc.value)
    assert "line 5, column 28" in str(exc.value)
