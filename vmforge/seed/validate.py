"""Validation of cloud-init NoCloud inputs before anything is written.

Three layers, each failing with a :class:`SeedError` that names the field:

1. **Size.** NoCloud seeds are meant to be small (cloud providers cap user-data at 16 KiB to
   256 KiB); every seed file is limited to ``MAX_SEED_FILE_BYTES`` (1 MiB), and gzip
   user-data to ``MAX_DECOMPRESSED_BYTES`` (8 MiB) once inflated, which is checked while
   inflating so a gzip bomb costs nothing.
2. **YAML**, read by :mod:`vmforge.yamlload` (alias bombs and absurd nesting refused), with
   line and column. Repeated keys are read as cloud-init reads them (the last wins): its
   own documentation has examples that repeat ``apt:`` and ``disk_setup:``.
3. **cloud-init's own JSON schemas** (copies in ``schemas/``, Apache-2.0, see its NOTICE):
   each cloud-config (also each cloud-config part of MIME multipart user-data) against
   ``schema-cloud-config-v1.json``, network-config against the v1 or v2 schema. The check is
   cloud-init's own (``cloud-init schema``): Draft 4 semantics, and bytes (``!!binary``)
   count as strings; format checks are not applied. Each problem carries the line and column
   of the offending key and, for unknown keys, "did you mean ...?". For netplan v2 the
   interface definitions are also closed to unknown keys: cloud-init's schema cannot say so
   (their properties come through ``allOf``) and a typo such as ``adresses`` would pass;
   netplan's own keys that the schema does not list (``link-local``, ``macaddress``, ...)
   remain accepted. Two relaxations follow cloud-init's code and documentation where its
   schema is stricter: an integer ``fs_setup`` ``partition``, and the system-config keys
   ``datasource`` and ``datasource_list``. ``schema=False`` skips this layer
   (``--no-schema-check``).

``jsonschema`` is imported on first use only: the CLI's start-up must not pay for it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import zlib
from collections.abc import Iterable, Sequence

from ..errors import SeedError
from . import miniyaml, schemagate

TYPE_CHECKING = False  # not typing's: `vmforge seed build` and `exec` must not import it
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

__all__ = ["validate_user_data", "validate_network_config", "parse_meta_data", "yaml_mapping",
           "validate_files", "schema_problems", "Problem", "SeedSchemaError",
           "MAX_SEED_FILE_BYTES", "MAX_DECOMPRESSED_BYTES"]

MiB = 1 << 20
#: Largest accepted seed file (user-data, vendor-data, network-config, meta-data), as given.
MAX_SEED_FILE_BYTES = 1 * MiB
#: Largest accepted content of gzip-compressed user-data or vendor-data, once inflated.
MAX_DECOMPRESSED_BYTES = 8 * MiB
_SIZE_HINT = (f"NoCloud seed files are limited to {MAX_SEED_FILE_BYTES // MiB} MiB each "
              f"({MAX_DECOMPRESSED_BYTES // MiB} MiB once gzip is inflated); fetch large "
              "content at boot instead (write_files 'source: {uri: ...}', runcmd curl, "
              "packages)")
_SCHEMA_HINT = ("checked against cloud-init's own schema "
                "(https://docs.cloud-init.io/en/latest/reference/modules.html); "
                "--no-schema-check skips this check")
_MAX_REPORTED = 20

_OTHER_HEADERS = ("#include", "#cloud-boothook", "#part-handler", "#cloud-config-jsonp",
                  "## template: jinja")
_SCHEMA_DIR = os.path.join(os.path.dirname(__file__), "schemas")  # (pathlib: 3 ms)
_SCHEMA_FILES = {"cloud-config": "schema-cloud-config-v1.json",
                 "network-config-v1": "schema-network-config-v1.json",
                 "network-config-v2": "schema-network-config-v2.json"}


def _check_size(size: int, field: str, what: str = "") -> None:
    if size > MAX_SEED_FILE_BYTES:
        raise SeedError(f"{what or 'content'} is {size / MiB:.1f} MiB, over the "
                        f"{MAX_SEED_FILE_BYTES // MiB} MiB limit", field=field, hint=_SIZE_HINT)


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def yaml_mapping(text: str | bytes, field: str, *, allow_empty: bool = False) -> dict[str, Any]:
    try:  # the everyday subset without PyYAML (its import alone costs more than a seed build)
        data = miniyaml.load(text if isinstance(text, str) else text.decode())
    except (miniyaml.Unsupported, UnicodeDecodeError):
        data = _load_yaml(text, field)
    if data is None and allow_empty:
        return {}
    if not isinstance(data, dict):
        raise SeedError(f"must be a YAML mapping, got {type(data).__name__}", field=field,
                        hint="write key: value pairs at the top level")
    return data


def _load_yaml(text: str | bytes, field: str) -> Any:
    import yaml

    from .. import yamlload
    try:
        return yamlload.load(text, allow_duplicates=True)
    except yaml.MarkedYAMLError as exc:
        where = yamlload.describe_mark(exc.problem_mark)
        raise SeedError(f"invalid YAML at {where}: {exc.problem}", field=field,
                        hint="fix the YAML at that position") from None
    except yaml.YAMLError as exc:
        raise SeedError(f"invalid YAML: {exc}", field=field) from None


def _gunzip(data: bytes, field: str) -> bytes:
    """Inflate gzip (all members), stopping as soon as the output passes the limit."""
    out = bytearray()
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out += d.decompress(rest, MAX_DECOMPRESSED_BYTES + 1 - len(out))
            if len(out) > MAX_DECOMPRESSED_BYTES or d.unconsumed_tail:
                raise SeedError(f"gzip data would decompress to more than "
                                f"{MAX_DECOMPRESSED_BYTES // MiB} MiB", field=field,
                                hint=_SIZE_HINT)
            if not d.eof:
                raise SeedError("corrupt gzip data: truncated", field=field)
            rest = d.unused_data
    except zlib.error as exc:
        raise SeedError(f"corrupt gzip data: {exc}", field=field) from None
    return bytes(out)


def validate_user_data(data: bytes, field: str = "user_data", *, schema: bool = True) -> str:
    """Check user-data and return its kind: cloud-config, script, mime, gzip, other, empty.

    ``schema=False`` skips cloud-init's schema (YAML syntax and the limits still apply).
    """
    _check_size(len(data), field)
    return _validate_user_data(data, field, schema, False)


def _validate_user_data(data: bytes, field: str, schema: bool, inflated: bool) -> str:
    if data[:2] == b"\x1f\x8b":
        if inflated:
            raise SeedError("nested gzip is not supported by cloud-init", field=field)
        _validate_user_data(_gunzip(data, field), field, schema, True)
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
        _check_cloud_config(text, field, schema)
        return "cloud-config"
    if first.startswith("#!"):
        return "script"
    if first.startswith("#cloud-config-archive"):
        _check_archive(text, field, schema)
        return "archive"
    if first.lower().startswith(("content-type:", "mime-version:")):
        import email
        import email.policy
        msg = email.message_from_string(text, policy=email.policy.compat32)
        if not msg.is_multipart():
            raise SeedError("MIME user-data must be multipart/mixed", field=field)
        for i, part in enumerate(msg.walk()):
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            ctype = part.get_content_type()
            head = payload.lstrip().split(b"\n", 1)[0].strip()
            if ctype == "text/plain" and head.startswith(b"#cloud-config") \
                    and not head.startswith(b"#cloud-config-"):
                ctype = "text/cloud-config"  # cloud-init sniffs text/plain parts the same way
            if ctype == "text/cloud-config":
                _check_cloud_config(payload.decode(errors="replace"),
                                    f"{field} (MIME part {i})", schema)
        return "mime"
    if first.startswith(_OTHER_HEADERS):
        return "other"
    raise SeedError(
        f"unrecognised user-data (first line {first[:40]!r})", field=field,
        hint="start with '#cloud-config' (YAML), '#!' (a script), a MIME multipart message, "
             "or give gzip of one of those")


def _check_archive(text: str, field: str, schema: bool) -> None:
    """#cloud-config-archive: a YAML list of parts (strings, or mappings with content)."""
    import yaml

    from .. import yamlload
    try:
        parts = yamlload.load(text, allow_duplicates=True)
    except yaml.YAMLError as exc:
        where = yamlload.describe_mark(getattr(exc, "problem_mark", None))
        raise SeedError(f"invalid YAML at {where}: {getattr(exc, 'problem', exc)}",
                        field=field, hint="fix the YAML at that position") from None
    if not isinstance(parts, list):
        raise SeedError("#cloud-config-archive must be a YAML list of parts", field=field)
    for i, part in enumerate(parts):
        if isinstance(part, dict):
            content = part.get("content")
            if not isinstance(content, str):
                raise SeedError(f"archive part {i} needs a 'content' string", field=field)
            head = content.lstrip().split("\n", 1)[0].strip()
            if part.get("type") == "text/cloud-config" or (
                    head.startswith("#cloud-config") and not head.startswith("#cloud-config-")):
                _check_cloud_config(content, f"{field} (archive part {i})", schema)
        elif not isinstance(part, str):
            raise SeedError(f"archive part {i} must be a string or a mapping with content",
                            field=field)


