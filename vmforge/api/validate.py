"""``POST /v1/validate``: check a VM request and cloud-init documents without creating
anything, as the CLI would (the same :class:`SpecError`/:class:`SeedError` messages, one per
problem, with line and column), and give back the request as YAML for ``vmforge run -f``.
``GET /v1/vms/{name}/timeline``: the boot as phases (JSON) or an SVG chart
(:mod:`vmforge.node.timeline`, with the guest's own timing data read through its agent).

The web console's create wizard calls ``validate`` as the user types; anything else may too
(an editor, CI).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import SeedError, SpecError, VmforgeError
from ..node.states import VmState
from .app import daemon_of
from .models import ERRORS_JSON
from .vms import VmName

__all__ = ["router", "ValidateIn", "ValidateOut", "Problem", "spec_yaml", "problems_of"]

router = APIRouter()

_SEED_MAX = 2 * 1024 * 1024  # the validators' own limit (1 MiB) gives the better message
_DOC_MAX = 16 * 1024 * 1024
_POSITION = re.compile(r"\bline (\d+), column (\d+)")
_SSH_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|"
                      r"sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) "
                      r"[A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$")
_SEEDS = (("user_data", "user-data"), ("meta_data", "meta-data"),
          ("network_config", "network-config"), ("vendor_data", "vendor-data"))


class ValidateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request: dict[str, Any] | None = Field(
        None, description="A VM request (`name` + `spec`) as POST /v1/vms takes it.")
    document: str | None = Field(
        None, max_length=_DOC_MAX,
        description="Or the request as YAML or JSON text (a file for `vmforge run -f`): "
                    "syntax errors come with line and column.")
    user_data: str | None = Field(None, max_length=_SEED_MAX,
                                  description="A cloud-init document on its own (as "
                                              "`vmforge seed validate` checks files).")
    meta_data: str | None = Field(None, max_length=_SEED_MAX)
    network_config: str | None = Field(None, max_length=_SEED_MAX)
    vendor_data: str | None = Field(None, max_length=_SEED_MAX)
    ssh_key: str | None = Field(
        None, max_length=16384,
        description="An SSH public key: `user_data` of the answer is then a cloud-config "
                    "with a default user holding it (also put in the request when it has "
                    "no user-data of its own).")
    ssh_user: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
                                 description="That user's name (default vmforge).")
    schema_check: bool = Field(True, description="Check cloud-init documents against "
                                                 "cloud-init's schemas (as the CLI does).")
    plan: bool = Field(True, description="Also check what create would: backing files, "
                                         "library images, the backend's capabilities.")


class Problem(BaseModel):
    error: str = Field(description="SpecError or SeedError (or the kind create would raise)")
    field: str | None = Field(default=None, description="e.g. spec.cloud_init.user_data, name")
    message: str = Field(description="As the CLI prints it")
    line: int | None = Field(default=None, description="1-based, within the field's document")
    column: int | None = None
    hint: str | None = None


class ValidateOut(BaseModel):
    ok: bool
    errors: list[Problem]
    request: dict[str, Any] | None = Field(
        None, description="The request as it would be sent (when it parses)")
    yaml: str | None = Field(default=None, description="The request as YAML, for `vmforge run -f`")
    user_data: str | None = Field(default=None, description="Made from ssh_key, when given")


class TimelineOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    vm: str
    started_at: float | None = None
    ready_seconds: float | None = None
    summary: str
    phases: list[dict[str, Any]]
    marks: list[dict[str, Any]]
    notes: list[str]


def problems_of(exc: VmforgeError) -> list[Problem]:
    """One :class:`Problem` per problem the error carries (a schema error lists several)."""
    from ..seed.validate import SeedSchemaError
    if isinstance(exc, SeedSchemaError):
        return [_problem(e) for e in exc.each()]
    return [_problem(exc)]


def _problem(exc: VmforgeError) -> Problem:
    m = _POSITION.search(exc.message)
    return Problem(error=type(exc).__name__, field=getattr(exc, "field", None),
                   message=exc.message, line=int(m.group(1)) if m else None,
                   column=int(m.group(2)) if m else None, hint=exc.hint)


def _request_problems(data: Any) -> list[Problem]:
    """Every problem of a request, each with its field (the CLI joins them in one message)."""
    from ..spec import VmRequest, parse_request, spec_error_from
    if not isinstance(data, dict):
        try:
            parse_request(data, "request")
        except SpecError as exc:
            return problems_of(exc)
        return []
    try:
        VmRequest.model_validate(data)
    except ValidationError as exc:
        out = []
        for e in exc.errors():
            try:
                single = ValidationError.from_exception_data(exc.title, [e])  # type: ignore
                err = spec_error_from(single)
            except Exception:  # noqa: BLE001 - an error kind that cannot be rebuilt alone
                return [_problem(spec_error_from(exc))]
            out.append(Problem(error="SpecError", field=err.field, message=err.message,
                               hint=err.hint))
        return out
    return []


def _seed_problems(text: str, kind: str, field: str, schema: bool) -> list[Problem]:
    from ..seed.validate import parse_meta_data, validate_network_config, validate_user_data
    try:
        if kind in ("user_data", "vendor_data"):
            validate_user_data(text.encode(), field, schema=schema)
        elif kind == "network_config":
            validate_network_config(text, field, schema=schema)
        else:
            parse_meta_data(text, field)
    except SeedError as exc:
        return problems_of(exc)
    return []


class _Dumper(yaml.SafeDumper):
    """Block scalars (``|``) for multi-line text such as user-data."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def spec_yaml(data: dict[str, Any]) -> str:
    """A request as YAML that ``vmforge run -f`` reads back to the same request."""
    head = "# vmforge VM spec: `vmforge run -f FILE` (or POST /v1/vms with it as JSON)\n"
    return head + yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                            width=100)


