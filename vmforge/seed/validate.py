"""Validation of cloud-init NoCloud inputs before anything is written."""

from __future__ import annotations

import email
import email.policy
import gzip
from typing import Any

import yaml

from ..errors import SeedError

__all__ = ["validate_user_data", "validate_network_config", "parse_meta_data", "yaml_mapping"]

_OTHER_HEADERS = ("#include", "#cloud-boothook", "#part-handler", "#cloud-config-archive",
                  "#cloud-config-jsonp", "## template: jinja")
# libyaml's C parser when present: 8x faster, same errors with the same marks.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NETPLAN_V2_KEYS = {"version", "renderer", "ethernets", "bonds", "bridges", "vlans", "wifis"}


def yaml_mapping(text: str, field: str, *, allow_empty: bool = False) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SeedError(f"invalid YAML at {where}: {exc.problem}", field=field,
                        hint="fix the YAML syntax at that position") from None
    except yaml.YAMLError as exc:
        raise SeedError(f"invalid YAML: {exc}", field=field) from None
    if data is None and allow_empty:
        return {}
    if not isinstance(data, dict):
        raise SeedError(f"must be a YAML mapping, got {type(data).__name__}", field=field,
                        hint="write key: value pairs at the top level")
    return data


def validate_user_data(data: bytes, field: str = "user_data", _depth: int = 0) -> str:
    """Check user-data and return its kind: cloud-config, script, mime, gzip, other, empty."""
    if data[:2] == b"\x1f\x8b":
        if _depth:
            raise SeedError("nested gzip is not supported by cloud-init", field=field)
        try:
            inner = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise SeedError(f"corrupt gzip data: {exc}", field=field) from None
        validate_user_data(inner, field, _depth + 1)
        return "gzip"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SeedError("is neither UTF-8 text nor gzip", field=field) from None
    stripped = text.lstrip()
    if not stripped:
        return "empty"
    first = stripped.splitlines()[0].strip()
    if first.startswith("#cloud-config") and not first.startswith("#cloud-config-"):
        yaml_mapping(text, field, allow_empty=True)
        return "cloud-config"
    if first.startswith("#!"):
        return "script"
    if first.lower().startswith(("content-type:", "mime-version:")):
        msg = email.message_from_string(text, policy=email.policy.compat32)
        if not msg.is_multipart():
            raise SeedError("MIME user-data must be multipart/mixed", field=field)
        for i, part in enumerate(msg.walk()):
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            if part.get_content_type() == "text/cloud-config" and isinstance(payload, bytes):
                yaml_mapping(payload.decode(errors="replace"), f"{field} (MIME part {i})",
                             allow_empty=True)
        return "mime"
    if first.startswith(_OTHER_HEADERS):
        return "other"
    raise SeedError(
        f"unrecognised user-data (first line {first[:40]!r})", field=field,
        hint="start with '#cloud-config' (YAML), '#!' (a script), a MIME multipart message, "
             "or give gzip of one of those")


def validate_network_config(text: str, field: str = "network_config") -> int:
    """Check network-config v1 or v2 and return its version."""
    data = yaml_mapping(text, field)
    if "network" in data and isinstance(data["network"], dict):
        data = data["network"]
    version = data.get("version")
    if version == 1:
        cfg = data.get("config")
        if not isinstance(cfg, list):
            raise SeedError("version 1 needs a 'config' list", field=field)
        for i, item in enumerate(cfg):
            if not isinstance(item, dict) or "type" not in item:
                raise SeedError(f"config[{i}] needs a 'type'", field=field)
        return 1
    if version == 2:
        unknown = set(data) - NETPLAN_V2_KEYS
        if unknown:
            raise SeedError(f"unknown v2 keys: {', '.join(sorted(unknown))}", field=field,
                            hint=f"allowed: {', '.join(sorted(NETPLAN_V2_KEYS))}")
        for key in NETPLAN_V2_KEYS - {"version", "renderer"}:
            if key in data and not isinstance(data[key], dict):
                raise SeedError(f"'{key}' must be a mapping of interface names", field=field)
        return 2
    raise SeedError(f"version must be 1 or 2, got {version!r}", field=field,
                    hint="add 'version: 2' (netplan style) at the top level")


def parse_meta_data(text: str, field: str = "meta_data") -> dict[str, Any]:
    return yaml_mapping(text, field, allow_empty=True)