def _check_cloud_config(text: str, field: str, schema: bool) -> None:
    data = yaml_mapping(text, field, allow_empty=True)
    if schema:
        _raise_problems(schema_problems(data, "cloud-config", text), field)


def validate_network_config(text: str, field: str = "network_config", *,
                            schema: bool = True) -> int:
    """Check network-config v1 or v2 and return its version."""
    _check_size(len(text.encode()), field)
    doc = yaml_mapping(text, field)
    data = doc["network"] if isinstance(doc.get("network"), dict) else doc
    version = data.get("version")
    if version not in (1, 2) or isinstance(version, bool):
        raise SeedError(f"version must be 1 or 2, got {_short(version)}", field=field,
                        hint="add 'version: 2' (netplan style) at the top level")
    if schema:
        _raise_problems(schema_problems(doc, f"network-config-v{version}", text), field)
    elif version == 1:  # without the schema, the shape at least
        cfg = data.get("config")
        if not isinstance(cfg, list):
            raise SeedError("version 1 needs a 'config' list", field=field)
        for i, item in enumerate(cfg):
            if not isinstance(item, dict) or "type" not in item:
                raise SeedError(f"config[{i}] needs a 'type'", field=field)
    else:
        allowed = {"version", "renderer", "ethernets", "bonds", "bridges", "vlans",
                   *NETPLAN_TOP_KEYS}
        unknown = [str(k) for k in data if k not in allowed]
        if unknown:
            raise SeedError(f"unknown v2 keys: {', '.join(sorted(unknown))}", field=field,
                            hint=f"allowed: {', '.join(sorted(allowed))}")
        for key in allowed - {"version", "renderer"}:
            if key in data and not isinstance(data[key], dict):
                raise SeedError(f"'{key}' must be a mapping of interface names", field=field)
    return int(version)


