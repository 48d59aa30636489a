"""The fast schema check (vmforge.seed.schemagate) held to jsonschema, the reference.

Its promise is one-sided (True only when jsonschema finds no error), but it is meant to be
exact: each example of cloud-init's documentation and thousands of broken variants of them
(wrong types, missing and unknown keys, bad enum values, duplicates, empty containers) get the
same verdict from both, unless the gate says it is unsure.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmforge import yamlload
from vmforge.seed import schemagate
from vmforge.seed.validate import _schema, _string_keys, _validator

DATA = Path(__file__).parent / "data"


def _examples() -> list[tuple[str, str, Any]]:
    out = []
    for file, default_kind in (("cloud-init-module-examples.json", "cloud-config"),
                               ("cloud-init-library-examples.json", "cloud-config"),
                               ("cloud-init-network-examples.json", "network-config")):
        for name, text in json.loads((DATA / file).read_text())["examples"].items():
            doc = yamlload.load(text, allow_duplicates=True)
            kind = default_kind
            if kind == "network-config":
                if isinstance(doc, dict) and isinstance(doc.get("network"), dict):
                    doc = doc["network"]
                kind = f"network-config-v{doc['version']}"
            out.append((name, kind, _string_keys(doc, ())[0]))
    return out


EXAMPLES = _examples()
VALUES: list[Any] = [None, True, False, 0, 1, -1, 2.5, "", "x", "yes", "none", [], ["x"], [1],
                     {}, {"x": 1}, b"bin"]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _mutants(doc: Any, rng: random.Random, n: int) -> list[Any]:
    paths = _paths(doc)
    out = []
    for _ in range(n):
        d = copy.deepcopy(doc)
        path = rng.choice(paths)
        node = _get(d, path)
        op = rng.randrange(6)
        if op == 0 and path:  # another value where this one was
            _get(d, path[:-1])[path[-1]] = copy.deepcopy(rng.choice(VALUES))
        elif op == 1 and isinstance(node, dict) and node:  # drop a key
            del node[rng.choice(list(node))]
        elif op == 2 and isinstance(node, dict):  # an unknown or misspelt key
            keys = list(node)
            key = (rng.choice(keys)[:-1] if keys and rng.random() < 0.5 else "bogus_key")
            node[key or "k"] = copy.deepcopy(rng.choice(VALUES))
        elif op == 3 and isinstance(node, list) and node:  # a duplicate item
            node.append(copy.deepcopy(node[0]))
        elif op == 4 and path and isinstance(node, str):  # a string that is near an enum
            _get(d, path[:-1])[path[-1]] = node.upper() + "x"
        elif op == 5 and path and isinstance(node, dict | list):  # emptied
            _get(d, path[:-1])[path[-1]] = type(node)()
        else:
            continue
        out.append(d)
    return out


def _reference(doc: Any, kind: str) -> bool | None:
    try:
        return not any(True for _ in _validator(kind).iter_errors(doc))
    except TypeError:  # jsonschema's pattern on bytes (YAML !!binary): it cannot tell either
        return None


def _verdict(doc: Any, kind: str) -> bool | None:
    try:
        return schemagate.is_valid(doc, _schema(kind))
    except schemagate.Unsure:
        return None


@pytest.mark.parametrize("name,kind,doc", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_the_gate_agrees_with_jsonschema(name: str, kind: str, doc: Any) -> None:
    rng = random.Random(name)
    invalid = unsure = 0
    for d in [doc, *_mutants(doc, rng, 40)]:
        got, want = _verdict(d, kind), _reference(d, kind)
        if want is None:
            assert got is None  # the gate must not answer where the reference cannot
            continue
        if got is None:
            unsure += 1
            continue
        assert got == want, (name, json.dumps(d, default=repr)[:400])
        invalid += not want
    assert unsure <= 10  # only bytes under a pattern or an enum make it unsure
    # every cloud-config example but the one invalid one (archives are lists, not checked so)
    if isinstance(doc, dict) and name != "yaml_examples/ansible_controller.rst#1":
        assert _verdict(doc, kind) is True


def test_the_mutations_do_break_documents() -> None:
    """The differential test above is only worth something if many variants are invalid."""
    total = invalid = 0
    for name, kind, doc in EXAMPLES[:40]:
        for d in _mutants(doc, random.Random(name), 40):
            total += 1
            invalid += _reference(d, kind) is False
    assert invalid > total // 4


@pytest.mark.parametrize("instance,schema,want", [
    (1, {"enum": [True]}, False), (True, {"enum": [1]}, False), (1.0, {"enum": [1]}, True),
    ([1, True], {"uniqueItems": True}, True), ([1, 1.0], {"uniqueItems": True}, False),
    (1.0, {"type": "integer"}, False), (True, {"type": "number"}, False),
    (b"x", {"type": "string", "minLength": 1}, True),
    (5, {"minimum": 5, "exclusiveMinimum": True}, False), (5, {"maximum": 5}, True),
    ({"a": 1}, {"$ref": "#/$defs/s", "type": "array", "$defs": {"s": {"type": "object"}}},
     True),  # Draft 4: $ref alone counts
    ({"ab": 1}, {"patternProperties": {"^a": {"type": "string"}}}, False),
    ({"b": 1}, {"patternProperties": {"^a": {}}, "additionalProperties": False}, False),
    ([1, "x"], {"items": [{"type": "integer"}], "additionalItems": False}, False),
    ([1, "x"], {"items": {"type": "integer"}, "additionalItems": False}, False),
    (3, {"oneOf": [{"type": "integer"}, {"minimum": 0}]}, False),
    (3, {"not": {"type": "string"}}, True),
    ({"a": 1}, {"dependencies": {"a": ["b"]}}, False),
    ({"a": 1}, {"format": "ipv4", "deprecated": True, "prefixItems": [{"type": "string"}]},
     True),
])
def test_keywords_as_jsonschema_has_them(instance: Any, schema: dict[str, Any],
                                         want: bool) -> None:
    from jsonschema import Draft4Validator, validators  # type: ignore[import-untyped]
    checker = Draft4Validator.TYPE_CHECKER.redefine(
        "string", lambda _c, v: isinstance(v, str | bytes))
    reference = validators.extend(Draft4Validator, type_checker=checker)(schema)
    assert reference.is_valid(instance) is want
    assert schemagate.is_valid(instance, schema) is want


@pytest.mark.parametrize("instance,schema", [
    ("x", {"$ref": "other.json#/a"}), (b"x", {"pattern": "x"}), (b"x", {"enum": ["x"]}),
    (1, {"type": "thing"}),
])
def test_what_it_cannot_decide_goes_to_jsonschema(instance: Any, schema: dict[str, Any]) -> None:
    with pytest.raises(schemagate.Unsure):
        schemagate.is_valid(instance, schema)


@pytest.mark.subprocess
def test_a_valid_cloud_config_does_not_import_jsonschema() -> None:
    code = ("import sys, vmforge.seed.validate as v; "
            "v.validate_user_data(b'#cloud-config\\nruncmd: [ls]\\npackages: [git]\\n'); "
            "print('jsonschema' in sys.modules, 'email' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.split() == ["False", "False"]
