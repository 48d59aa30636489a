"""A real cloud image built from Debian packages: debootstrap + cloud-init (NoCloud).

Cloud images cannot be downloaded everywhere, so vmforge can make one that behaves like a
stock image: systemd, cloud-init with the NoCloud datasource, openssh-server, python3, the
cloud kernel. The root filesystem is made without mounting anything (``mkfs.ext4 -d``) and
placed in a partition at 1 MiB behind an MBR holding GRUB (``grub-mkimage``'s core.img in the
gap), so the disk boots by itself like a stock image. Its kernel and initrd are also stored
beside it in the library for direct kernel boot, which vmforge uses by default (faster under
TCG). Results are cached by recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .. import run
from ..errors import BuildError
from ..events import Progress, adapt, no_progress
from ..fsutil import write_file

__all__ = ["DebianRecipe", "DebianArtifacts", "build_debian", "find_mirror", "ROOT_LABEL"]

BUILDER_VERSION = 3
ROOT_LABEL = "cloudimg-rootfs"
PACKAGES = ("systemd-sysv", "udev", "dbus", "cloud-init", "linux-image-cloud-amd64",
            "initramfs-tools", "openssh-server", "sudo", "iproute2", "netbase", "e2fsprogs",
            "cloud-guest-utils", "ifupdown", "isc-dhcp-client", "python3",
            "python3-cffi-backend", "curl", "ca-certificates", "procps", "grub-pc-bin")

CLOUD_CFG = {
    "datasource_list": ["NoCloud", "None"],
    # RSA host key generation costs ~36 s under TCG.
    "ssh_genkeytypes": ["ed25519", "ecdsa"],
    "locale": "C.UTF-8",
    "manage_etc_hosts": True,  # the hostname resolves (sudo complains otherwise)
    "system_info": {"network": {"renderers": ["eni"]}},
}


@dataclass(frozen=True)
class DebianRecipe:
    suite: str = "bookworm"
    size_gib: int = 3
    packages: tuple[str, ...] = PACKAGES

    def key(self, mirror: str) -> str:
        doc = {"builder": BUILDER_VERSION, "recipe": asdict(self), "mirror": mirror,
               "cloud_cfg": CLOUD_CFG}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DebianArtifacts:
    dir: Path
    key: str
    cmdline: str

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    def recipe(self) -> dict[str, object]:
        return json.loads((self.dir / "recipe.json").read_text())  # type: ignore[no-any-return]


def find_mirror(default: str = "http://deb.debian.org/debian") -> str:
    """The Debian mirror apt on this machine is configured with."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.suffix in (".list", ".sources") or p.name == "sources.list":
            try:
                texts.append(p.read_text())
            except OSError:
                continue
    for text in texts:
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.MULTILINE):
            if "security" not in m.group(1):
                return m.group(1).rstrip("/")
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.MULTILINE):
            if "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return default



def _configure(root: Path) -> None:
    write_file(root / "etc/cloud/cloud.cfg.d/90-vmforge.cfg",
           "# written by vmforge\n" + yaml.safe_dump(CLOUD_CFG, sort_keys=False))
    write_file(root / "etc/fstab", f"LABEL={ROOT_LABEL} / ext4 defaults,discard,errors=remount-ro "
                               "0 1\n")
    write_file(root / "etc/network/interfaces",
           "auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n")
    (root / "etc/network/interfaces.d").mkdir(parents=True, exist_ok=True)
    write_file(root / "etc/machine-id", "")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    write_file(root / "etc/hostname", "localhost\n")
    write_file(root / "etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # A serial getty is started by systemd from console=ttyS0; nothing else to enable.


GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "normal", "linux", "search",
                "search_label", "serial", "terminal", "configfile", "echo", "test")
PART_START = 2048  # sectors: the partition starts at 1 MiB; GRUB's core.img sits before it


def _grub_cfg(kernel: str, initrd: str, cmdline_args: str) -> str:
    return "\n".join([
        "set timeout=0", "set default=0",
        "serial --unit=0 --speed=115200", "terminal_input serial console",
        "terminal_output serial console",
        'menuentry "Debian (vmforge cloud image)" {',
        f"  search --no-floppy --label {ROOT_LABEL} --set=root",
        f"  linux /boot/{kernel} {cmdline_args}",
        f"  initrd /boot/{initrd}",
        "}", ""])


