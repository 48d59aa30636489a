"""cloud-config and network-config checked against cloud-init's own JSON schemas (issue 13 §5)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from vmforge.errors import SeedError
from vmforge.seed import build_seed, inject_agent
from vmforge.seed.validate import validate_files, validate_network_config, validate_user_data
from vmforge.spec import CloudInit

DATA = Path(__file__).parent / "data"
MODULE_EXAMPLES = json.loads((DATA / "cloud-init-module-examples.json").read_text())["examples"]
NETWORK_EXAMPLES = json.loads((DATA / "cloud-init-network-examples.json").read_text())[
    "examples"]
LIBRARY_EXAMPLES = json.loads((DATA / "cloud-init-library-examples.json").read_text())[
    "examples"]
# An example of cloud-init's examples library that breaks cloud-init's own schema *and* its
# code: cc_ansible runs each of galaxy.actions as a command (a list), so these four strings
# would fail at boot. Refusing it is the point of the check; it is reported upstream-worthy.
LIBRARY_BROKEN = {"yaml_examples/ansible_controller.rst#1": "ansible.galaxy.actions[0]: must "
                                                            "be a list (got a string)"}
UD = "spec.cloud_init.user_data"


def _error(text: str) -> str:
    with pytest.raises(SeedError) as exc:
        validate_user_data(text.encode(), UD)
    assert (exc.value.field or "").startswith(UD)
    return str(exc.value)


@pytest.mark.parametrize("name", sorted(MODULE_EXAMPLES))
def test_every_cloud_init_module_example_is_accepted(name: str) -> None:
    kind = validate_user_data(MODULE_EXAMPLES[name].encode(), UD)
    assert kind in ("cloud-config", "other")  # "other": the two jinja templates


@pytest.mark.parametrize("name", sorted(LIBRARY_EXAMPLES))
def test_every_cloud_init_library_example_is_accepted(name: str) -> None:
    text = LIBRARY_EXAMPLES[name].encode()
    if name in LIBRARY_BROKEN:
        with pytest.raises(SeedError, match=re.escape(LIBRARY_BROKEN[name])):
            validate_user_data(text, UD)
        assert validate_user_data(text, UD, schema=False) == "cloud-config"
        return
    assert validate_user_data(text, UD) == ("archive" if "archive" in name else "cloud-config")


def test_cloud_config_archive_parts_are_checked() -> None:
    text = ("#cloud-config-archive\n- type: text/cloud-config\n  content: |\n"
            "    #cloud-config\n    runcmd: 'echo hi'\n- '#!/bin/sh\n  echo hi'\n")
    msg = _error(text)
    assert "archive part 0" in msg and "runcmd" in msg and "line 2, column 1" in msg, msg
    with pytest.raises(SeedError, match="list of parts"):
        validate_user_data(b"#cloud-config-archive\na: 1\n", UD)


def test_where_the_schema_is_stricter_than_cloud_init() -> None:
    """cloud-init's code and docs accept these; its schema alone would not."""
    assert validate_user_data(b"#cloud-config\nfs_setup:\n  - {device: /dev/vdb, partition: 1,"
                              b" filesystem: ext4}\ndatasource: {NoCloud: {}}\n"
                              b"datasource_list: [NoCloud]\n", UD) == "cloud-config"
    msg = _error("#cloud-config\nfs_setup:\n  - {device: /dev/vdb, partition: sometimes}\n")
    assert "fs_setup[0].partition" in msg, msg


def test_the_examples_are_the_real_set() -> None:
    assert len(MODULE_EXAMPLES) >= 120
    assert {"cc_write_files/example1", "cc_users_groups/example1", "cc_runcmd/example1",
            "cc_apt_configure/example1", "cc_ntp/example1"} <= set(MODULE_EXAMPLES)
    assert len(LIBRARY_EXAMPLES) >= 50 and len(NETWORK_EXAMPLES) >= 15


@pytest.mark.parametrize("name", sorted(NETWORK_EXAMPLES))
def test_every_cloud_init_network_example_is_accepted(name: str) -> None:
    expected = 1 if "-v1-" in name else 2
    assert validate_network_config(NETWORK_EXAMPLES[name]) == expected


def test_wrong_type() -> None:
    msg = _error("#cloud-config\nhostname: a\nruncmd: \"echo hi\"\n")
    assert "line 3, column 1" in msg and "runcmd" in msg and "must be" in msg, msg


def test_missing_required_key() -> None:
    msg = _error("#cloud-config\nwrite_files:\n  - content: hello\n    owner: root:root\n")
    assert "write_files[0]" in msg and "'path'" in msg and "required" in msg, msg
    assert "line 3, column 5" in msg, msg


@pytest.mark.parametrize("text,path,where,choices", [
    ("#cloud-config\npower_state:\n  mode: restart\n", "power_state.mode", "line 3, column 3",
     "reboot"),
    ("#cloud-config\nwrite_files:\n  - path: /etc/x\n    encoding: base65\n    content: x\n",
     "write_files[0].encoding", "line 4, column 5", "b64"),
])
def test_bad_enum_value(text: str, path: str, where: str, choices: str) -> None:
    msg = _error(text)
    assert path in msg and where in msg and choices in msg, msg


