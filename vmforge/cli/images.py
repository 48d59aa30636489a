"""`vmforge image ...`: build, pull, import, list, inspect, verify, remove, prune."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import errors_reported, human_size, manager, out, print_json, progress
from .complete import ImageRef, image_refs

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
    from ..builders.builtin import register_minimal

    with errors_reported():
        m = manager()
        t0 = time.monotonic()
        before = m.library.find(name)
        with progress("building minimal image") as p:
            img = register_minimal(m.library, m.data.cache, name, p)
        note = "unchanged" if before and before.id == img.id else "new version"
        if json_out:
            print_json(img.as_dict())
        else:
            initrd = img.path("initrd")
            out.print(f"[bold]{img.ref}[/] ({note}) in {time.monotonic() - t0:.1f}s: initrd "
                      f"{human_size(initrd.stat().st_size if initrd else None)}",
                      highlight=False)


@build_app.command("debian")
def build_debian_cmd(
    name: Annotated[str, typer.Option(help="Library name.")] = "debian",
    suite: Annotated[str, typer.Option(help="Debian suite.")] = "bookworm",
    size_gib: Annotated[int, typer.Option(help="Root filesystem size.")] = 3,
    json_out: JsonOpt = False,
) -> None:
    """A cloud image from Debian packages (debootstrap, cloud-init NoCloud, ssh, python3)."""
    from ..builders.builtin import register_debian
    from ..builders.debian import DebianRecipe

    with errors_reported():
        m = manager()
        t0 = time.monotonic()
        with progress("building debian image") as p:
            img = register_debian(m.library, m.data.cache, name, p,
                                  DebianRecipe(suite=suite, size_gib=size_gib))
        if json_out:
            print_json(img.as_dict())
        else:
            out.print(f"[bold]{img.ref}[/] in {time.monotonic() - t0:.1f}s "
                      f"({human_size(img.size)} stored)", highlight=False)


@build_app.command("golden")
def build_golden_cmd(
    recipe: Annotated[Path, typer.Option("-f", "--file", help="Golden image recipe (YAML).")],
    json_out: JsonOpt = False,
) -> None:
    """Boot a base image, copy files, install units, run commands, seal; store the result."""
    import asyncio

    from ..builders.golden import build_golden, load_recipe

    with errors_reported():
        rec, base_dir = load_recipe(recipe)
        m = manager()
        t0 = time.monotonic()
        with progress(f"building {rec.name}") as p:
            imgs = asyncio.run(build_golden(m, rec, base_dir, p))
        if json_out:
            print_json([i.as_dict() for i in imgs])
        else:
            for img in imgs:
                out.print(f"[bold]{img.ref}[/] ({img.source}, {human_size(img.size)}) "
                          f"from {rec.base}", highlight=False)
            out.print(f"built in {time.monotonic() - t0:.1f}s")


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
def inspect_cmd(ref: ImageRef, json_out: JsonOpt = False) -> None:
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


@image_app.command("verify")
def verify_cmd(
    ref: Annotated[str | None, typer.Argument(help="NAME[:VERSION]; all images if omitted.",
                                              autocompletion=image_refs)
                   ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-hash stored files: each is ok, corrupt, missing or unreadable (exit 1 unless all ok)."""
    from ..errors import ImageError

    with errors_reported():
        lib = manager().library
        imgs = [lib.resolve(ref)] if ref else lib.all()
        with progress("verifying") as p:
            checks = lib.verify(imgs, p)
        if json_out:
            print_json([c.as_dict() for c in checks])
        else:
            for c in checks:
                colour = "green" if c.status == "ok" else "bold red"
                out.print(f"{c.ref:<24} {c.role:<8} {c.sha256[:12]}  [{colour}]{c.status}[/]",
                          highlight=False)
        bad = [c for c in checks if c.status != "ok"]
        if bad:
            names = ", ".join(f"{c.ref} {c.role} ({c.status})" for c in bad)
            raise ImageError(f"{len(bad)} of {len(checks)} stored file(s) damaged: {names}",
                             hint="pull, import or build those images again: storing the same "
                                  "content replaces a damaged file; until then they are refused")


@image_app.command("rm")
def rm_cmd(refs: Annotated[list[str], typer.Argument(help="NAME[:VERSION]",
                                                     autocompletion=image_refs)]) -> None:
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


@image_app.command("pull")
def pull_cmd(
    url: Annotated[str, typer.Argument(help="http(s) URL of a qcow2 or raw image.")],
    name: Annotated[str, typer.Option("--name", help="Library name.")],
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected sha256.")] = None,
    sha256sums: Annotated[str | None, typer.Option("--sha256sums",
                          help="URL of a SHA256SUMS file listing the image.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Download an image (resumable, verified before it enters the library)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    from ..images.fetch import pull
    from .common import err

    with errors_reported():
        if not sha256 and not sha256sums:
            err.print("[yellow]warning:[/] no --sha256/--sha256sums: the transfer must be "
                      "complete and its sha256 is recorded, but nothing vouches for the content")
        with Progress("[progress.description]{task.description}", BarColumn(),
                      DownloadColumn(), TransferSpeedColumn(), console=err,
                      transient=True) as bar:
            task = bar.add_task(f"pulling {name}", total=None)

            def update(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)
            img = pull(manager().library, url, name, sha256=sha256,
                       sha256sums_url=sha256sums, progress=update,
                       notice=lambda m: err.print(m, highlight=False))
        if json_out:
            print_json(img.as_dict())
        else:
            out.print(f"pulled [bold]{img.ref}[/] ({img.format}, sha256 "
                      f"{img.files['disk'][:12]})", highlight=False)


@image_app.command("extract-kernel")
def extract_kernel_cmd(ref: ImageRef, json_out: JsonOpt = False) -> None:
    """Store an image's kernel and initrd beside it, read from its disk (no boot, no mount)."""
    import tempfile

    from ..images.extract import attach_kernel

    with errors_reported():
        m = manager()
        img = m.library.resolve(ref)
        m.data.cache.mkdir(parents=True, exist_ok=True)
        with progress(f"extracting the kernel of {img.ref}"), \
                tempfile.TemporaryDirectory(dir=m.data.cache) as td:
            img = attach_kernel(m.library, img, Path(td))
        if json_out:
            print_json(img.as_dict())
        else:
            out.print(f"{img.ref}: kernel {img.files['kernel'][:12]}, initrd "
                      f"{img.files['initrd'][:12]}, cmdline {img.cmdline!r}", highlight=False)


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
