"""Host folders in real guests (virtio-9p, mounted by the guest agent): the minimal image
read-write and read-only, ``vmforge launch --mount``, and a cloud image."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmforge.agent.client import AgentClient
from vmforge.errors import RemoteError
from vmforge.hypervisors.libvirt.driver import is_system
from vmforge.node.manager import VmManager
from vmforge.paths import DataDir

from .conftest import VmHelper

pytestmark = pytest.mark.vm


def sh(vms: VmHelper, name: str, script: str) -> tuple[int | None, str]:
    async def go(c: AgentClient) -> tuple[int | None, str]:
        res = await c.exec(["sh", "-c", script], timeout=60)
        return res.exit_code, (res.stdout + res.stderr).decode(errors="replace")
    return vms.call(name, go)


def test_minimal_read_write_and_read_only(vms: VmHelper, tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro dir"
    rw.mkdir()
    ro.mkdir()
    (rw / "from-host.txt").write_text("written on the host\n")
    (ro / "fixed.txt").write_text("read me\n")
    vms.run("mnt", mounts=[{"source": str(rw), "target": "/mnt/rw"},
                           {"source": str(ro), "target": "/srv/read only", "readonly": True}])

    # ready means mounted: both shares are there, 9p, the read-only one mounted ro
    code, out = sh(vms, "mnt", "cat /proc/mounts")
    lines = [ln.split() for ln in out.splitlines() if " 9p " in ln]
    assert {(ln[0], ln[1]) for ln in lines} == {("vmforge0", "/mnt/rw"),
                                               ("vmforge1", "/srv/read\\040only")}, out
    assert next(ln for ln in lines if ln[0] == "vmforge1")[3].split(",")[0] == "ro"

    # host -> guest, also for a file written after the boot (no caching in the guest)
    assert sh(vms, "mnt", "cat /mnt/rw/from-host.txt") == (0, "written on the host\n")
    (rw / "later.txt").write_text("later\n")
    assert sh(vms, "mnt", "cat /mnt/rw/later.txt") == (0, "later\n")
    # guest -> host: a new file, a directory, an append
    code, out = sh(vms, "mnt", "mkdir /mnt/rw/made && echo from the guest > /mnt/rw/made/f "
                               "&& echo more >> /mnt/rw/from-host.txt")
    assert code == 0, out
    assert (rw / "made" / "f").read_text() == "from the guest\n"
    assert (rw / "from-host.txt").read_text() == "written on the host\nmore\n"
    # a guest delete reaches the host
    assert sh(vms, "mnt", "rm /mnt/rw/later.txt")[0] == 0
    assert not (rw / "later.txt").exists()

    # read-only: readable, every kind of write refused, nothing reaches the host
    assert sh(vms, "mnt", "cat '/srv/read only/fixed.txt'") == (0, "read me\n")
    for write in ("echo x > '/srv/read only/new'", "echo x >> '/srv/read only/fixed.txt'",
                  "mkdir '/srv/read only/d'", "rm '/srv/read only/fixed.txt'"):
        code, out = sh(vms, "mnt", write)
        assert code != 0 and "Read-only file system" in out, (write, out)
    assert sorted(p.name for p in ro.iterdir()) == ["fixed.txt"]
    assert (ro / "fixed.txt").read_text() == "read me\n"
    # ... and QEMU refuses writes too, even if the guest remounts it read-write
    code, out = sh(vms, "mnt", "mount -o remount,rw '/srv/read only' && "
                               "echo x > '/srv/read only/new'")
    assert code != 0, out
    assert not (ro / "new").exists()

    # the host's mount call (made after every hello) is idempotent and mounts what is missing
    assert sh(vms, "mnt", "umount /mnt/rw && ls /mnt/rw")[1] == ""

    async def remount(c: AgentClient) -> list[list[dict[str, object]]]:
        args = [{"tag": "vmforge0", "target": "/mnt/rw", "readonly": False}]
        return [await c.mount(args), await c.mount(args)]
    first, again = vms.call("mnt", remount)
    assert first[0]["status"] == "mounted" and again[0]["status"] == "already"
    assert sh(vms, "mnt", "cat /mnt/rw/made/f") == (0, "from the guest\n")

    async def unknown_tag(c: AgentClient) -> None:
        await c.mount([{"tag": "nope", "target": "/mnt/nope"}])
    with pytest.raises(RemoteError, match="no shared folder with tag nope.*vmforge0"):
        vms.call("mnt", unknown_tag)

    # a reboot of the guest's own: its agent mounts them again from the kernel command line,
    # with no call from the host
    async def reboot(c: AgentClient) -> str:
        await c.reboot()
        await c.wait_ready(120)
        res = await c.exec(["cat", "/proc/mounts"], timeout=30)
        return res.stdout.decode()
    mounts = vms.call("mnt", reboot)
    assert "vmforge0 /mnt/rw 9p rw," in mounts and "vmforge1 /srv/read\\040only 9p ro," in mounts
    assert sh(vms, "mnt", "cat /mnt/rw/made/f") == (0, "from the guest\n")


def test_libvirt_mount(vms: VmHelper, libvirt_uri: str, tmp_path: Path) -> None:
    """The same shares under libvirt (``accessmode='squash'``). On qemu:///system QEMU runs as
    libvirt-qemu, and vmforge does not change a share's permissions: the test opens it."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "in.txt").write_text("via libvirt\n")
    tmp_path.chmod(0o711)
    share.chmod(0o777)
    vms.run("lv-mnt", hypervisor="libvirt",
            mounts=[{"source": str(share), "target": "/mnt/share"},
                    {"source": str(share), "target": "/mnt/ro", "readonly": True}])
    code, out = sh(vms, "lv-mnt", "cat /mnt/share/in.txt && echo back > /mnt/share/out.txt && "
                                  "! touch /mnt/ro/x")
    assert code == 0, out
    assert out.startswith("via libvirt\n")
    assert (share / "out.txt").read_text() == "back\n"
    assert not (share / "x").exists()
    if is_system(libvirt_uri):  # security_model none: the guest's files are QEMU's user's
        import pwd
        owner = pwd.getpwuid((share / "out.txt").stat().st_uid).pw_name
        assert owner == "libvirt-qemu"