def test_misspelt_key_gets_a_suggestion() -> None:
    msg = _error("#cloud-config\nhostname: a\nssh_authorized_key:\n  - ssh-ed25519 AAAA x\n")
    assert "line 3, column 1" in msg and "did you mean 'ssh_authorized_keys'?" in msg, msg


def test_misspelt_nested_key_gets_a_suggestion() -> None:
    msg = _error("#cloud-config\nusers:\n  - name: alice\n    shel: /bin/bash\n")
    assert "users[0].shel" in msg and "line 4, column 5" in msg, msg
    assert "did you mean 'shell'?" in msg, msg


def test_every_problem_is_reported() -> None:
    msg = _error("#cloud-config\nruncmd: 1\npackages: 2\nbogus_key: 3\n")
    for where in ("line 2, column 1", "line 3, column 1", "line 4, column 1"):
        assert where in msg, msg


def test_binary_content_counts_as_a_string() -> None:
    assert validate_user_data(b"#cloud-config\nwrite_files:\n  - path: /x\n"
                              b"    content: !!binary aGVsbG8=\n") == "cloud-config"


def test_schema_check_can_be_skipped() -> None:
    assert validate_user_data(b"#cloud-config\nruncmd: 1\n", UD, schema=False) == "cloud-config"
    assert validate_network_config("version: 2\nethernets: {e: {dhcp4: maybe}}\n",
                                   schema=False) == 2
    with pytest.raises(SeedError, match="runcmd"):  # the seed builder checks by default
        build_seed("a", CloudInit(user_data="#cloud-config\nruncmd: 1\n"))


def test_mime_parts_are_checked_each() -> None:
    outer = MIMEMultipart()
    outer.attach(MIMEText("#cloud-config\nhostname: a\n", "cloud-config"))
    outer.attach(MIMEText("#!/bin/sh\necho hi\n", "x-shellscript"))
    outer.attach(MIMEText("#cloud-config\nruncmd: 'echo hi'\n", "cloud-config"))
    with pytest.raises(SeedError) as exc:
        validate_user_data(outer.as_bytes(), UD)
    msg = str(exc.value)
    assert "MIME part 3" in msg and "runcmd" in msg and "line 2, column 1" in msg, msg


def test_the_agent_injection_part_passes() -> None:
    user = "#cloud-config\nhostname: keep-me\nwrite_files:\n  - path: /etc/mine\n    content: x\n"
    for ci in (CloudInit(user_data=user), None):
        seed = inject_agent(build_seed("a", ci, default_if_empty=True, ssh_key="ssh-ed25519 A"),
                            b"print('agent')\n")
        assert validate_user_data(seed.user_data, UD) == "mime"


def test_validate_files(tmp_path: Path) -> None:
    good = tmp_path / "user-data"
    good.write_text("#cloud-config\nhostname: a\n")
    net = tmp_path / "network-config"
    net.write_text("version: 2\nethernets: {eth0: {dhcp4: true}}\n")
    bad = tmp_path / "ud.yaml"
    bad.write_text("#cloud-config\nssh_authorized_key: [x]\nruncmd: 1\n")
    badnet = tmp_path / "net.yaml"
    badnet.write_text("network:\n  version: 2\n  ethernets: {eth0: {adresses: []}}\n")
    missing = tmp_path / "nope"
    assert validate_files([good, net]) == []
    errors = validate_files([good, bad, badnet, missing])
    text = "\n".join(str(e) for e in errors)
    assert [e.field for e in errors] == [str(bad), str(bad), str(badnet), str(missing)], text
    assert "line 2, column 1" in str(errors[0]) and "ssh_authorized_keys" in str(errors[0])
    assert "line 3, column 1" in str(errors[1]) and "runcmd" in str(errors[1])
    assert "ethernets.eth0.adresses" in str(errors[2]) and "line 3" in str(errors[2])
    assert "cannot read" in str(errors[3])


@pytest.mark.subprocess
def test_jsonschema_is_imported_lazily() -> None:
    code = ("import sys, vmforge.seed.validate as v; v.validate_user_data(b'#!/bin/sh\\n'); "
            "print('jsonschema' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "False"


def test_without_the_schema_the_basic_shape_is_still_checked() -> None:
    with pytest.raises(SeedError, match="unknown v2 keys: ethernet"):
        validate_network_config("version: 2\nethernet: {}\n", schema=False)
    with pytest.raises(SeedError, match="config"):
        validate_network_config("version: 1\nconfig: {}\n", schema=False)
    with pytest.raises(SeedError, match="invalid YAML at line 3"):
        validate_user_data(b"#cloud-config\nruncmd: [\n", UD, schema=False)


def test_text_plain_mime_parts_are_sniffed_like_cloud_init() -> None:
    outer = MIMEMultipart()
    outer.attach(MIMEText("#cloud-config\r\nruncmd: 1\r\n", "plain"))
    with pytest.raises(SeedError, match="MIME part 1"):
        validate_user_data(outer.as_bytes(), UD)


def test_keys_that_are_not_strings() -> None:
    # cloud-init's own snap examples use integer keys; an int key under patternProperties
    # must not crash the check, and a boolean key (YAML's `on:`) gets a hint
    assert validate_user_data(b"#cloud-config\ngroups: {1: [alice]}\n", UD) == "cloud-config"
    with pytest.raises(SeedError, match="quote the key") as exc:
        validate_network_config("version: 2\nethernets:\n  eth0:\n    on: 1\n")
    assert "line 4, column 5" in str(exc.value)
