"""A fast yes/no check of a document against a Draft 4 JSON schema, in front of ``jsonschema``.

Importing ``jsonschema`` and building a validator for cloud-init's 150 KB schema costs about
60 ms, thirty times what it takes to check a typical cloud-config. Almost every document that
reaches `vmforge seed build` or `vmforge run` is valid, so :func:`is_valid` answers first, and
``jsonschema`` (with its error messages, lines and hints) is loaded only for a document this
says is invalid.

The contract is one-sided: ``is_valid(...) is True`` only when ``jsonschema``'s
``Draft4Validator`` (with bytes accepted as strings, as vmforge configures it) finds no error.
Every Draft 4 validation keyword is implemented exactly as ``jsonschema`` implements it; what
this module does not implement (remote ``$ref``, an unknown type name, a pattern applied to
bytes) raises :class:`Unsure`, and the caller asks ``jsonschema``. Keywords that Draft 4 does
not define (``description``, ``deprecated``, ``prefixItems``...) are ignored, as ``jsonschema``
ignores them. As in Draft 4, a schema with ``$ref`` is its reference alone. ``format`` asserts
nothing (vmforge's validator has no format checker). A differential test
(tests/unit/test_schemagate.py) holds this module to ``jsonschema`` on cloud-init's examples,
on broken variants of them and on random documents.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # not typing's: `vmforge seed build` and `exec` must not import it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["is_valid", "Unsure"]


class Unsure(Exception):
    """This check cannot decide: ask jsonschema."""


def is_valid(instance: Any, schema: dict[str, Any]) -> bool:
    """Whether ``instance`` satisfies ``schema`` (the root, for ``#/...`` references);
    raises :class:`Unsure` where only jsonschema can tell."""
    return _Checker(schema).ok(instance, schema)


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _search(pattern: str, text: Any) -> bool:
    if not isinstance(text, str):
        raise Unsure("pattern on bytes")
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        compiled = _PATTERNS[pattern] = re.compile(pattern)
    return compiled.search(text) is not None


def _is_type(value: Any, name: str) -> bool:
    if name == "string":
        return isinstance(value, str | bytes)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "null":
        return value is None
    raise Unsure(f"type {name!r}")


def _unbool(value: Any) -> Any:
    if value is True:
        return ("<true>",)
    if value is False:
        return ("<false>",)
    return value


def _equal(a: Any, b: Any) -> bool:
    """jsonschema's equality: true is not 1, false is not 0, 1 is 1.0; deep."""
    if a is b:
        return True
    if isinstance(a, bytes) or isinstance(b, bytes):  # a Sequence to jsonschema
        raise Unsure("bytes compared")
    if isinstance(a, str) or isinstance(b, str):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | dict) or isinstance(b, list | dict):
        return False
    return bool(_unbool(a) == _unbool(b))


class _Checker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise Unsure(f"$ref {ref!r}")
        node: Any = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if "%" in part:
                raise Unsure(f"$ref {ref!r}")
            if isinstance(node, list):
                try:
                    node = node[int(part)]
                except (ValueError, IndexError):
                    raise Unsure(f"$ref {ref!r}") from None
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise Unsure(f"$ref {ref!r}")
        return node

    def ok(self, inst: Any, schema: Any) -> bool:
        if not isinstance(schema, dict):
            raise Unsure("schema is not an object")
        ref = schema.get("$ref")
        if ref is not None:
            return self.ok(inst, self.resolve(ref))
        for key, value in schema.items():
            check = _KEYWORDS.get(key)
            if check is not None and not check(self, inst, value, schema):
                return False
        return True


# Each takes (checker, instance, keyword value, schema) -> valid; the keyword applies only to
# instances of its type, as in JSON Schema.

