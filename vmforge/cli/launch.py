"""`vmforge launch` (a VM from flags, as `multipass launch` does), `info`, and the aliases
people coming from Multipass and Lima type (`list`, `delete`, `transfer`).

The spec `launch` builds is an ordinary request: it is stored with the VM, so `inspect` shows
it and `vmforge plan`/`run -f` can take it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import err, errors_reported, manager, out, print_json, progress
from .complete import VmNames

if TYPE_CHECKING:
    from ..node.manager import VmManager

__all__ = ["register_launch", "launch_request", "parse_mount_flag"]


def parse_mount_flag(item: str) -> dict[str, Any]:
    """``--mount SRC[:DST][:ro|:rw]`` as a spec mount: SRC is relative to the current
    directory; DST (absolute, in the guest) defaults to SRC's absolute path."""
    from ..errors import SpecError

    text, readonly = item, False
    for suffix, ro in ((":ro", True), (":rw", False)):
        if text.endswith(suffix):
            text, readonly = text[:-len(suffix)], ro
            break
    src, sep, dst = text.rpartition(":/")
    if sep:
        dst = "/" + dst
    else:
        src, dst = text, ""
    if not src:
        raise SpecError(f"--mount {item!r} is not SRC[:DST][:ro]", field="--mount",
                        hint="e.g. --mount ./src:/mnt/src:ro")
    source = Path(src).expanduser().resolve()
    if not source.is_dir():
        raise SpecError(f"--mount {item!r}: {source} is not a host directory",
                        field="--mount", hint="give an existing directory")
    return {"source": str(source), "target": dst or str(source), "readonly": readonly}


def _image_source(m: VmManager, image: str, name: str, sha256: str | None,
                  report: Any) -> dict[str, Any]:
    """IMAGE as a disk or kernel source: a library reference, a local file, or a URL pulled
    (and verified) into the library on the way."""
    from ..builders.builtin import BUILTIN, ensure_builtin
    from ..errors import SpecError
    from ..images.library import REF_RE

    if image.startswith(("http://", "https://")):
        from ..images.fetch import pull
        ref_name = Path(image.split("?")[0]).name.split(".")[0] or "image"
        ref_name = "".join(c if c.isalnum() or c in "._-" else "-" for c in ref_name)[:63]
        img = pull(m.library, image, ref_name, sha256=sha256,
                   progress=lambda done, total: report(
                       f"pulling {image}: {done / 2**20:.0f}"
                       + (f"/{total / 2**20:.0f}" if total else "") + " MiB"))
        image = img.ref
    elif Path(image).exists() or "/" in image:
        path = Path(image).resolve()
        if not path.is_file():
            raise SpecError(f"no such image file: {image}", field="IMAGE",
                            hint="give a library reference (vmforge image ls), a file or a URL")
        return {"disks": [{"id": "root", "bootable": True, "backing_file": str(path)}]}
    if not REF_RE.fullmatch(image):
        raise SpecError(f"{image!r} is neither an image reference, a file nor a URL",
                        field="IMAGE", hint="see `vmforge image ls`")
    if image.split(":")[0] in BUILTIN:
        ensure_builtin(m.library, m.data.cache, image, report)
    img = m.library.resolve(image, "IMAGE")
    if img.path("disk") is None:
        return {"kernel": {"image": img.ref}}
    return {"disks": [{"id": "root", "bootable": True, "image": img.ref}]}


def launch_request(m: VmManager, image: str, *, name: str | None, cpus: int, memory: str,
                   disk: str | None, cloud_init: Path | None, forwards: list[str],
                   mounts: list[str], sha256: str | None, report: Any) -> dict[str, Any]:
    """The request `launch` runs, from its flags."""
    import secrets

    from ..errors import SpecError
    from ..spec import PortForward

    spec: dict[str, Any] = {"cpu_cores": cpus, "memory_mib": memory,
                            **_image_source(m, image, name or "", sha256, report)}
    if disk:
        if "disks" not in spec:
            raise SpecError(f"--disk: {image} boots a kernel with no disk to grow",
                            field="--disk", hint="leave --disk out for kernel images")
        spec["disks"][0]["size_gib"] = disk
    if cloud_init is not None:
        try:
            spec["cloud_init"] = {"user_data": cloud_init.read_text()}
        except OSError as exc:
            raise SpecError(f"cannot read {cloud_init}: {exc.strerror}",
                            field="--cloud-init") from None
    fws = []
    for item in forwards:
        host, sep, guest = item.partition(":")
        if not sep or not host.isdigit() or not guest.isdigit():
            raise SpecError(f"--forward {item!r} is not HOST_PORT:GUEST_PORT",
                            field="--forward", hint="e.g. --forward 8080:80")
        fws.append(PortForward(host_port=int(host), guest_port=int(guest)).model_dump())
    if fws:
        spec["nics"] = [{"id": "net0", "forwards": fws}]
    if mounts:
        spec["mounts"] = [parse_mount_flag(item) for item in mounts]
    base = image.rsplit("/", 1)[-1].split(":")[0].split(".")[0]
    vm_name = name or f"{base}-{secrets.token_hex(2)}"
    return {"name": vm_name, "spec": spec}


