"""The VMMs' own API documents as test oracles (tests/unit/data/oracles, copied verbatim).

``Oracle("cloud-hypervisor")`` / ``Oracle("firecracker")`` load the pinned OpenAPI 3 / Swagger 2
document with ``yaml.safe_load``, find the operation for a method and a concrete path (path
templates such as ``/drives/{drive_id}`` included; Cloud Hypervisor's server base ``/api/v1``
stripped) and validate a request body against that operation's schema with ``jsonschema``,
``$ref``s resolved against the document's own definitions.

Strict mode (the default): every object schema that lists properties gets
``additionalProperties: false``, so a field the document does not define fails (neither
document says so itself; see the README beside the documents).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DOCS = Path(__file__).parent / "unit" / "data" / "oracles"
FILES = {"cloud-hypervisor": "cloud-hypervisor.yaml", "firecracker": "firecracker.yaml"}


@dataclass(frozen=True)
class Operation:
    method: str
    template: str           # the document's path, e.g. /drives/{drive_id}
    params: dict[str, str]  # path parameters of the concrete path
    body_schema: dict[str, Any] | None
    body_required: bool
    responses: dict[str, Any]


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _rewrite_refs(node: Any, prefix: str) -> Any:
    """OpenAPI 3's ``#/components/schemas/X`` -> ``#/definitions/X`` (one resolver for both)."""
    if isinstance(node, dict):
        return {k: (v.replace(prefix, "#/definitions/") if k == "$ref" and isinstance(v, str)
                    else _rewrite_refs(v, prefix)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


class Oracle:
    def __init__(self, name: str, strict: bool = True) -> None:
        self.name = name
        self.doc: dict[str, Any] = _load(name)
        if "openapi" in self.doc:  # Cloud Hypervisor: OpenAPI 3
            defs = _rewrite_refs(self.doc["components"]["schemas"], "#/components/schemas/")
            self.base = "/api/v1"
            assert self.doc["servers"][0]["url"].endswith(self.base)
        else:  # Firecracker: Swagger 2
            defs = self.doc["definitions"]
            self.base = self.doc.get("basePath", "/").rstrip("/")
        self.definitions = _strict(defs) if strict else copy.deepcopy(defs)
        self._paths = [(re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "([^/]+)", re.escape(p))
                                   + "$"), p) for p in self.doc["paths"]]

    # -- lookups
    def operation(self, method: str, path: str) -> Operation | None:
        if not path.startswith(self.base + "/") and self.base:
            return None
        rel = path[len(self.base):] if self.base else path
        for rx, template in self._paths:
            m = rx.match(rel)
            if m is None:
                continue
            op = self.doc["paths"][template].get(method.lower())
            if op is None:
                return None
            names = re.findall(r"\{([^}]+)\}", template)
            params = dict(zip(names, m.groups(), strict=True))
            schema, required = self._body(op)
            return Operation(method.upper(), template, params, schema, required,
                             op.get("responses", {}))
        return None

    def _body(self, op: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        if "requestBody" in op:  # OpenAPI 3
            rb = op["requestBody"]
            return rb["content"]["application/json"]["schema"], bool(rb.get("required"))
        for p in op.get("parameters") or []:  # Swagger 2
            if p.get("in") == "body":
                return p["schema"], bool(p.get("required"))
        return None, False

    def schema(self, ref_or_schema: dict[str, Any] | str) -> dict[str, Any]:
        sub = {"$ref": f"#/definitions/{ref_or_schema}"} if isinstance(ref_or_schema, str) \
            else _rewrite_refs(ref_or_schema, "#/components/schemas/")
        return {**sub, "definitions": self.definitions}

    # -- checks
    def errors(self, method: str, path: str, body: Any) -> list[str]:
        """Why the document does not allow this request (empty: it does)."""
        op = self.operation(method, path)
        if op is None:
            return [f"{method} {path}: no such operation in {self.name}'s API document"]
        if op.body_schema is None:
            return [] if body is None else [f"{method} {path} takes no body"]
        if body is None:
            return [f"{method} {path} needs a body"] if op.body_required else []
        return self.body_errors(op.body_schema, body)

    def body_errors(self, schema: dict[str, Any] | str, body: Any) -> list[str]:
        validator = jsonschema.Draft4Validator(self.schema(schema))
        return [f"{'/'.join(str(x) for x in e.absolute_path) or '(body)'}: {e.message}"
                for e in sorted(validator.iter_errors(body), key=lambda e: list(e.path))]

    def check(self, method: str, path: str, body: Any) -> None:
        errs = self.errors(method, path, body)
        assert not errs, "\n".join(errs)


@cache
def _load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DOCS / FILES[name]).read_text())
    assert isinstance(data, dict)
    return data
