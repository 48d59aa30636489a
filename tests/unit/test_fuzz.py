"""Fuzzing the spec loader and the seed validators (issue 14 §5).

Random and adversarial documents, as text and as structures: whatever comes in, only
vmforge's own errors (VmforgeError subclasses) may come out, quickly. The budget is a few
seconds for the whole file.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vmforge.errors import VmforgeError
from vmforge.seed.validate import (
    parse_meta_data,
    schema_problems,
    validate_network_config,
    validate_user_data,
)
from vmforge.spec import load_document, parse_request

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Pieces of YAML that parsers and validators find awkward: anchors and aliases, merge keys,
# tags (including Python ones the safe loader must refuse), flow and block collections,
# complex keys, directives, document markers, tabs, odd scalars.
TOKENS = ["&a ", "*a", "&b ", "*b", "<<: ", "<<: *a", "[", "]", "{", "}", ", ", ": ", "- ",
          "? ", "\n", "\n  ", "\n    ", "\t", "!!binary ", "!!python/object:os.system ",
          "!!set ", "!!omap ", "!!timestamp ", "!!float ", "%YAML 1.1\n", "---\n", "...\n",
          "#cloud-config\n", "#cloud-config-archive\n", "name", "spec", "cpu_cores",
          "memory_mib", "disks", "id",
          "size_gib", "cloud_init", "user_data", "version", "ethernets", "config", "type",
          "network", "runcmd", "write_files", "path", "users", "1", "-1", "1e309", "0x1F",
          "0o17", "yes", "~", "null", "2024-01-01", "'q'", '"\\u0000"', '"\\ud800"', "é",
          "\u202e", "|\n  text", ">-\n  folded", "'", '"', "@", "`", "%", "=", ":", "aGk="]

yaml_like = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)
any_text = st.one_of(st.text(max_size=300), yaml_like)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=20), st.binary(max_size=10))
KEYS = ["name", "spec", "cpu_cores", "memory_mib", "disks", "id", "size_gib", "bootable",
        "backing_file", "image", "format", "cdroms", "iso_path", "nics", "mac", "forwards",
        "host_port", "guest_port", "kernel", "cloud_init", "user_data", "agent",
        "health_checks", "http_get", "command", "provision", "copy", "run", "shell",
        "firmware", "boot_order", "machine", "version", "ethernets", "bonds", "config",
        "type", "subnets", "network", "match", "dhcp4", "addresses", "runcmd", "write_files",
        "path", "content", "users", "groups", "packages", "apt", "power_state", "mode"]
structures = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers()),
                        children, max_size=5)),
    max_leaves=30)


def only_our_errors(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except VmforgeError as exc:
        str(exc)  # the message itself must render
        assert len(str(exc)) < 20_000


def _dump(value: Any) -> str:
    try:
        return yaml.safe_dump(value, allow_unicode=True)
    except yaml.YAMLError:
        return json.dumps(value, default=repr)


# ---------------------------------------------------------------------------- spec loader

@FUZZ
@given(any_text)
# found by this test at a larger budget: PyYAML's scalar constructors raised ValueError,
# AttributeError and KeyError for these
@example("!!timestamp")
@example("!!float ;")
@example("!!float")
@example("a: 2024-13-45")
@example("!!bool x")
def test_spec_loader_text(text: str) -> None:
    def go() -> None:
        data = load_document(text, "fuzz.yaml")
        parse_request(data, "fuzz.yaml")
    only_our_errors(go)


@FUZZ
@given(structures)
def test_spec_parser_structures(data: Any) -> None:
    only_our_errors(lambda: parse_request(data))
    only_our_errors(lambda: parse_request({"name": "a", "spec": data}))


@FUZZ
@given(structures)
def test_spec_loader_round_trip(data: Any) -> None:
    """A structure written out as YAML and read back: the loader's own errors only."""
    only_our_errors(lambda: parse_request(load_document(_dump(data), "x.yaml")))
    only_our_errors(lambda: parse_request(load_document(
        _dump({"name": "vm", "spec": data}), "x.yaml")))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.booleans())