def parse_meta_data(text: str, field: str = "meta_data") -> dict[str, Any]:
    _check_size(len(text.encode()), field)
    return yaml_mapping(text, field, allow_empty=True)


def validate_files(paths: Sequence[Path], *, schema: bool = True) -> list[SeedError]:
    """Check seed files as ``vmforge seed validate FILE...`` does; one error per problem.

    The kind of each file comes from its name (``user-data``, ``vendor-data``,
    ``network-config``, ``meta-data``, or a name containing ``network`` or ``meta``), else
    from its content: user-data headers first, then a mapping with ``network:`` or a
    ``version`` of 1 or 2 is network-config, anything else is checked as user-data. Each
    error's ``field`` is the file's path; its message starts with the line and column.
    """
    errors: list[SeedError] = []
    for path in paths:
        field = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            errors.append(SeedError(f"cannot read {path}: {exc.strerror}", field=field))
            continue
        try:
            kind = _file_kind(path, data)
            if kind == "meta-data":
                parse_meta_data(data.decode("utf-8", errors="replace"), field)
            elif kind == "network-config":
                validate_network_config(data.decode("utf-8", errors="replace"), field,
                                        schema=schema)
            else:
                validate_user_data(data, field, schema=schema)
        except SeedSchemaError as exc:
            errors += exc.each()
        except SeedError as exc:
            errors.append(exc)
    return errors


class SeedSchemaError(SeedError):
    """A document breaks cloud-init's schema: ``problems`` lists each (line, column, path),
    the message shows them all (up to 20)."""

    def __init__(self, field: str, problems: list[Problem]) -> None:
        shown = [str(p) for p in problems[:_MAX_REPORTED]]
        if len(problems) > _MAX_REPORTED:
            shown.append(f"... and {len(problems) - _MAX_REPORTED} more")
        text = shown[0] if len(problems) == 1 else (
            f"{len(problems)} problems against cloud-init's schema:\n    " + "\n    ".join(shown))
        super().__init__(text, field=field, hint=_SCHEMA_HINT)
        self.problems = problems

    def each(self) -> list[SeedError]:
        """One error per problem (for editors and CI: one line each)."""
        return [SeedError(str(p), field=self.field, hint=_SCHEMA_HINT) for p in self.problems]