@router.post("/validate", response_model=ValidateOut, tags=["vms"],
             summary="Check a VM request and cloud-init documents (nothing is created)",
             description="Answers 200 with `ok` and the list of problems, each as the CLI "
                         "reports it (field, message, line and column when known), and the "
                         "request as YAML usable with `vmforge run -f`.")
async def validate(request: Request, body: ValidateIn) -> dict[str, Any]:
    d = daemon_of(request)
    errors: list[Problem] = []
    filled: str | None = None
    data: Any = body.request
    if body.document is not None:
        if data is not None:
            errors.append(Problem(error="SpecError", field="document",
                                  message="give request or document, not both"))
        else:
            from ..spec import load_document
            try:
                data = load_document(body.document, "document")
            except SpecError as exc:
                errors += problems_of(exc)
                data = None

    if body.ssh_key is not None:
        key = body.ssh_key.strip()
        if not _SSH_KEY.match(key):
            errors.append(Problem(
                error="SpecError", field="ssh_key",
                message="ssh_key: not an SSH public key (one line: TYPE BASE64 [COMMENT])",
                hint="paste the content of ~/.ssh/id_ed25519.pub"))
        else:
            from ..seed.build import default_user_data
            from ..spec import NAME_RE
            name = data.get("name") if isinstance(data, dict) else None
            host = name if isinstance(name, str) and NAME_RE.fullmatch(name) else "vm"
            filled = default_user_data(host, key, body.ssh_user or "vmforge").decode()
            if isinstance(data, dict) and isinstance(data.get("spec"), dict):
                spec = data["spec"]
                ci = spec.get("cloud_init")
                if ci is None or (isinstance(ci, dict) and not ci.get("user_data")):
                    data = {**data, "spec": {**spec, "cloud_init": {**(ci or {}),
                                                                    "user_data": filled}}}

    req = None
    out_request: dict[str, Any] | None = None
    if data is not None:
        spec_problems = _request_problems(data)
        errors += spec_problems
        if not spec_problems:
            from ..spec import parse_request
            try:
                req = parse_request(data, "request")
            except SpecError as exc:  # not expected: the same checks as above
                errors += problems_of(exc)
        if req is not None:
            out_request = req.model_dump(mode="json", by_alias=True, exclude_unset=True)
        # The cloud-init documents are checked even when other fields are wrong, so that
        # the wizard can show their errors as the user types.
        spec = data.get("spec") if isinstance(data, dict) else None
        ci = spec.get("cloud_init") if isinstance(spec, dict) else None
        for kind, _label in _SEEDS:
            text = ci.get(kind) if isinstance(ci, dict) else None
            if isinstance(text, str):
                errors += _seed_problems(text, kind, f"spec.cloud_init.{kind}",
                                         body.schema_check)
        if req is not None and body.plan and not errors:
            errors += await asyncio.to_thread(_plan_problems, d.manager, req)

    for kind, _label in _SEEDS:
        text = getattr(body, kind)
        if text is not None:
            errors += _seed_problems(text, kind, kind, body.schema_check)

    return {"ok": not errors, "errors": [e.model_dump() for e in errors],
            "request": out_request,
            "yaml": spec_yaml(out_request) if out_request is not None else None,
            "user_data": filled}


