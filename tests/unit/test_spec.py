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


# ------------------------------------------------------------------ hostile input (issue 14 §5)

def _billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ['lol0: &lol0 "lol"']
    for i in range(1, levels + 1):
        refs = ", ".join(f"*lol{i - 1}" for _ in range(width))
        lines.append(f"lol{i}: &lol{i} [{refs}]")
    lines.append(f"name: a\nspec: {{cpu_cores: *lol{levels}}}")
    return "\n".join(lines) + "\n"


def test_alias_bomb_fails_fast_in_bounded_memory(tmp_path: Path) -> None:
    import time
    import tracemalloc

    from vmforge.spec import load_document
    text = _billion_laughs()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(SpecError) as exc:
            load_document(text, "bomb.yaml")
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2 and peak < 20 * 2 ** 20
    msg = str(exc.value)
    assert "alias" in msg and "line " in msg and len(msg) < 400
    assert "lol, lol" not in msg and "'lol', 'lol'" not in msg
    f = tmp_path / "bomb.yaml"
    f.write_text(text)
    with pytest.raises(SpecError, match="alias"):
        load_request(f)


def test_small_anchors_and_merge_keys_still_work() -> None:
    from vmforge.spec import load_document
    doc = load_document("base: &b {cpu_cores: 2, memory_mib: 256}\n"
                        "spec:\n  <<: *b\n  memory_mib: 512\n", "x.yaml")
    assert doc["spec"] == {"cpu_cores": 2, "memory_mib": 512}


def test_recursive_alias_is_refused() -> None:
    from vmforge.spec import load_document
    with pytest.raises(SpecError, match="contains it"):
        load_document("a: &a [1, *a]\n", "x.yaml")


def test_deep_nesting_is_refused() -> None:
    from vmforge.spec import load_document
    for depth in (150, 5000):
        with pytest.raises(SpecError, match="nest"):
            load_document("name: " + "[" * depth + "]" * depth + "\n", "x.yaml")


@pytest.mark.parametrize("text,where,key", [
    ("name: a\nname: b\n", "line 2, column 1", "'name'"),
    ('{"name": "a", "name": "b"}', "line 1, column 15", "'name'"),
    ("name: a\nspec:\n  cpu_cores: 1\n  memory_mib: 64\n  cpu_cores: 2\n", "line 5, column 3",
     "'cpu_cores'"),
    ('{"name": "a", "spec": {"disks": [{"id": "d", "size_gib": 1, "id": "e"}]}}',
     "line 1, column 61", "'id'"),
])
def test_duplicate_keys_are_refused(tmp_path: Path, text: str, where: str, key: str) -> None:
    f = tmp_path / "vm.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_request(f)
    msg = str(exc.value)
    assert "duplicate key" in msg and key in msg and where in msg, msg


def test_golden_recipes_refuse_duplicate_keys(tmp_path: Path) -> None:
    from vmforge.builders.golden import load_recipe
    f = tmp_path / "recipe.yaml"
    f.write_text("base: debian\nbase: minimal\n")
    with pytest.raises(SpecError, match="duplicate key 'base'"):
        load_recipe(f)


def test_error_messages_do_not_echo_huge_input() -> None:
    with pytest.raises(SpecError) as exc:
        parse_request({"name": "a", "spec": {"memory_mib": "x" * 100_000}})
    assert exc.value.field == "spec.memory_mib" and len(str(exc.value)) < 600


def test_binary_and_oversized_spec_files_are_spec_errors(tmp_path: Path) -> None:
    from vmforge.yamlload import MAX_DOCUMENT_BYTES
    binary = tmp_path / "disk.qcow2"
    binary.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(range(256)))
    with pytest.raises(SpecError, match="not UTF-8"):
        load_request(binary)
    huge = tmp_path / "huge.yaml"
    with open(huge, "w") as f:
        f.write("name: a\n")
        f.truncate(MAX_DOCUMENT_BYTES + 10)
    with pytest.raises(SpecError, match="larger than 16 MiB"):
        load_request(huge)


def test_bad_scalar_values_are_yaml_errors_with_position() -> None:
    from vmforge.spec import load_document
    with pytest.raises(SpecError, match="line 2, column 10.*not a valid timestamp"):
        load_document("name: a\ncreated: 2024-13-45\n", "x.yaml")


def test_sizes_take_suffixes_everywhere() -> None:
    from vmforge.sizes import to_gib, to_mib
    req = parse_request({"name": "s", "spec": {"memory_mib": "4G", "disks": [
        {"id": "d", "size_gib": "512M"}, {"id": "e", "size_gib": "1.5T"}]}})
    assert req.spec.memory_mib == 4096
    assert [d.size_gib for d in req.spec.disks] == [0.5, 1536]
    assert to_mib(2048) == 2048 and to_mib("2048K") == 2 and to_gib("20G") == 20
    with pytest.raises(SpecError, match=r"spec\.memory_mib: '1\.5K' is not a whole number"):
        parse_request({"name": "s", "spec": {"memory_mib": "1.5K"}})