def _type(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    names = value if isinstance(value, list) else [value]
    for name in names:
        if isinstance(name, dict):  # Draft 3 style schemas in "type": not Draft 4
            raise Unsure("schema in type")
        if _is_type(inst, name):
            return True
    return False


def _enum(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if isinstance(inst, bytes):
        raise Unsure("enum on bytes")
    return any(_equal(inst, v) for v in value)


def _properties(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not isinstance(inst, dict):
        return True
    return all(c.ok(inst[k], sub) for k, sub in value.items() if k in inst)


def _pattern_properties(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not isinstance(inst, dict):
        return True
    for pattern, sub in value.items():
        for k, v in inst.items():
            if _search(pattern, k) and not c.ok(v, sub):
                return False
    return True


def _additional_properties(c: _Checker, inst: Any, value: Any,
                           schema: dict[str, Any]) -> bool:
    if not isinstance(inst, dict):
        return True
    props = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = [k for k in inst if k not in props
              and not any(_search(p, k) for p in patterns)]
    if isinstance(value, dict):
        return all(c.ok(inst[k], value) for k in extras)
    if value is False:
        return not extras
    return True


def _required(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not isinstance(inst, dict):
        return True
    return all(k in inst for k in value)


def _min_properties(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return not isinstance(inst, dict) or len(inst) >= value


def _max_properties(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return not isinstance(inst, dict) or len(inst) <= value


def _dependencies(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not isinstance(inst, dict):
        return True
    for prop, dep in value.items():
        if prop not in inst:
            continue
        if isinstance(dep, list):
            if not all(d in inst for d in dep):
                return False
        elif not c.ok(inst, dep):
            return False
    return True


def _items(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not isinstance(inst, list):
        return True
    if isinstance(value, list):
        return all(c.ok(item, sub) for item, sub in zip(inst, value, strict=False))
    return all(c.ok(item, value) for item in inst)


def _additional_items(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    items = schema.get("items", {})
    if not isinstance(inst, list) or not isinstance(items, list):
        return True  # only with a list of items, as jsonschema
    extra = inst[len(items):]
    if isinstance(value, dict):
        return all(c.ok(item, value) for item in extra)
    if value is False:
        return not extra
    return True


def _min_items(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return not isinstance(inst, list) or len(inst) >= value


def _max_items(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return not isinstance(inst, list) or len(inst) <= value


def _unique_items(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not value or not isinstance(inst, list):
        return True
    return not any(_equal(inst[i], inst[j])
                   for i in range(len(inst)) for j in range(i + 1, len(inst)))


def _number(inst: Any) -> bool:
    return isinstance(inst, int | float) and not isinstance(inst, bool)


def _minimum(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not _number(inst):
        return True
    return bool(inst > value if schema.get("exclusiveMinimum", False) else inst >= value)


def _maximum(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not _number(inst):
        return True
    return bool(inst < value if schema.get("exclusiveMaximum", False) else inst <= value)


def _multiple_of(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    if not _number(inst):
        return True
    if isinstance(value, float) or isinstance(inst, float):
        raise Unsure("multipleOf with floats")
    return bool(inst % value == 0)


def _min_length(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return not isinstance(inst, str | bytes) or len(inst) >= value


def _max_length(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return not isinstance(inst, str | bytes) or len(inst) <= value


def _pattern(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return not isinstance(inst, str | bytes) or _search(value, inst)


def _all_of(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return all(c.ok(inst, sub) for sub in value)


def _any_of(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return any(c.ok(inst, sub) for sub in value)


def _one_of(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return sum(1 for sub in value if c.ok(inst, sub)) == 1


def _not(c: _Checker, inst: Any, value: Any, schema: dict[str, Any]) -> bool:
    return not c.ok(inst, value)


_KEYWORDS = {
    "type": _type, "enum": _enum, "properties": _properties,
    "patternProperties": _pattern_properties, "additionalProperties": _additional_properties,
    "required": _required, "minProperties": _min_properties, "maxProperties": _max_properties,
    "dependencies": _dependencies, "items": _items, "additionalItems": _additional_items,
    "minItems": _min_items, "maxItems": _max_items, "uniqueItems": _unique_items,
    "minimum": _minimum, "maximum": _maximum, "multipleOf": _multiple_of,
    "minLength": _min_length, "maxLength": _max_length, "pattern": _pattern,
    "allOf": _all_of, "anyOf": _any_of, "oneOf": _one_of, "not": _not,
}
