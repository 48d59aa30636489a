"""Golden images: boot a base image with the agent, customise it, seal it, keep the result.

Customising (files, systemd units, commands) goes through the guest agent, so it works
wherever QEMU works (no libguestfs, no loop mounts). Sealing runs ``cloud-init clean --logs
--machine-id``, removes SSH host keys and trims. Outputs, as the field does them: a flattened,
compressed qcow2 (no backing file) and/or a layered qcow2 whose backing file is the base's
stored (read-only, content-addressed) file. Lineage is recorded; the base is never written.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from ..agent.client import AgentClient
from ..errors import BuildError, SpecError, VmforgeError
from ..events import Progress, Say, adapt, no_progress
from ..images import qcow2
from ..images.library import Image, Library
from ..spec import read_document, spec_error_from

if TYPE_CHECKING:
    from ..node.manager import VmManager

__all__ = ["GoldenRecipe", "load_recipe", "build_golden"]


# "uninitialized" (not a missing file) is systemd's mark for a golden image: the next boot
# generates the machine-id and counts as a first boot (ConditionFirstBoot).
SEAL = ("cloud-init clean --logs --machine-id; "
        "test -s /etc/machine-id || printf 'uninitialized\\n' > /etc/machine-id; "
        "rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*; rm -rf /tmp/* /var/tmp/*; "
        "fstrim -av >/dev/null 2>&1 || true; sync")


def _octal(value: Any) -> Any:
    """Modes as YAML writes them: 0755 (an int already), "0755" or "0o755"."""
    if isinstance(value, str):
        return int(value.removeprefix("0o"), 8)
    return value


class FileSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    src: str
    dest: str
    mode: Annotated[int | None, BeforeValidator(_octal)] = None
    owner: str | None = None


class UnitSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9@._-]+\.(service|timer|socket|target|path)$")
    content: str | None = None
    src: str | None = None
    enable: bool = True

    @model_validator(mode="after")
    def _one(self) -> UnitSpec:
        if bool(self.content) == bool(self.src):
            raise ValueError("give exactly one of content or src")
        return self


class GoldenRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
    base: str
    resize_gib: float | None = Field(default=None, gt=0)
    cpu_cores: int = Field(default=2, ge=1)
    memory_mib: int = Field(default=1024, ge=256)
    files: tuple[FileSpec, ...] = ()
    units: tuple[UnitSpec, ...] = ()
    run: tuple[tuple[str, ...], ...] = ()
    output: str = Field(default="flat", pattern="^(flat|layered|both)$")
    compress: bool = True
    step_timeout_s: float = Field(default=600, gt=0)


def load_recipe(path: str | Path) -> tuple[GoldenRecipe, Path]:
    p = Path(path)
    data = read_document(p, "recipe")
    try:
        return GoldenRecipe.model_validate(data), p.resolve().parent
    except ValidationError as exc:
        raise spec_error_from(exc, str(p)) from None


async def _customise(sock: str, recipe: GoldenRecipe, base_dir: Path, out: Path,
                     progress: Say) -> None:
    async with AgentClient(sock) as c:
        await c.wait_ready(120)

        async def sh(cmd: str, what: str) -> str:
            res = await c.exec(["sh", "-c", cmd], timeout=recipe.step_timeout_s)
            text = (res.stdout + res.stderr).decode(errors="replace")
            if res.exit_code != 0:
                raise BuildError(f"golden build step failed: {what} (exit {res.exit_code}, "
                                 f"signal {res.signal})\n{text[-3000:]}")
            return text

        progress("waiting for first-boot cloud-init")
        await sh("cloud-init status --wait >/dev/null 2>&1; true", "cloud-init status --wait")
        for f in recipe.files:
            src = Path(f.src) if Path(f.src).is_absolute() else base_dir / f.src
            if not src.exists():
                raise SpecError(f"file not found: {src}", field="files.src")
            progress(f"copying {f.src} -> {f.dest}")
            if src.is_dir():
                await c.put_tree(src, f.dest)
            else:
                await c.put_file(src, f.dest, mode=f.mode, owner=f.owner)
        for u in recipe.units:
            progress(f"installing unit {u.name}")
            if u.src:
                src = Path(u.src) if Path(u.src).is_absolute() else base_dir / u.src
                content = src.read_bytes()
            else:
                content = (u.content or "").encode()
            with tempfile.NamedTemporaryFile() as tmp:
                tmp.write(content)
                tmp.flush()
                await c.put_file(tmp.name, f"/etc/systemd/system/{u.name}", mode=0o644)
            await sh("systemctl daemon-reload", "systemctl daemon-reload")
            if u.enable:
                await sh(f"systemctl enable {u.name}", f"systemctl enable {u.name}")
        for argv in recipe.run:
            progress("running " + " ".join(argv))
            res = await c.exec(list(argv), timeout=recipe.step_timeout_s)
            if res.exit_code != 0:
                text = (res.stdout + res.stderr).decode(errors="replace")
                raise BuildError(f"golden build command failed: {' '.join(argv)} "
                                 f"(exit {res.exit_code})\n{text[-3000:]}")
        progress("taking out the kernel and initrd")
        release = (await sh("uname -r", "uname -r")).strip()
        await c.get_file(f"/boot/vmlinuz-{release}", out / "vmlinuz")
        await c.get_file(f"/boot/initrd.img-{release}", out / "initrd.img")
        progress("sealing: cloud-init clean, machine-id, SSH host keys, trim")
        await sh(SEAL, "seal")
        await c.shutdown()


async def _powered_off(manager: VmManager, name: str, timeout: float) -> bool:
    from ..node.states import VmState
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if manager.get(name).state is not VmState.RUNNING:
            return True
        await asyncio.sleep(0.1)
    return False


async def build_golden(manager: VmManager, recipe: GoldenRecipe, base_dir: Path,
                       events: Progress = no_progress) -> list[Image]:
    """Build the recipe; returns the new library image(s). The build VM is always removed."""
    from ..spec import parse_request

    progress = adapt(events, recipe.name, "build")
    library: Library = manager.library
    base = library.resolve(recipe.base, "base")
    if base.path("disk") is None:
        raise SpecError(f"{base.ref} has no disk", field="base")
    vm_name = f"golden-build-{secrets.token_hex(4)}"
    req = parse_request({"name": vm_name, "spec": {
        "cpu_cores": recipe.cpu_cores, "memory_mib": recipe.memory_mib,
        "disks": [{"id": "root", "bootable": True, "image": base.ref,
                   **({"size_gib": recipe.resize_gib} if recipe.resize_gib else {})}],
        # An empty config: nothing of the build VM (users, keys) may end up in the image.
        "cloud_init": {"user_data": "#cloud-config\n{}\n"}}})
    work = Path(tempfile.mkdtemp(prefix="golden-", dir=manager.data.cache))
    images: list[Image] = []
    try:
        progress(f"booting {base.ref} as {vm_name}")
        rec = await manager.run(req, timeout=600, progress=events)
        await _customise(rec.agent_endpoint, recipe, base_dir, work, progress)
        if not await _powered_off(manager, vm_name, 120):
            raise BuildError("the build VM did not power off after sealing")
        overlay = rec.paths.disk("root")
        common: dict[str, Any] = {
            "kind": "disk", "format": "qcow2", "cmdline": base.cmdline, "parent": base,
            "recipe": {**recipe.model_dump(mode="json"), "builder": "golden", "agent": True,
                       "base": base.ref}}
        kernel_files = {"kernel": work / "vmlinuz", "initrd": work / "initrd.img"}
        if recipe.output in ("layered", "both"):
            progress("storing the layered image (backing: the base's stored file)")
            info = qcow2.image_info(overlay)
            name = recipe.name if recipe.output == "layered" else f"{recipe.name}-layered"
            images.append(library.add(
                name, {"disk": overlay, **kernel_files}, source=f"golden:{base.ref}:layered",
                virtual_size=info.virtual_size, **common))
        if recipe.output in ("flat", "both"):
            progress("flattening" + (" and compressing" if recipe.compress else ""))
            flat = qcow2.convert(overlay, work / "flat.qcow2", compress=recipe.compress)
            info = qcow2.image_info(flat)
            images.insert(0, library.add(
                recipe.name, {"disk": flat, **kernel_files}, source=f"golden:{base.ref}:flat",
                virtual_size=info.virtual_size, move=True, **common))
        return images
    except VmforgeError:
        for img in images:  # all outputs or none
            try:
                library.remove(img.ref)
            except VmforgeError:
                pass
        raise
    finally:
        try:
            await manager.delete(vm_name, force=True, stop_timeout=0)
        except VmforgeError:
            pass
        shutil.rmtree(work, ignore_errors=True)
        os.sync()