def vf(data: DataDir, *args: str, cwd: Path | None = None,
       timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMFORGE_HOME=str(data.root), NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "vmforge", *args], env=env, text=True,
                          capture_output=True, timeout=timeout, cwd=cwd)


@pytest.mark.subprocess
def test_launch_mount(vm_data: DataDir, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello from the host\n")
    try:
        res = vf(vm_data, "launch", "minimal", "--name", "l-mnt", "--memory", "256M",
                 "--mount", "./src:/mnt/src:ro", "--mount", "src:/mnt/w", "--json",
                 cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        spec = json.loads(vf(vm_data, "inspect", "l-mnt", "--json").stdout)["spec"]
        assert [(m["source"], m["target"], m["readonly"]) for m in spec["mounts"]] == [
            (str(tmp_path / "src"), "/mnt/src", True), (str(tmp_path / "src"), "/mnt/w", False)]
        res = vf(vm_data, "exec", "l-mnt", "--", "sh", "-c",
                 "cat /mnt/src/a.txt && echo written > /mnt/w/b.txt && "
                 "! touch /mnt/src/c 2>/dev/null")
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout == "hello from the host\n"
        assert (tmp_path / "src" / "b.txt").read_text() == "written\n"
        assert not (tmp_path / "src" / "c").exists()
    finally:
        vf(vm_data, "rm", "-f", "l-mnt")
    res = vf(vm_data, "launch", "minimal", "--name", "l-mnt", "--mount",
             str(tmp_path / "missing") + ":/m")
    assert res.returncode == 2 and "--mount" in res.stderr, res.stderr
    assert not (vm_data.vms / "l-mnt").exists()


@pytest.fixture(scope="session")
def debian_9p_image(vm_data: DataDir, debian_image: str) -> str:
    """A cloud image whose kernel has 9p. Debian's cloud kernel (linux-image-cloud-amd64) is
    built without it (CONFIG_NET_9P is not set), so while the builtin image uses that kernel
    this is the same recipe with the generic one (built once, cached by recipe)."""
    from vmforge.builders.builtin import register_debian
    from vmforge.builders.debian import PACKAGES, DebianRecipe

    m = VmManager(vm_data)
    try:
        img = m.library.resolve(debian_image, "debian_image")
        if "-cloud-" not in str((img.recipe or {}).get("kernel", "")):
            return debian_image
        packages = tuple("linux-image-amd64" if p == "linux-image-cloud-amd64" else p
                         for p in PACKAGES)
        return str(register_debian(m.library, vm_data.cache, "debian-9p",
                                   recipe=DebianRecipe(packages=packages)).ref)
    finally:
        m.close()


def test_cloud_image_sees_its_mount(vms: VmHelper, debian_9p_image: str,
                                    tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("host to cloud guest\n")
    req = vms.request("cloud-mnt", kernel=None, memory_mib=1024, cpu_cores=2,
                      disks=[{"id": "root", "bootable": True, "image": debian_9p_image}],
                      mounts=[{"source": str(tmp_path), "target": "/srv/host"}])
    vms.names.append("cloud-mnt")
    asyncio.run(vms.manager.run(req, timeout=600))
    code, out = sh(vms, "cloud-mnt", "cat /srv/host/in.txt && id -un > /srv/host/out.txt && "
                                     "grep ' /srv/host 9p ' /proc/mounts")
    assert code == 0, out
    assert out.startswith("host to cloud guest\n") and "vmforge0 /srv/host 9p" in out
    assert (tmp_path / "out.txt").read_text() == "root\n"
