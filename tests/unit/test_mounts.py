"""Host folders in the guest (``spec.mounts``): the model, planning, QEMU argv and libvirt XML
(golden), the kernel command line tokens, the agent's side, ``launch --mount``."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmforge.agent import guest
from vmforge.errors import HostError, SpecError
from vmforge.hypervisors.base import Accel, Backend, Capabilities
from vmforge.hypervisors.libvirt import access
from vmforge.hypervisors.libvirt.render import domain_xml
from vmforge.hypervisors.plan import MachinePlan, MountPlan
from vmforge.hypervisors.qemu.render import qemu_argv
from vmforge.images.library import Image
from vmforge.node.plan import (
    Inputs,
    check_capabilities,
    check_inputs,
    machine_plan,
    mount_args,
    mount_tokens,
)
from vmforge.paths import VmPaths
from vmforge.spec import Firmware, Machine, VmRequest, load_request, parse_request

from ..fakes import fake_host
from ..golden import GOLDEN, check_golden

HOST = fake_host(tsc_khz=2600000)
MINIMAL = Image(id=1, name="minimal", version=1, kind="kernel", format=None,
                files={"kernel": "k", "vmlinux": "v", "initrd": "i"}, cmdline="console=ttyS0",
                parent_id=None, source=None, recipe={"agent": True}, size=0, virtual_size=None,
                created_at=0, paths={"kernel": Path("/lib/blobs/k"),
                                     "vmlinux": Path("/lib/blobs/v"),
                                     "initrd": Path("/lib/blobs/i")})
PATHS = VmPaths(Path("/data/vms/vm1"))
MOUNTS = [{"source": "/srv/project", "target": "/mnt/project"},
          {"source": "/srv/data,2024", "target": "/data", "readonly": True, "tag": "data",
           "security_model": "mapped-xattr"}]


def request(spec: dict[str, Any]) -> VmRequest:
    return parse_request({"name": "vm1", "spec": spec})


def spec_error(spec: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as exc:
        request(spec)
    return exc.value


def plan_for(spec: dict[str, Any]) -> MachinePlan:
    return machine_plan(request(spec), Inputs({}, MINIMAL), PATHS, HOST, Accel.TCG)


# -- the model

def test_mount_defaults_and_tags() -> None:
    req = request({"mounts": MOUNTS})
    a, b = req.spec.mounts
    assert (a.readonly, a.tag, a.security_model) == (False, None, "none")
    assert [m.tag_at(i) for i, m in enumerate(req.spec.mounts)] == ["vmforge0", "data"]
    assert request({}).spec.mounts == ()


@pytest.mark.parametrize(("target", "message"), [
    ("mnt/x", "absolute path"), ("/", "root directory"), ("/a/../b", "'..'"),
    ("/a\nb", "control characters")])
def test_bad_targets_name_the_field(target: str, message: str) -> None:
    err = spec_error({"mounts": [{"source": "/srv", "target": target}]})
    assert err.field == "spec.mounts[0].target"
    assert message in str(err)


def test_target_is_normalised() -> None:
    req = request({"mounts": [{"source": "/srv", "target": "/mnt//x/./y/"}]})
    assert req.spec.mounts[0].target == "/mnt/x/y"


def test_tags_and_targets_are_unique() -> None:
    err = spec_error({"mounts": [{"source": "/a", "target": "/a", "tag": "vmforge1"},
                                 {"source": "/b", "target": "/b"}]})
    assert err.field == "spec.mounts" and "vmforge1" in str(err) and "position" in str(err)
    err = spec_error({"mounts": [{"source": "/a", "target": "/x"},
                                 {"source": "/b", "target": "/x/"}]})
    assert err.field == "spec.mounts" and "target" in str(err) and "/x" in str(err)


@pytest.mark.parametrize(("mount", "field"), [
    ({"source": "/a", "target": "/a", "tag": "bad tag"}, "spec.mounts[0].tag"),
    ({"source": "/a", "target": "/a", "tag": "x" * 32}, "spec.mounts[0].tag"),
    ({"source": "/a", "target": "/a", "security_model": "passthrough"},
     "spec.mounts[0].security_model"),
    ({"source": "", "target": "/a"}, "spec.mounts[0].source"),
    ({"target": "/a"}, "spec.mounts[0].source"),
    ({"source": "/a", "target": "/a", "read_only": True}, "spec.mounts[0].read_only"),
])
def test_field_errors(mount: dict[str, Any], field: str) -> None:
    assert spec_error({"mounts": [mount]}).field == field


def test_sources_are_relative_to_the_spec_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "vm.yaml"
    spec.write_text("name: vm1\nspec:\n  mounts:\n"
                    "    - {source: ./src, target: /src}\n"
                    "    - {source: ~/notes, target: /notes}\n"
                    "    - {source: /abs, target: /abs}\n")
    sources = [m.source for m in load_request(spec).spec.mounts]
    assert sources == [str(tmp_path / "specs" / "src"), str(tmp_path / "home" / "notes"),
                       "/abs"]


# -- checks at create

class Lib:
    def find(self, ref: str) -> None:
        return None

    def check_intact(self, img: Image) -> None:
        pass


def test_source_must_be_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    for source, what in ((tmp_path / "missing", "does not exist"),
                         (tmp_path / "file", "is not a directory")):
        req = request({"mounts": [{"source": str(tmp_path / "dir"), "target": "/d"},
                                  {"source": str(source), "target": "/x"}]})
        with pytest.raises(SpecError, match=what) as exc:
            check_inputs(req, Lib())  # type: ignore[arg-type]
        assert exc.value.field == "spec.mounts[1].source"
    ok = request({"mounts": [{"source": str(tmp_path / "dir"), "target": "/d"}]})
    check_inputs(ok, Lib())  # type: ignore[arg-type]


def test_relative_source_from_the_api_is_refused() -> None:
    req = request({"mounts": [{"source": "rel/dir", "target": "/d"}]})
    with pytest.raises(SpecError, match="absolute") as exc:
        check_inputs(req, Lib())  # type: ignore[arg-type]
    assert exc.value.field == "spec.mounts[0].source"


def test_mounts_need_the_agent(tmp_path: Path) -> None:
    req = request({"agent": {"enabled": False},
                   "mounts": [{"source": str(tmp_path), "target": "/d"}]})
    with pytest.raises(SpecError, match="agent") as exc:
        check_inputs(req, Lib())  # type: ignore[arg-type]
    assert exc.value.field == "spec.mounts"


def test_capability_flag() -> None:
    caps = Capabilities(backend=Backend.FIRECRACKER, machines=frozenset({Machine.Q35}),
                        firmware=frozenset({Firmware.BIOS}),
                        disk_formats=frozenset(), cdroms=False, needs_kvm=False,
                        agent_transports=frozenset({"vsock"}), user_net_forwards=False,
                        mounts=False)
    req = request({"mounts": [{"source": "/a", "target": "/a"}]})
    with pytest.raises(SpecError, match="cannot share host folders") as exc:
        check_capabilities(req, caps)
    assert exc.value.field == "spec.mounts[0]"
    check_capabilities(request({}), caps)
    assert caps.to_json()["mounts"] is False
    assert replace(caps, mounts=True).to_json()["mounts"] is True


# -- the plan and the QEMU command line

def test_plan_and_agent_arguments() -> None:
    req = request({"kernel": {"image": "minimal"}, "mounts": MOUNTS})
    plan = machine_plan(req, Inputs({}, MINIMAL), PATHS, HOST, Accel.TCG)
    assert plan.mounts == (MountPlan("vmforge0", "/srv/project", "/mnt/project"),
                           MountPlan("data", "/srv/data,2024", "/data", True, "mapped-xattr"))
    assert mount_args(req) == [
        {"tag": "vmforge0", "target": "/mnt/project", "readonly": False},
        {"tag": "data", "target": "/data", "readonly": True}]
    assert plan.kernel is not None
    assert plan.kernel.cmdline.endswith(
        "vmforge.id=vm1 vmforge.mount=vmforge0:/mnt/project vmforge.mount=data:/data:ro")


def test_golden_argv_with_mounts() -> None:
    argv = qemu_argv(plan_for({"kernel": {"image": "minimal"}, "mounts": MOUNTS}), HOST)
    check_golden("argv-mounts.txt", "\n".join(argv) + "\n")
    assert "local,id=mount0,path=/srv/project,security_model=none" in argv
    # a comma in the path is doubled; read-only is QEMU's too, not only the guest's
    assert "local,id=mount1,path=/srv/data,,2024,security_model=mapped-xattr,readonly=on" \
        in argv
    assert "virtio-9p-pci,fsdev=mount0,mount_tag=vmforge0" in argv
    assert "virtio-9p-pci,fsdev=mount1,mount_tag=data" in argv


def test_microvm_mounts_on_mmio() -> None:
    argv = qemu_argv(plan_for({"machine": "microvm", "kernel": {"image": "minimal"},
                               "mounts": MOUNTS[:1]}), HOST)
    check_golden("argv-mounts-microvm.txt", "\n".join(argv) + "\n")
    assert "virtio-9p-device,fsdev=mount0,mount_tag=vmforge0" in argv


def test_no_mounts_no_9p() -> None:
    plan = plan_for({"kernel": {"image": "minimal"}})
    assert plan.mounts == ()
    argv = qemu_argv(plan, HOST)
    assert not any("9p" in a or "fsdev" in a for a in argv)
    assert plan.kernel is not None and "vmforge.mount=" not in plan.kernel.cmdline


def test_too_many_shares_for_the_command_line_are_left_to_the_agent_call() -> None:
    mounts = [{"source": f"/s{i}", "target": "/mnt/" + "x" * 200 + str(i)} for i in range(6)]
    req = request({"kernel": {"image": "minimal"}, "mounts": mounts})
    assert mount_tokens(req) == []
    assert len(mount_args(req)) == 6
    assert len(mount_tokens(request({"mounts": mounts[:4]}))) == 4


# -- libvirt

LIBVIRT_PLAN = replace(plan_for({"kernel": {"image": "minimal"}, "mounts": MOUNTS}),
                       name="vm1")


def test_golden_domain_with_mounts() -> None:
    xml = domain_xml(LIBVIRT_PLAN, HOST)
    check_golden("domain-mounts.xml", xml)
    assert "<filesystem type=\"mount\" accessmode=\"squash\">" in xml
    assert "<filesystem type=\"mount\" accessmode=\"mapped\">" in xml
    assert "<source dir=\"/srv/data,2024\" />" in xml and "<target dir=\"data\" />" in xml
    assert xml.count("<readonly />") == 1


@pytest.mark.subprocess
def test_domain_with_mounts_passes_virt_xml_validate() -> None:
    if not shutil.which("virt-xml-validate"):
        pytest.skip("virt-xml-validate not installed (apt-get install libvirt-clients)")
    path = GOLDEN / "domain-mounts.xml"
    if not path.exists():
        path.write_text(domain_xml(LIBVIRT_PLAN, HOST))
    res = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


QEMU_USER = access.Principal(64055, 64055, frozenset({64055}))


def test_mount_grants_search_above_and_refuse_closed_folders(tmp_path: Path) -> None:
    top = tmp_path / "home"
    share = top / "project"
    share.mkdir(parents=True)
    top.chmod(0o700)
    share.chmod(0o755)
    grants = access.mount_grants(QEMU_USER, [(share, True)])
    assert top in grants["x"] and not grants["r"] and not grants["rw"]
    with pytest.raises(HostError, match="cannot read and write") as exc:
        access.mount_grants(QEMU_USER, [(share, False)])
    assert "u:64055:rwX" in (exc.value.hint or "")
    share.chmod(0o700)
    with pytest.raises(HostError, match="cannot read the shared folder"):
        access.mount_grants(QEMU_USER, [(share, True)])
    share.chmod(0o777)
    assert access.mount_grants(QEMU_USER, [(share, False)])["x"] == grants["x"]


# -- the agent's side

@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1,
               max_size=40))
def test_command_line_tokens_round_trip(name: str) -> None:
    target = "/" + name
    token = guest.mount_token("vmforge0", target, readonly=len(name) % 2 == 0)
    assert " " not in token and "\n" not in token and token.count(":") <= 2
    parsed = guest.cmdline_mounts(f"console=ttyS0 {token} quiet")
    assert parsed == [{"tag": "vmforge0", "target": target, "readonly": len(name) % 2 == 0}]


def test_malformed_tokens_are_skipped() -> None:
    assert guest.cmdline_mounts("vmforge.mount=a vmforge.mount=:/x vmforge.mount=a:x "
                                "vmforge.mount=a:/x:rw vmforge.mount=a:/x:ro:y") == []


MOUNTINFO = ("22 1 0:20 / / rw shared:1 - rootfs rootfs rw\n"
             "40 22 0:35 / /mnt/my\\040project rw,relatime - 9p vmforge0 rw,access=client\n"
             "41 22 0:36 / /data ro,relatime - 9p data ro\n")


def test_mounted_shares_are_read_from_mountinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    real = guest.read_text
    monkeypatch.setattr(guest, "read_text", lambda path, default="": MOUNTINFO
                        if path == "/proc/self/mountinfo" else real(path, default))
    assert guest.mounted_9p() == {"/mnt/my project": "vmforge0", "/data": "data"}
    # already there: nothing is loaded or run
    monkeypatch.setattr(guest, "_run_quiet", lambda argv: pytest.fail(f"ran {argv}"))
    assert guest.mount_shares([{"tag": "vmforge0", "target": "/mnt/my project"},
                               {"tag": "data", "target": "/data", "readonly": True}]) == [
        {"tag": "vmforge0", "target": "/mnt/my project", "readonly": False,
         "status": "already"},
        {"tag": "data", "target": "/data", "readonly": True, "status": "already"}]


def test_every_share_is_tried_and_failures_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "mounted_9p", lambda: {"/ok": "good"})
    with pytest.raises(guest.MountError) as exc:
        guest.mount_shares([{"tag": "bad tag", "target": "/x"},
                            {"tag": "good", "target": "/ok"},
                            {"tag": "t", "target": "relative"}])
    assert "bad mount tag 'bad tag'" in str(exc.value)
    assert "absolute path: 'relative'" in str(exc.value)


def test_a_kernel_without_9p_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"/proc/filesystems": "nodev\tproc\n", guest.MINIMAL_9P_MODULES: ""}
    monkeypatch.setattr(guest, "read_text", lambda path, default="": files.get(path, default))
    monkeypatch.setattr(guest, "_run_quiet", lambda argv: (
        1, "modprobe: FATAL: Module 9pnet_virtio not found"))
    with pytest.raises(guest.MountError,
                       match=r"has no 9p file system .*linux-image-amd64.*: modprobe: FATAL"):
        guest.load_9p()


# -- launch --mount

def test_launch_mount_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmforge.cli.launch import parse_mount_flag
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    src = str(tmp_path / "src")
    assert parse_mount_flag("src:/mnt/src") == {"source": src, "target": "/mnt/src",
                                                "readonly": False}
    assert parse_mount_flag("./src:/mnt/src:ro")["readonly"] is True
    assert parse_mount_flag(f"{src}:/m:rw") == {"source": src, "target": "/m",
                                                "readonly": False}
    assert parse_mount_flag("src") == {"source": src, "target": src, "readonly": False}
    assert parse_mount_flag("src:ro") == {"source": src, "target": src, "readonly": True}
    for bad in ("missing:/m", ":/m"):
        with pytest.raises(SpecError) as exc:
            parse_mount_flag(bad)
        assert exc.value.field == "--mount"


def test_launch_request_carries_mounts(tmp_path: Path) -> None:
    from vmforge.cli.launch import launch_request

    class M:
        class library:  # noqa: N801 - a stand-in namespace
            @staticmethod
            def resolve(ref: str, field: str) -> Image:
                return MINIMAL

        class data:  # noqa: N801
            cache = tmp_path

    data = launch_request(M(), "base:1", name="vm1", cpus=1,  # type: ignore[arg-type]
                          memory="256M", disk=None, cloud_init=None, forwards=[],
                          mounts=[f"{tmp_path}:/host:ro"], sha256=None, report=print)
    req = parse_request(data)
    assert req.spec.mounts[0].source == str(tmp_path)
    assert req.spec.mounts[0].readonly and req.spec.mounts[0].target == "/host"


def test_minimal_image_carries_the_9p_modules() -> None:
    from vmforge.builders.minimal import MinimalRecipe
    assert set(MinimalRecipe().mount_modules) == {"9pnet_virtio", "9p"}
    assert not set(MinimalRecipe().mount_modules) & set(MinimalRecipe().modules)


def test_agent_advertises_mount() -> None:
    assert "mount" in guest.FEATURES
    assert os.path.basename(guest.MINIMAL_9P_MODULES) == "modules.9p"