def _raise_problems(problems: list[Problem], field: str) -> None:
    if problems:
        raise SeedSchemaError(field, problems)


def _file_kind(path: Path, data: bytes) -> str:
    name = path.name.lower()
    if name.startswith(("user-data", "vendor-data")):
        return "user-data"
    if "network" in name:
        return "network-config"
    if name.startswith("meta-data") or "meta" in name:
        return "meta-data"
    import yaml

    from .. import yamlload
    head = data.lstrip()[:64].lower()
    if head.startswith((b"#", b"\x1f\x8b", b"content-type:", b"mime-version:")):
        return "user-data"
    try:
        doc = yamlload.load(data[:MAX_SEED_FILE_BYTES + 1], allow_duplicates=True)
    except yaml.YAMLError:
        return "user-data"
    if isinstance(doc, dict) and ("network" in doc or doc.get("version") in (1, 2)):
        return "network-config"
    return "user-data"


# ---------------------------------------------------------------------------- schemas

class Problem:
    """One schema violation: where (JSON path, 1-based line/column) and what. (A plain
    class: dataclasses costs `vmforge seed build` 6 ms of imports.)"""

    __slots__ = ("path", "message", "line", "column", "at_value")

    def __init__(self, path: tuple[str | int, ...], message: str, line: int | None = None,
                 column: int | None = None, at_value: bool = False) -> None:
        self.path = path
        self.message = message
        self.line = line
        self.column = column
        #: placed at the value (the mapping that lacks a key) rather than at the key
        self.at_value = at_value

    def _key(self) -> tuple[object, ...]:
        return (self.path, self.message, self.line, self.column)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Problem(path={self.path!r}, message={self.message!r}, line={self.line!r}, "
                f"column={self.column!r})")

    @property
    def where(self) -> str:
        return _dotted(self.path)

    def __str__(self) -> str:
        pos = f"line {self.line}, column {self.column}: " if self.line is not None else ""
        return f"{pos}{self.where}: {self.message}"


# netplan keys that cloud-init's v2 schema does not list (netplan renders them): accepted.
NETPLAN_DEVICE_KEYS = frozenset({
    "accept-ra", "access-points", "activation-mode", "auth", "critical",
    "delay-virtual-functions-rebind", "dhcp-identifier", "embedded-switch-mode", "emit-lldp",
    "generic-receive-offload", "generic-segmentation-offload", "ignore-carrier",
    "infiniband-mode", "ipv6-address-generation", "ipv6-address-token", "ipv6-mtu",
    "ipv6-privacy", "large-receive-offload", "link", "link-local", "macaddress",
    "neigh-suppress", "networkmanager", "openvswitch", "optional-addresses",
    "receive-checksum-offload", "regulatory-domain", "routing-policy",
    "tcp-segmentation-offload", "tcp6-segmentation-offload", "transmit-checksum-offload",
    "virtual-function-count", "wakeonwlan", "hw-offload", "keep-configuration",
})
NETPLAN_TOP_KEYS = ("wifis", "modems", "tunnels", "vrfs", "nm-devices", "dummy-devices",
                    "virtual-ethernets")


def _close_v2_devices(schema: dict[str, Any]) -> None:
    defs = schema["$defs"]
    common = defs["mapping"]["properties"]
    for name in ("mapping_physical", "mapping_bond", "mapping_bridge", "mapping_vlan"):
        props = defs[name].setdefault("properties", {})
        for key in [*common, *sorted(NETPLAN_DEVICE_KEYS)]:
            props.setdefault(key, {})
        defs[name]["additionalProperties"] = False
    top = defs["network_config_version2"]["properties"]
    for key in NETPLAN_TOP_KEYS:
        top.setdefault(key, {"type": "object"})


# Keys of cloud-init's system configuration that its documentation shows in #cloud-config
# examples (doc/rtd/reference/yaml_examples/datasources.rst) but the schema does not list.
SYSTEM_CONFIG_KEYS = ("datasource", "datasource_list")