def _plan_problems(manager: Any, req: Any) -> list[Problem]:
    """What ``create`` would refuse (missing backing files and images, capabilities), found
    by planning: nothing is written."""
    from ..spec import resolve_paths
    try:
        manager.plan(resolve_paths(req, manager.data.root))
    except VmforgeError as exc:
        if _builtin_missing(req, exc):
            return []  # create builds it first (as POST /v1/vms and `vmforge run` do)
        return problems_of(exc)
    except (OSError, ValueError) as exc:
        return [Problem(error="SpecError", field=None, message=f"cannot plan: {exc}")]
    return []


def _builtin_missing(req: Any, exc: VmforgeError) -> bool:
    """``exc`` says a built-in image (minimal, debian) named without a version is missing."""
    from ..builders.builtin import BUILTIN
    from ..images.library import parse_ref
    field = getattr(exc, "field", None) or ""
    refs = {"spec.kernel.image": req.spec.kernel.image if req.spec.kernel else None}
    refs.update({f"spec.disks[{i}].image": d.image for i, d in enumerate(req.spec.disks)})
    ref = refs.get(field)
    if not ref:
        return False
    try:
        name, version = parse_ref(ref)
    except VmforgeError:
        return False
    return name in BUILTIN and version is None and "no " in exc.message


Format = Annotated[str, Query(pattern=r"^(json|svg)$", description="json or svg")]


@router.get("/vms/{name}/timeline", response_model=TimelineOut, tags=["vms"],
            summary="The boot timeline (phases from launch to ready)",
            description="JSON, or with `format=svg` a chart. A running VM's agent is asked "
                        "for the guest's own timing data; otherwise only the record's times "
                        "are known (a note says so).",
            responses={**ERRORS_JSON, 200: {"content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/TimelineOut"}},
                "image/svg+xml": {"schema": {"type": "string"}}}}})
async def timeline(request: Request, name: VmName, format: Format = "json") -> Response:
    from ..node.timeline import build_timeline, render_svg
    d = daemon_of(request)
    rec = await asyncio.to_thread(d.manager.get, name)
    boot = None
    note = None
    if rec.state is VmState.RUNNING and rec.req.spec.agent.enabled:
        try:
            async with d.agents.session(name) as client:
                boot = await asyncio.wait_for(client.boot_timing(), 30)
        except (VmforgeError, TimeoutError, OSError) as exc:
            note = f"the guest agent could not be asked: {getattr(exc, 'message', exc)}"
    tl = build_timeline(rec.name, rec.started_at, rec.ready_at, boot)
    if note:
        tl = dataclasses.replace(tl, notes=(*tl.notes, note))
    if format == "svg":
        return Response(render_svg(tl), media_type="image/svg+xml",
                        headers={"Content-Security-Policy": "default-src 'none'; "
                                 "style-src 'unsafe-inline'", "Cache-Control": "no-store"})
    return JSONResponse(tl.to_json())
