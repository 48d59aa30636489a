"""``/v1/images``: list, inspect, pull (a job), import (a job, or an upload), build (a job:
minimal, debian, golden recipe), rm, prune; ``/v1/jobs`` reads the jobs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from ..errors import SpecError
from ..events import Event
from .app import daemon_of
from .errors import ApiError
from .jobs import Job, Report
from .models import (
    BuildIn,
    BuildKind,
    ImageInspectOut,
    ImageOut,
    ImportIn,
    JobOut,
    PruneOut,
    PullIn,
)

__all__ = ["router"]

router = APIRouter()

REF_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}(:(\d{1,9}|latest))?$"
ImageRef = Annotated[str, Path(pattern=REF_PATTERN, max_length=80,
                               description="NAME[:VERSION]")]
ImageName = Annotated[str, Query(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")]


def _job(job: Job) -> JSONResponse:
    return JSONResponse(job.as_dict(), status_code=202,
                        headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/images", response_model=list[ImageOut], tags=["images"], summary="List images")
async def list_images(request: Request) -> list[dict[str, Any]]:
    lib = daemon_of(request).manager.library
    return [i.as_dict() for i in await asyncio.to_thread(lib.all)]


@router.get("/images/{ref}", response_model=ImageInspectOut, tags=["images"],
            summary="Inspect an image")
async def inspect_image(request: Request, ref: ImageRef) -> dict[str, Any]:
    lib = daemon_of(request).manager.library

    def inspect() -> dict[str, Any]:
        img = lib.find(ref)
        if img is None:
            raise ApiError(404, f"no image {ref!r} in the library", field="ref",
                           kind="ImageNotFound", hint="GET /v1/images")
        data = img.as_dict()
        data["used_by_vms"], data["child_images"] = lib.users(img)
        data["lineage"] = lib.lineage(img)
        if img.path("disk"):
            from ..images.qcow2 import image_info
            data["qemu_img"] = image_info(img.paths["disk"]).as_dict()
        return data
    return await asyncio.to_thread(inspect)


@router.delete("/images/{ref}", response_model=ImageOut, tags=["images"],
               summary="Remove an image (refused while a VM or child image uses it)")
async def remove_image(request: Request, ref: ImageRef) -> dict[str, Any]:
    lib = daemon_of(request).manager.library
    if await asyncio.to_thread(lib.find, ref) is None:
        raise ApiError(404, f"no image {ref!r} in the library", field="ref",
                       kind="ImageNotFound")
    return (await asyncio.to_thread(lib.remove, ref)).as_dict()


@router.post("/images/prune", response_model=PruneOut, tags=["images"],
             summary="Delete stored files no image refers to")
async def prune_images(request: Request) -> dict[str, Any]:
    lib = daemon_of(request).manager.library
    return {"removed": await asyncio.to_thread(lib.prune)}


@router.post("/images/pull", response_model=JobOut, status_code=202, tags=["images"],
             summary="Download an image (a background job)")
async def pull_image(request: Request, body: PullIn) -> JSONResponse:
    d = daemon_of(request)
    from ..images.fetch import pull

    def work(report: Report) -> dict[str, Any]:
        def bytes_done(done: int, total: int | None) -> None:
            report(Event(None, "progress", f"{done} of {total or '?'} bytes",
                         data={"done": done, "total": total}))
        img = pull(d.manager.library, body.url, body.name, sha256=body.sha256,
                   sha256sums_url=body.sha256sums_url, progress=bytes_done,
                   notice=lambda m: report(Event(None, "notice", m)))
        return img.as_dict()
    return _job(d.jobs.run_sync("image.pull", body.name, work))


@router.post("/images/import", response_model=JobOut, status_code=202, tags=["images"],
             summary="Import a disk file that is on the node (a background job)")
async def import_image(request: Request, body: ImportIn) -> JSONResponse:
    d = daemon_of(request)
    path = FsPath(body.path)
    if not path.is_absolute():
        path = d.manager.data.root / path
    if not path.is_file():
        raise SpecError(f"file not found on the node: {path}", field="path")
    from ..images.importing import import_disk

    def work(report: Report) -> dict[str, Any]:
        report(Event(None, "import", f"importing {path.name}"))
        return import_disk(d.manager.library, path, body.name,
                           source=f"file:{path.name}").as_dict()
    return _job(d.jobs.run_sync("image.import", body.name, work))


@router.put("/images/upload", response_model=ImageOut, status_code=201, tags=["images"],
            summary="Upload a disk image (qcow2 or raw) into the library",
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}}})
async def upload_image(request: Request, name: ImageName) -> JSONResponse:
    d = daemon_of(request)
    expected = request.headers.get("x-content-sha256")
    spool = d.manager.data.root / "tmp"
    spool.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="image-upload-", dir=spool)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                h.update(chunk)
                f.write(chunk)
        if expected and expected.lower() != h.hexdigest():
            raise ApiError(422, f"checksum mismatch: the body's sha256 is {h.hexdigest()}",
                           field="X-Content-SHA256", kind="ChecksumError")
        from ..images.importing import import_disk
        img = await asyncio.to_thread(import_disk, d.manager.library, tmp, name,
                                      source="upload", move=True, sha256=h.hexdigest())
        return JSONResponse(img.as_dict(), status_code=201)
    finally:
        FsPath(tmp).unlink(missing_ok=True)


@router.post("/images/build", response_model=JobOut, status_code=202, tags=["images"],
             summary="Build an image (a background job): minimal, debian or a golden recipe")
async def build_image(request: Request, body: BuildIn) -> JSONResponse:
    d = daemon_of(request)
    m = d.manager
    if body.kind is BuildKind.GOLDEN:
        if body.recipe is None:
            raise SpecError("a golden build needs a recipe", field="recipe")
        from pydantic import ValidationError

        from ..builders.golden import GoldenRecipe, build_golden
        from ..spec import spec_error_from
        try:
            recipe = GoldenRecipe.model_validate(body.recipe)
        except ValidationError as exc:
            err = spec_error_from(exc, "recipe")
            err.field = f"recipe.{err.field}" if err.field else "recipe"
            raise err from None

        async def golden(report: Report) -> list[dict[str, Any]]:
            imgs = await build_golden(m, recipe, m.data.root, report)
            return [i.as_dict() for i in imgs]
        return _job(d.jobs.run_async("image.build", recipe.name, golden))
    if body.recipe is not None:
        raise SpecError("only golden builds take a recipe", field="recipe")
    name = body.name or body.kind.value

    def work(report: Report) -> dict[str, Any]:
        from ..builders import builtin

        if body.kind is BuildKind.MINIMAL:
            return builtin.register_minimal(m.library, m.data.cache, name, report).as_dict()
        from ..builders.debian import DebianRecipe
        return builtin.register_debian(m.library, m.data.cache, name, report,
                                       DebianRecipe(suite=body.suite,
                                                    size_gib=body.size_gib)).as_dict()
    return _job(d.jobs.run_sync("image.build", name, work))


@router.get("/jobs", response_model=list[JobOut], tags=["jobs"], summary="List jobs")
async def list_jobs(request: Request) -> list[dict[str, Any]]:
    return [j.as_dict() for j in daemon_of(request).jobs.all()]


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], summary="A job")
async def get_job(request: Request,
                  job_id: Annotated[str, Path(pattern=r"^job-[0-9a-f]{12}$")]
                  ) -> dict[str, Any]:
    job = daemon_of(request).jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", field="job_id", kind="JobNotFound",
                       hint="jobs are kept while the daemon runs (the last 500)")
    return job.as_dict()
