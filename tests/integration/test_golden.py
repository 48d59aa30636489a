"""Golden images from the real Debian image: a daemon and its unit baked in, sealed, both
outputs (flattened+compressed and layered) booted and health-checked; the base untouched."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from vmforge.builders.golden import build_golden, load_recipe
from vmforge.errors import ImageError
from vmforge.images import qcow2

from .conftest import VmHelper

pytestmark = [pytest.mark.vm, pytest.mark.subprocess]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_golden_flat_and_layered(vms: VmHelper, debian_image: str, repo_root: Path) -> None:
    lib = vms.manager.library
    base = lib.resolve(debian_image)
    base_disk = base.path("disk")
    assert base_disk is not None
    before = sha256(base_disk)
    recipe, base_dir = load_recipe(repo_root / "examples/golden/recipe.yaml")
    recipe = recipe.model_copy(update={"base": debian_image, "name": "gold"})
    flat, layered = asyncio.run(build_golden(vms.manager, recipe, base_dir))
    assert (flat.ref, layered.ref) == ("gold:1", "gold-layered:1")
    assert sha256(base_disk) == before  # the base is unchanged
    assert lib.lineage(flat) == [base.ref] and lib.lineage(layered) == [base.ref]
    assert [v for v in vms.manager.vms()] == []  # the build VM is gone

    flat_info = qcow2.image_info(flat.path("disk"))  # type: ignore[arg-type]
    assert flat_info.backing_file is None
    lay_info = qcow2.image_info(layered.path("disk"))  # type: ignore[arg-type]
    assert lay_info.backing_file == str(base_disk)
    assert flat.size < base.size  # compressed

    for name, ref in (("from-flat", flat.ref), ("from-layered", layered.ref)):
        vms.run(name, kernel=None, memory_mib=1024, cpu_cores=2,
                disks=[{"id": "root", "bootable": True, "image": ref}],
                health_checks=[{"http_get": "http://127.0.0.1:2280/health"}],
                provision=[{"wait_health": True, "timeout_s": 180}])
        health = vms.call(name, lambda c: c.health(
            [{"http_get": "http://127.0.0.1:2280/health"}]))
        assert health["healthy"], health
        res = vms.call(name, lambda c: c.exec(["sh", "-c",
                       "cat /etc/golden-release; systemctl is-enabled healthd; "
                       "cloud-init status --wait >/dev/null; ls /etc/ssh/ | grep -c host"]))
        lines = res.stdout.decode().split()
        assert lines[:2] == ["built-by-vmforge", "enabled"]
        assert int(lines[2]) > 0  # fresh host keys made at this VM's first boot

    # Sealed: no machine-id and no SSH host keys inside the stored image itself.
    assert_sealed(flat.path("disk"), vms)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="in use"):
        lib.remove(base.ref)


def assert_sealed(disk: Path, vms: VmHelper) -> None:
    from vmforge.images.extract import ext_filesystems, list_dir, read_file
    with ext_filesystems(disk, "qcow2") as filesystems:
        roots = [fs for _uuid, fs in filesystems if "etc" in list_dir(fs, "/")]
        assert len(roots) == 1
        mid = read_file(roots[0], "/etc/machine-id")
        keys = list_dir(roots[0], "/etc/ssh")
    assert mid == b"uninitialized\n"  # no machine-id: the next boot makes one
    assert not [k for k in keys if k.startswith("ssh_host_")] and "sshd_config" in keys