def _relax_cloud_config(schema: dict[str, Any]) -> None:
    """Where the schema refuses what cloud-init's code and documentation accept."""
    for key in SYSTEM_CONFIG_KEYS:
        schema["properties"].setdefault(key, {"type": "object" if key == "datasource"
                                              else "array"})
    # fs_setup partition: "set partition to the desired partition number" (the schema's
    # description; cc_disk_setup reads str(partition)), but its oneOf lists strings only.
    partition = (schema["$defs"]["cc_disk_setup"]["properties"]["fs_setup"]["items"]
                 ["properties"]["partition"])
    partition["oneOf"] = [*partition["oneOf"], {"type": "integer", "minimum": 0}]


@functools.cache
def _schema(kind: str) -> dict[str, Any]:
    """cloud-init's schema for ``kind``, with vmforge's adjustments (never mutated after)."""
    schema: dict[str, Any] = _read_json(os.path.join(_SCHEMA_DIR, _SCHEMA_FILES[kind]))
    if kind == "cloud-config":
        _relax_cloud_config(schema)
    if kind.startswith("network-config"):
        if kind.endswith("v2"):
            _close_v2_devices(schema)
        # Validate the inner definition: the ``network:`` wrapper is unwrapped by the caller,
        # so errors are not buried in the schema's oneOf(bare, wrapped).
        version = kind[-1]
        schema.pop("oneOf", None)
        schema["$ref"] = f"#/$defs/network_config_version{version}"
    return schema


@functools.cache
def _validator(kind: str) -> Any:
    from jsonschema import Draft4Validator, validators  # type: ignore[import-untyped]

    schema = _schema(kind)
    # As cloud-init does: Draft 4 for every schema, and bytes (YAML !!binary) are strings.
    checker = Draft4Validator.TYPE_CHECKER.redefine(
        "string", lambda _checker, value: isinstance(value, str | bytes))
    cls = validators.extend(Draft4Validator, type_checker=checker)
    return cls(schema)


def schema_problems(data: Any, kind: str, text: str | None = None) -> list[Problem]:
    """Problems of ``data`` against cloud-init's schema for ``kind`` (``cloud-config``,
    ``network-config-v1``, ``network-config-v2``); ``text`` (the YAML it came from) gives
    each problem its line and column."""
    prefix: tuple[str | int, ...] = ()
    if kind.startswith("network-config") and isinstance(data, dict) \
            and isinstance(data.get("network"), dict):
        extra = [k for k in data if k != "network"]
        problems = [Problem((k,), "unknown key next to 'network'") for k in extra]
        data, prefix = data["network"], ("network",)
    else:
        problems = []
    data, booleans = _string_keys(data, prefix)
    try:  # the quick answer for a valid document; jsonschema explains an invalid one
        valid = schemagate.is_valid(data, _schema(kind))
    except (schemagate.Unsure, RecursionError):
        valid = False
    try:
        if not valid:
            for error in _validator(kind).iter_errors(data):
                problems += [Problem(p.path, p.message + _BOOLEAN_KEY, at_value=p.at_value)
                             if p.path in booleans else p for p in _explain(error, prefix)]
    except RecursionError:  # yamlload bounds nesting, but data may come from elsewhere
        problems.append(Problem(prefix, "nested too deeply to check"))
    except TypeError:  # jsonschema applies a pattern to bytes (YAML !!binary) and fails
        problems.append(Problem(prefix, "a binary (!!binary) value stands where cloud-init's "
                                        "schema expects text of a given form"))
    if not problems:
        return []
    import yaml

    from .. import yamlload
    root = None
    if text is not None:
        try:
            root = yamlload.compose(text)
        except yaml.YAMLError:
            root = None
    placed = []
    for p in _unique(problems):
        mark = yamlload.find_mark(root, p.path, key=not p.at_value)
        if mark is not None:
            p = Problem(p.path, p.message, mark.line + 1, mark.column + 1, p.at_value)
        placed.append(p)
    placed.sort(key=lambda p: (p.line or 0, p.column or 0))
    return placed


_BOOLEAN_KEY = " (YAML reads an unquoted yes/no/on/off as a boolean: quote the key)"