def _mbr(boot_img: bytes, part_sectors: int) -> bytes:
    """GRUB's boot.img code, a disk signature and one bootable Linux partition."""
    import struct
    mbr = bytearray(boot_img[:440].ljust(440, b"\0")) + os.urandom(4) + b"\0\0"
    # status, CHS first (unused: LBA), type 0x83, CHS last (unused), first LBA, sectors
    mbr += struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                       PART_START, part_sectors)
    mbr += b"\0" * 48 + b"\x55\xaa"
    assert len(mbr) == 512
    return bytes(mbr)


def _assemble_disk(root: Path, fs: Path, disk: Path) -> None:
    """MBR + GRUB core.img (sectors 1..) + the ext4 file system at 1 MiB, written sparsely."""
    core = root / "tmp" / "core.img"
    boot_img = (root / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    core_bytes = core.read_bytes()
    if len(core_bytes) > (PART_START - 1) * 512:
        raise BuildError("GRUB core.img does not fit before the first partition")
    fs_size = fs.stat().st_size
    with open(disk, "wb") as out, open(fs, "rb") as src:
        out.write(_mbr(boot_img, fs_size // 512))
        out.write(core_bytes)
        zero = bytes(1 << 20)
        offset = PART_START * 512
        while chunk := src.read(1 << 20):
            if chunk != zero[:len(chunk)]:
                out.seek(offset)
                out.write(chunk)
            offset += len(chunk)
        out.truncate(PART_START * 512 + fs_size)
    core.unlink()


def build_debian(cache: Path, recipe: DebianRecipe | None = None,
                 events: Progress = no_progress, mirror: str | None = None
                 ) -> DebianArtifacts:
    progress = adapt(events, "debian", "build")
    recipe = recipe or DebianRecipe()
    mirror = mirror or find_mirror()
    key = recipe.key(mirror)
    cmdline = f"root=LABEL={ROOT_LABEL} ro console=ttyS0 net.ifnames=0"
    # Boots two ways: from its own MBR + GRUB like a stock image (boot_mode: firmware), or
    # directly with the kernel and initrd stored beside it (the default: faster under TCG).
    out = cache / "debian" / key
    if (out / "disk.qcow2").exists():
        progress(f"using cached build {key}")
        return DebianArtifacts(out, key, cmdline)
    for tool, pkg in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                      ("chroot", "coreutils")):
        run.require_binary(tool, pkg)
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root", hint="run the build as root")
    (cache / "debian").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache / "debian"))
    try:
        root = work / "rootfs"
        progress(f"debootstrap {recipe.suite} from {mirror} (about 2 minutes)")
        run.run(["debootstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}",
                 recipe.suite, str(root), mirror], timeout=3600, what="debootstrap",
                env={"DEBIAN_FRONTEND": "noninteractive"})
        progress("configuring for cloud use")
        _configure(root)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise BuildError("the image has no kernel or initrd in /boot")
        shutil.copy2(kernels[-1], work / "vmlinuz")
        shutil.copy2(initrds[-1], work / "initrd.img")
        progress("installing GRUB (BIOS) for booting from the disk itself")
        write_file(root / "boot/grub/grub.cfg",
               _grub_cfg(kernels[-1].name, initrds[-1].name, cmdline))
        run.run(["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-o", "/tmp/core.img",
                 "-p", "(hd0,msdos1)/boot/grub", *GRUB_MODULES], what="grub-mkimage")
        progress("making the ext4 root filesystem (mkfs.ext4 -d)")
        fs = work / "rootfs.ext4"
        core = root / "tmp" / "core.img"
        core_copy = work / "core.img"
        shutil.move(core, core_copy)  # keep it out of the file system
        run.run(["mkfs.ext4", "-q", "-d", str(root), "-L", ROOT_LABEL, "-E",
                 "root_owner=0:0", str(fs), f"{recipe.size_gib * 1024 - 1}M"], timeout=1800,
                what="mkfs.ext4")
        shutil.move(core_copy, core)
        raw = work / "disk.raw"
        progress("partitioning: MBR with GRUB, ext4 at 1 MiB")
        _assemble_disk(root, fs, raw)
        fs.unlink()
        progress("converting to qcow2")
        from ..images.qcow2 import convert
        convert(raw, work / "disk.qcow2", src_format="raw")
        raw.unlink()
        shutil.rmtree(root)
        (work / "recipe.json").write_text(json.dumps(
            {"builder": "debian", "key": key, "suite": recipe.suite, "mirror": mirror,
             "packages": list(recipe.packages), "kernel": kernels[-1].name,
             "cmdline": cmdline}, indent=2))
        tmp_out = work.with_name(work.name + ".done")
        os.rename(work, tmp_out)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp_out, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DebianArtifacts(out, key, cmdline)
