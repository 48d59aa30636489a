"""Request and response bodies of the REST API (they make the OpenAPI document)."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ErrorOut", "VmOut", "StopOut", "DeletedOut", "ExecIn", "ExecOut", "FileOut",
           "ImageOut", "ImageInspectOut", "PullIn", "ImportIn", "BuildIn", "BuildKind",
           "JobOut", "PruneOut", "HostOut", "Wait", "ERRORS"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorOut(BaseModel):
    error: str = Field(description="The exception's kind, e.g. SpecError, VmNotFound.")
    message: str
    status: int
    field: str | None = Field(None, description="The request field at fault, e.g. "
                                                "spec.disks[0].backing_file.")
    hint: str | None = None
    console_tail: str | None = None


class VmOut(_Open):
    name: str
    state: str
    backend: str
    pid: int | None = None
    accel: str | None = None
    dir: str
    created_at: float
    started_at: float | None = None
    ready_at: float | None = None
    stopped_at: float | None = None
    boot_seconds: float | None = None
    last_error: str | None = None
    stop_reason: str | None = None
    console_log: str
    agent: str
    runtime: dict[str, Any] | None = None
    cpu_cores: int | None = None
    memory_mib: int | None = None
    spec: dict[str, Any] | None = None
    links: dict[str, str] = Field(default_factory=dict)
    job: str | None = Field(None, description="The background job starting the VM, if any.")


class StopOut(BaseModel):
    name: str
    outcome: str = Field(description="agent | acpi | quit | killed | not-running")
    vm: VmOut


class DeletedOut(BaseModel):
    name: str
    deleted: bool


class Wait(enum.StrEnum):
    NONE = "none"
    RUNNING = "running"
    READY = "ready"


class ExecIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    argv: list[str] = Field(min_length=1, max_length=4096)
    shell: bool = False
    env: dict[str, str] | None = None
    cwd: str | None = None
    stdin: str | None = Field(None, description="Text given to the command's stdin.")
    stdin_b64: str | None = Field(None, description="Bytes (base64) for stdin.")
    timeout: float | None = Field(None, gt=0, le=86400)


class ExecOut(BaseModel):
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration: float
    stdout: str = Field(description="base64")
    stderr: str = Field(description="base64")


class FileOut(_Open):
    path: str
    size: int
    sha256: str


class ImageOut(_Open):
    id: int
    name: str
    version: int
    ref: str
    kind: str
    format: str | None = None
    files: dict[str, str]
    paths: dict[str, str]
    cmdline: str | None = None
    parent_id: int | None = None
    source: str | None = None
    recipe: dict[str, Any] | None = None
    size: int
    virtual_size: int | None = None
    created_at: float


class ImageInspectOut(ImageOut):
    used_by_vms: list[str] = Field(default_factory=list)
    child_images: list[str] = Field(default_factory=list)
    lineage: list[str] = Field(default_factory=list)
    qemu_img: dict[str, Any] | None = None


class PullIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://", max_length=4096)
    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    sha256sums_url: str | None = Field(None, pattern=r"^https?://", max_length=4096)


class ImportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="A qcow2 or raw file on the node.", max_length=4096)
    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")


class BuildKind(enum.StrEnum):
    MINIMAL = "minimal"
    DEBIAN = "debian"
    GOLDEN = "golden"


class BuildIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: BuildKind
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
    suite: str = Field("bookworm", pattern=r"^[a-z]+$")
    size_gib: int = Field(3, ge=1, le=64)
    recipe: dict[str, Any] | None = Field(
        None, description="golden: the recipe (as the YAML file); relative file paths are "
                          "relative to the daemon's data directory")


class JobOut(_Open):
    id: str
    kind: str
    target: str | None = None
    state: str = Field(description="running | succeeded | failed")
    created_at: float
    finished_at: float | None = None
    message: str
    done: int | None = None
    total: int | None = None
    progress: list[dict[str, Any]]
    result: Any = None
    error: dict[str, Any] | None = None


class PruneOut(BaseModel):
    removed: list[str]


class HostOut(_Open):
    version: str
    data_dir: str
    checks: list[dict[str, Any]]
    backends: list[dict[str, Any]]
    supervised: dict[str, int | None]
    adopted: list[str]


def _err(desc: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": desc}


ERRORS: dict[int | str, dict[str, Any]] = {
    401: _err("Missing or wrong bearer token"),
    403: _err("Forbidden (in the guest)"),
    404: _err("No such VM, image, job or guest file"),
    409: _err("Conflict with the VM's state, or it exists"),
    422: _err("Invalid request; `field` names the culprit"),
    502: _err("The hypervisor, a builder or the guest agent failed"),
    503: _err("The host lacks something, or the agent channel is busy"),
    504: _err("The guest agent did not answer in time"),
}


# Streaming routes answer errors as JSON although their success is not: spelled out so that
# the document says application/json for them (a ``model`` takes the route's media type).
ERRORS_JSON: dict[int | str, dict[str, Any]] = {
    code: {"description": e["description"], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    for code, e in ERRORS.items()}
