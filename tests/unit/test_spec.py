from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmforge.errors import SpecError
from vmforge.spec import BootDevice, Firmware, load_request, parse_request

DAEMON_REQUEST = (
    '{"name": "web-server-01", "spec": {"cpu_cores": 4, "memory_mib": 4096, "disks": '
    '[{"id": "boot-disk", "size_gib": 50, "bootable": true, "backing_file": '
    '"/var/lib/x/ubuntu-22.04.qcow2"}], "cloud_init": {"user_data": "#cloud-config\\nhostname:'
    ' web-server-01", "meta_data": "instance-id: web-server-01\\nlocal-hostname: '
    'web-server-01"}}}')


def test_daemon_request_loads_verbatim() -> None:
    req = parse_request(json.loads(DAEMON_REQUEST))
    assert req.name == "web-server-01"
    assert req.spec.cpu_cores == 4 and req.spec.memory_mib == 4096
    disk = req.spec.disks[0]
    assert (disk.id, disk.size_gib, disk.bootable) == ("boot-disk", 50, True)
    assert disk.backing_file == "/var/lib/x/ubuntu-22.04.qcow2"
    assert req.spec.cloud_init is not None
    assert req.spec.cloud_init.user_data == "#cloud-config\nhostname: web-server-01"
    assert req.spec.boot_disk == disk


def test_uefi_cdrom_boot_order_spec() -> None:
    req = parse_request({"name": "installer", "spec": {
        "firmware": "FIRMWARE_UEFI", "boot_order": ["BOOT_DEVICE_CDROM", "BOOT_DEVICE_DISK"],
        "disks": [{"id": "root", "size_gib": 20, "bootable": True}],
        "cdroms": [{"id": "installer", "iso_path": "/isos/debian.iso", "bootable": True},
                   {"id": "drivers", "iso_path": "/isos/virtio-win.iso"}]}})
    assert req.spec.firmware is Firmware.UEFI
    assert req.spec.boot_order == (BootDevice.CDROM, BootDevice.DISK)
    assert [c.bootable for c in req.spec.cdroms] == [True, False]


def test_short_enum_spellings() -> None:
    req = parse_request({"name": "a", "spec": {"firmware": "uefi", "boot_order": ["disk"],
                                               "disks": [{"id": "d", "size_gib": 1}]}})
    assert req.spec.firmware is Firmware.UEFI


def test_models_are_frozen() -> None:
    req = parse_request({"name": "a"})
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="frozen"):
        req.spec.cpu_cores = 3  # type: ignore[misc]


@pytest.mark.parametrize("data,field,words", [
    ({"name": "a", "spec": {"memory_mib": -1}}, "spec.memory_mib", "greater than or equal"),
    ({"name": "a", "spec": {"cpu_cores": 0}}, "spec.cpu_cores", "greater than or equal"),
    ({"name": "../etc", "spec": {}}, "name", "letters, digits"),
    ({"name": "a/b"}, "name", "letters, digits"),
    ({"name": "a", "spec": {"colour": "red"}}, "spec.colour", "unknown field"),
    ({"name": "a", "spec": {"disks": [{"id": "d", "size_gib": 1, "sizee": 2}]}},
     "spec.disks[0].sizee", "unknown field"),
    ({"name": "a", "spec": {"firmware": "FIRMWARE_COREBOOT"}}, "spec.firmware", "bios"),
    ({"name": "a", "spec": {"disks": [{"id": "d"}]}}, "spec.disks[0]", "needs size_gib"),
    ({"name": "a", "spec": {"boot_order": ["BOOT_DEVICE_CDROM"]}}, "spec", "no cdrom"),
    ({"spec": {}}, "name", "required"),
])
def test_bad_specs_name_the_field(data: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_request(data)
    assert exc.value.field == field
    assert field in str(exc.value) and words in str(exc.value)


def test_bad_yaml_reports_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "vm.yaml"
    f.write_text("name: a\nspec:\n  cpu_cores: [1, 2\n  memory_mib: 3\n")
    with pytest.raises(SpecError) as exc:
        load_request(f)
    assert "line 4, column" in str(exc.value)


def test_relative_paths_resolve_against_spec_dir(tmp_path: Path) -> None:
    f = tmp_path / "vm.yaml"
    f.write_text("name: a\nspec:\n  cdroms: [{id: c, iso_path: isos/x.iso}]\n")
    req = load_request(f)
    assert req.spec.cdroms[0].iso_path == str(tmp_path / "isos" / "x.iso")


def test_name_override(tmp_path: Path) -> None:
    f = tmp_path / "vm.yaml"
    f.write_text("name: a\n")
    assert load_request(f, name="b").name == "b"


@given(st.text(max_size=70))
def test_name_validation_never_accepts_path_tricks(name: str) -> None:
    try:
        req = parse_request({"name": name})
    except SpecError:
        return
    assert "/" not in req.name and ".." not in req.name and req.name.strip() == req.name


def test_provision_steps_validate() -> None:
    req = parse_request({"name": "a", "spec": {"provision": [
        {"copy": ["./dir", "/srv"]}, {"run": ["true"]}, {"shell": "echo hi"},
        {"wait_health": True}]}})
    assert [s.label for s in req.spec.provision] == [
        "copy ./dir -> /srv", "run true", "shell echo hi", "wait for health"]
    with pytest.raises(SpecError, match="exactly one"):
        parse_request({"name": "a", "spec": {"provision": [{"run": ["a"], "shell": "b"}]}})
    with pytest.raises(SpecError, match="exactly one"):
        parse_request({"name": "a", "spec": {"health_checks": [{"name": "empty"}]}})
