"""`vmforge image ...`: build, pull, import, list, inspect, remove, prune."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import errors_reported, human_size, manager, out, print_json, progress

image_app = typer.Typer(no_args_is_help=True, help="The local image library and builders.")
build_app = typer.Typer(no_args_is_help=True, help="Build images.")
image_app.add_typer(build_app, name="build")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@build_app.command("minimal")
def build_minimal_cmd(
    name: Annotated[str, typer.Option(help="Library name.")] = "minimal",
    json_out: JsonOpt = False,
) -> None:
    """Kernel + busybox + python + agent initramfs from Debian packages (direct kernel boot)."""
    from ..build.minimal import build_minimal

    with errors_reported():
        m = manager()
        t0 = time.monotonic()
        with progress("building minimal image") as p:
            art = build_minimal(m.data.cache, progress=p)
        latest = m.library.find(name)
        if latest and (latest.recipe or {}).get("key") == art.key:
            img = latest
            note = "unchanged"
        else:
            recipe: dict[str, Any] = {**art.recipe(), "agent": True}
            img = m.library.add(name, {"kernel": art.vmlinuz, "vmlinux": art.vmlinux,
                                       "initrd": art.initrd}, kind="kernel",
                                cmdline=art.cmdline, source="build:minimal", recipe=recipe)
            note = "new version"
        if json_out:
            print_json(img.as_dict())
        else:
            out.print(f"[bold]{img.ref}[/] ({note}) in {time.monotonic() - t0:.1f}s: "
                      f"initrd {human_size(art.initrd.stat().st_size)}", highlight=False)


@image_app.command("ls")
def ls_cmd(json_out: JsonOpt = False) -> None:
    """List images."""
    with errors_reported():
        imgs = manager().library.all()
        if json_out:
            print_json([i.as_dict() for i in imgs])
            return
        from rich.table import Table
        t = Table(box=None, header_style="bold")
        for col in ("IMAGE", "KIND", "FORMAT", "SIZE", "VIRTUAL", "SOURCE", "SHA256"):
            t.add_column(col)
        for i in imgs:
            main = i.files.get("disk") or i.files.get("initrd") or ""
            t.add_row(i.ref, i.kind, i.format or "-", human_size(i.size),
                      human_size(i.virtual_size), i.source or "-", main[:12])
        out.print(t)


@image_app.command("inspect")
def inspect_cmd(ref: str, json_out: JsonOpt = False) -> None:
    """Format, sizes, backing chain, lineage and users of an image."""
    with errors_reported():
        lib = manager().library
        img = lib.resolve(ref)
        data = img.as_dict()
        vms, children = lib.users(img)
        data["used_by_vms"] = vms
        data["child_images"] = children
        data["lineage"] = lib.lineage(img)
        if img.path("disk"):
            from ..images.qcow2 import image_info
            data["qemu_img"] = image_info(img.paths["disk"]).as_dict()
        if json_out:
            print_json(data)
        else:
            import json
            out.print_json(json.dumps(data, default=str))


@image_app.command("rm")
def rm_cmd(refs: Annotated[list[str], typer.Argument(help="NAME[:VERSION]")]) -> None:
    """Remove images (refused while a VM or a child image uses them)."""
    with errors_reported():
        lib = manager().library
        for ref in refs:
            img = lib.remove(ref)
            out.print(f"removed {img.ref}")


@image_app.command("prune")
def prune_cmd() -> None:
    """Delete stored files no image refers to."""
    with errors_reported():
        removed = manager().library.prune()
        out.print(f"pruned {len(removed)} file(s)")


@image_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="Image file (qcow2 or raw).")],
    name: Annotated[str, typer.Option("--name", help="Library name.")],
    json_out: JsonOpt = False,
) -> None:
    """Copy an image file into the library."""
    from ..images.importing import import_disk

    with errors_reported():
        with progress(f"importing {file.name}"):
            img = import_disk(manager().library, file, name, source=f"file:{file.name}")
        if json_out:
            print_json(img.as_dict())
        else:
            out.print(f"imported [bold]{img.ref}[/] ({img.format}, "
                      f"{human_size(img.virtual_size)} virtual)", highlight=False)