def test_spec_loader_alias_shapes(levels: int, width: int, merge: bool) -> None:
    """Alias chains of every shape: accepted while small, refused (quickly) when large."""
    lines = ["a0: &a0 {x: 1}" if merge else 'a0: &a0 "x"']
    for i in range(1, levels + 1):
        if merge:
            lines.append(f"a{i}: &a{i}\n  <<: [" + ", ".join([f"*a{i - 1}"] * width) + "]")
        else:
            lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    only_our_errors(lambda: parse_request(load_document("\n".join(lines) + "\nname: a\n",
                                                        "x.yaml")))


# ---------------------------------------------------------------------------- seed validators

user_data_text = st.one_of(
    any_text.map(lambda t: "#cloud-config\n" + t),
    structures.map(lambda d: "#cloud-config\n" + _dump(d)),
    st.fixed_dictionaries({}, optional={k: structures for k in (
        "runcmd", "write_files", "users", "packages", "apt", "power_state", "bootcmd",
        "ssh_authorized_keys", "merge_how", "hostname", "ntp", "mounts")}).map(
        lambda d: "#cloud-config\n" + _dump(d)),
    any_text,
    structures.map(lambda d: "#cloud-config-archive\n" + _dump(d)),
)


@FUZZ
@given(user_data_text)
@example("#cloud-config\n!!timestamp")
@example("#cloud-config\nhostname: !!float x")
def test_user_data_validator(text: str) -> None:
    data = text.encode("utf-8", errors="surrogatepass")
    only_our_errors(lambda: validate_user_data(data, "ud"))
    only_our_errors(lambda: validate_user_data(gzip.compress(data, mtime=0), "ud"))
    mime = ("Content-Type: multipart/mixed; boundary=\"XX\"\nMIME-Version: 1.0\n\n--XX\n"
            "Content-Type: text/cloud-config\n\n" + text + "\n--XX--\n")
    only_our_errors(lambda: validate_user_data(mime.encode(errors="surrogatepass"), "ud"))


@FUZZ
@given(st.binary(max_size=300))
def test_user_data_validator_bytes(data: bytes) -> None:
    only_our_errors(lambda: validate_user_data(data, "ud"))
    only_our_errors(lambda: validate_user_data(b"\x1f\x8b" + data, "ud"))
    only_our_errors(lambda: validate_user_data(b"#cloud-config\n" + data, "ud"))


network_text = st.one_of(
    any_text,
    structures.map(_dump),
    st.builds(lambda v, body: _dump({"version": v, **body}), st.sampled_from([1, 2, "2", None]),
              st.dictionaries(st.sampled_from(["config", "ethernets", "bonds", "bridges",
                                               "vlans", "renderer", "wifis"]),
                              structures, max_size=3)),
    st.builds(lambda body: _dump({"network": {"version": 2, "ethernets": {"eth0": body}}}),
              st.dictionaries(st.sampled_from(["dhcp4", "addresses", "match", "routes",
                                               "nameservers", "mtu", "set-name", "adresses"]),
                              structures, max_size=4)),
)


@FUZZ
@given(network_text)
@example("!!timestamp")
@example("version: !!int x")
def test_network_config_validator(text: str) -> None:
    only_our_errors(lambda: validate_network_config(text, "nc"))
    only_our_errors(lambda: parse_meta_data(text, "md"))


@FUZZ
@given(structures, st.sampled_from(["cloud-config", "network-config-v1", "network-config-v2"]))
# found by review: jsonschema's patternProperties raised TypeError on an integer key
@example({"groups": {1: ["a"]}, "apt": {"sources": {2: {}}}}, "cloud-config")
@example({True: 1, None: 2, 1.5: 3}, "network-config-v2")
def test_schema_problems_on_structures(data: Any, kind: str) -> None:
    """Structures that never were YAML (no marks): problems come back, nothing is raised."""
    for problem in schema_problems(data, kind):
        assert str(problem)