def register_launch(app: typer.Typer) -> None:
    from . import main as cli

    @app.command()
    def launch(
        image: Annotated[str, typer.Argument(
            help="A library image (minimal, debian, base:3), a disk file, or a URL.")]
        = "minimal",
        name: Annotated[str | None, typer.Option("--name", "-n", help="VM name.")] = None,
        cpus: Annotated[int, typer.Option("--cpus", "-c", help="vCPUs.")] = 1,
        memory: Annotated[str, typer.Option("--memory", "-m", help="Memory (512M, 4G).")]
        = "1G",
        disk: Annotated[str | None, typer.Option("--disk", "-d",
                        help="Root disk size (20G); grows the image's disk.")] = None,
        cloud_init: Annotated[Path | None, typer.Option("--cloud-init",
                              help="user-data file (#cloud-config ...).")] = None,
        forward: Annotated[list[str] | None, typer.Option(
            "--forward", "-p", help="HOST_PORT:GUEST_PORT (repeatable).")] = None,
        mount: Annotated[list[str] | None, typer.Option(
            "--mount", help="Share a host folder: SRC[:DST][:ro] (repeatable).")] = None,
        sha256: Annotated[str | None, typer.Option(help="Checksum of an IMAGE URL.")] = None,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for ready.")] = 900,
        json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
        = False,
    ) -> None:
        """Create and start a VM from flags, no spec file needed; wait until it is ready."""
        import asyncio

        from ..spec import parse_request
        with errors_reported():
            m = manager()
            with progress("launching") as p:
                data = launch_request(m, image, name=name, cpus=cpus, memory=memory,
                                      disk=disk, cloud_init=cloud_init,
                                      forwards=forward or [], mounts=mount or [],
                                      sha256=sha256, report=p)
                req = parse_request(data, "launch")
                rec = asyncio.run(m.run(req, timeout=timeout, progress=p))
            if json_out:
                print_json(rec.as_dict())
                return
            out.print(f"[bold green]{rec.name}[/] is ready in "
                      f"[bold]{rec.boot_seconds or 0:.2f}s[/] · {rec.backend.value} · "
                      f"accel {rec.accel}", highlight=False)

    @app.command()
    def info(
        names: VmNames,
        fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    ) -> None:
        """State, addresses, image, release and resources (as `multipass info`)."""
        with errors_reported():
            m = manager()
            data = {n: _info(m, n) for n in names}
            if fmt == "json":
                print_json({"errors": [], "info": data})
                return
            for n, d in data.items():
                for key in ("name", "state", "ipv4", "image", "release", "cpu_count",
                            "memory_mib", "backend", "accel"):
                    value = d.get(key)
                    if isinstance(value, list):
                        value = ", ".join(value) or "-"
                    out.print(f"[bold]{key:>11}[/]: {value if value is not None else '-'}",
                              highlight=False)
                if n != names[-1]:
                    out.print()

    # Aliases: the same commands under the names other tools use.
    app.command("list", help="List VMs (alias of ls).")(cli.ls_cmd)
    app.command("delete", help="Delete VM(s) (alias of rm).")(cli.rm_cmd)
    app.command("transfer", help="Copy files (alias of cp).")(cli.cp)


def _info(m: VmManager, name: str) -> dict[str, Any]:
    import asyncio

    rec = m.get(name)
    d = rec.as_dict()
    spec = rec.stored.get("spec", {})
    images = [r["role"] + "=" + m.library.get(r["image_id"]).ref for r in m.db.query(
        "SELECT role, image_id FROM vm_images WHERE vm_name=?", (name,))]
    info: dict[str, Any] = {"name": name, "state": rec.state.value,
                            "ipv4": d.get("ipv4", []), "image": ", ".join(images) or None,
                            "release": None, "cpu_count": spec.get("cpu_cores"),
                            "memory_mib": spec.get("memory_mib"),
                            "backend": rec.backend.value, "accel": rec.accel}
    if rec.state.value == "running" and spec.get("agent", {}).get("enabled", True):
        async def release() -> str | None:
            async with m.agent(name) as c:
                res = await c.exec(["sh", "-c", "if [ -r /etc/os-release ]; then "
                                    ". /etc/os-release; echo \"$PRETTY_NAME\"; "
                                    "else uname -sr; fi"], timeout=10)
                return res.stdout.decode(errors="replace").strip() or None
        try:
            info["release"] = asyncio.run(release())
        except Exception as exc:  # noqa: BLE001 - info shows what it can
            err.print(f"[yellow]{name}: no release from the agent ({exc})[/]")
    return info