def _string_keys(data: Any, prefix: tuple[str | int, ...]
                 ) -> tuple[Any, set[tuple[str | int, ...]]]:
    """The data with every mapping key a string, as the schema (JSON) expects.

    YAML also has ``0:`` (cloud-init's own snap examples use it) or ``on:``; jsonschema would
    crash on them under patternProperties, and paths would print them like list indices.
    Returns the paths of keys that were booleans, for a hint. Copies only when needed.
    """
    booleans: set[tuple[str | int, ...]] = set()
    found = False
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, prefix)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    found = True
                    if isinstance(k, bool):
                        booleans.add(path + (str(k),))
                stack.append((v, path + (str(k),)))
        elif isinstance(value, list):
            stack.extend((v, path + (i,)) for i, v in enumerate(value))
    if not found:
        return data, booleans

    def copy(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value
    return copy(data), booleans


def _unique(problems: Iterable[Problem]) -> list[Problem]:
    seen: set[tuple[tuple[str | int, ...], str]] = set()
    out = []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string",
               "integer": "an integer", "number": "a number", "boolean": "true or false",
               "null": "empty (null)"}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str | bytes):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if value is None:
        return "null"
    return type(value).__name__


def _words(types: Any) -> str:
    names = [types] if isinstance(types, str) else list(types)
    words = [_TYPE_WORDS.get(t, t) for t in dict.fromkeys(names)]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " ...>"


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _suggest(word: str, choices: Iterable[Any]) -> str:
    names = [c for c in choices if isinstance(c, str)]
    import difflib
    match = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _additional(instance: dict[Any, Any], schema: dict[str, Any]) -> list[Any]:
    props = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [k for k in instance if k not in props
            and not any(isinstance(k, str) and re.search(p, k) for p in patterns)]


def _explain(error: Any, prefix: tuple[str | int, ...]) -> list[Problem]:
    path = prefix + tuple(error.absolute_path)
    v = error.validator
    inst = error.instance
    if v == "additionalProperties" and isinstance(inst, dict):
        known = list(error.schema.get("properties", {}))
        return [Problem(path + (k,), f"unknown key {_short(k)}{_suggest(str(k), known)}")
                for k in _additional(inst, error.schema)]
    if v == "required":
        missing = [k for k in error.validator_value if isinstance(inst, dict) and k not in inst]
        return [Problem(path, f"missing required key {k!r}", at_value=True)
                for k in missing[:1]] or [Problem(path, error.message, at_value=True)]
    if v == "type":
        return [Problem(path, f"must be {_words(error.validator_value)} "
                              f"(got {_words(_json_type(inst))})")]
    if v == "enum":
        choices = ", ".join(_short(c, 30) for c in error.validator_value)
        hint = _suggest(inst, error.validator_value) if isinstance(inst, str) else ""
        return [Problem(path, f"must be one of {choices} (got {_short(inst)}){hint}")]
    if v in ("anyOf", "oneOf") and error.context:
        return _explain_alternatives(error, path, prefix)
    message = error.message
    if len(message) > 160:
        message = message[:150] + " ..."
    return [Problem(path, message)]


def _explain_alternatives(error: Any, path: tuple[str | int, ...],
                          prefix: tuple[str | int, ...]) -> list[Problem]:
    """anyOf/oneOf: report the alternative the input was evidently meant to be.

    An alternative is ruled out when the value has the wrong type for it, or when its
    ``type`` key does not match (network-config v1 items, cloud-config discriminators).
    """
    base = len(error.absolute_path)
    branches: dict[Any, list[Any]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    alive, types, tags = [], [], []
    for errs in branches.values():
        ruled_out = False
        for sub in errs:
            rel = list(sub.absolute_path)[base:]
            if sub.validator == "type" and not rel:
                types += [sub.validator_value] if isinstance(sub.validator_value, str) \
                    else list(sub.validator_value)
                ruled_out = True
            elif sub.validator == "enum" and rel == ["type"]:
                tags += [t for t in sub.validator_value if isinstance(t, str)]
                ruled_out = True
        if not ruled_out:
            alive.append(errs)
    if len(alive) == 1:
        return [p for sub in alive[0] for p in _explain(sub, prefix)]
    if not alive and tags and isinstance(error.instance, dict) and "type" in error.instance:
        got = error.instance["type"]
        hint = _suggest(got, tags) if isinstance(got, str) else ""
        return [Problem(path + ("type",), f"must be one of {', '.join(map(repr, tags))} "
                                          f"(got {_short(got)}){hint}")]
    if not alive and types:
        got = _words(_json_type(error.instance))
        return [Problem(path, f"must be {_words(types)} (got {got})")]
    from jsonschema.exceptions import best_match  # type: ignore[import-untyped]
    best = best_match(e for errs in alive for e in errs) if alive else None
    if best is not None:
        return _explain(best, prefix)
    return [Problem(path, "does not match any of the forms cloud-init accepts")]
