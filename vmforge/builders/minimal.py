"""The minimal fast-boot image: Debian kernel + busybox + python3 subset + the vmforge agent.

Everything comes from Debian packages fetched with the host's apt and unpacked (never
installed). The python standard library is not hand-picked: the guest's own interpreter runs
``modulefinder`` over the agent and only the modules it reaches (plus the shared libraries
their ELF headers name) go into the initramfs. Output, cached by recipe:

* ``vmlinux``: the kernel's uncompressed ELF, booted through PVH (about half the TCG boot time
  of the bzImage is decompression);
* ``vmlinuz``: the bzImage, for UEFI (OVMF needs the EFI stub);
* ``initrd``: an uncompressed newc cpio with busybox init, the virtio modules and the agent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import run
from ..agent import guest as agent_module
from ..errors import BuildError
from ..events import Progress, Say, adapt, no_progress
from ..fsutil import write_file
from ..images.kernel import extract_vmlinux
from .cpio import write_cpio
from .debs import extract_deb, fetch_debs, resolve_dependency
from .elf import modinfo, needed_libs

__all__ = ["MinimalRecipe", "MinimalArtifacts", "build_minimal", "READY_MARKER"]

BUILDER_VERSION = 6
READY_MARKER = "vmforge: ready"
DEFAULT_MODULES = ("virtio_pci", "virtio_mmio", "virtio_console", "virtio_blk", "virtio_net",
                   "virtio_rng", "ahci", "ata_piix", "sr_mod", "isofs", "button", "evdev",
                   "vmw_vsock_virtio_transport")
# Host folders (virtio-9p): in the image but not loaded at boot; the agent loads them (in the
# order /etc/modules.9p lists them, dependencies first) when a VM has mounts.
MOUNT_MODULES = ("9pnet_virtio", "9p")
# Modules the agent reaches only through optional imports that have fallbacks.
PY_EXCLUDES = ("_hashlib", "ssl", "_ssl", "_bz2", "_lzma", "bz2", "lzma", "_ctypes", "ctypes",
               "tkinter", "_tkinter", "unittest", "pydoc", "doctest", "_posixshmem", "tty",
               "pty", "readline", "_curses", "curses", "_dbm", "_gdbm", "_sqlite3", "_uuid",
               "_decimal", "xml", "pyexpat", "_elementtree", "urllib", "http", "email",
               "multiprocessing", "concurrent", "asyncio")
# Loaded by name at run time, so modulefinder cannot see them (idna: socket host names).
ESSENTIAL_PY = ("encodings/__init__.py", "encodings/aliases.py", "encodings/utf_8.py",
                "encodings/latin_1.py", "encodings/ascii.py", "encodings/idna.py",
                "stringprep.py", "os.py")


INITTAB = """::sysinit:/etc/rc.boot
::shutdown:/bin/sync
"""

RC_BOOT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var/log /var/run
mount -t tmpfs -o mode=0755 tmpfs /run
while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done < /etc/modules.list
# The agent starts as early as its port exists (busybox init's respawn would cost ~1 s more
# under TCG); this loop is its supervisor.
(while true; do /opt/vmforge/run-agent; sleep 1; done) </dev/null >/dev/null 2>&1 &
id=vmforge
for tok in $(cat /proc/cmdline); do
  case "$tok" in vmforge.id=*) id="${tok#vmforge.id=}";; esac
done
hostname "$id"
ip link set lo up
# Each NIC by its MAC: vmforge.net=MAC,dhcp | vmforge.net=MAC,ADDR/PREFIX[,GATEWAY] on the
# command line for NICs on host networks; a NIC without one is QEMU user-mode networking,
# which always hands out 10.0.2.15 (no DHCP round trip needed).
for dev in /sys/class/net/*; do
  n="${dev##*/}"
  [ "$n" = lo ] && continue
  mac="$(cat "$dev/address")"
  conf=""
  for tok in $(cat /proc/cmdline); do
    case "$tok" in "vmforge.net=$mac,"*) conf="${tok#vmforge.net=$mac,}";; esac
  done
  ip link set "$n" up
  case "$conf" in
    "")
      ip addr add 10.0.2.15/24 dev "$n" && ip route add default via 10.0.2.2 2>/dev/null
      [ -s /etc/resolv.conf ] || echo "nameserver 10.0.2.3" > /etc/resolv.conf ;;
    dhcp)
      udhcpc -f -i "$n" -s /etc/udhcpc.script -x "hostname:$id" -T 1 -t 5 -A 2 \
        </dev/null >/dev/null 2>&1 & ;;
    *)
      ip addr add "${conf%%,*}" dev "$n"
      case "$conf" in *,*) ip route add default via "${conf#*,}" 2>/dev/null;; esac ;;
  esac
done
acpid -c /etc/acpi 2>/dev/null
echo "vmforge: block devices: $(ls /sys/block | tr '\\n' ' ')" > /dev/console
echo "READY_MARKER (uptime $(cut -d" " -f1 /proc/uptime)s)" > /dev/console
"""

RUN_AGENT = """#!/bin/sh
exec /usr/bin/python3 -S -c 'import sys; sys.path.insert(0, "/opt/vmforge"); \
import agent; sys.exit(agent.main())'
"""

# busybox udhcpc hands the lease to this script ($ip, $mask (bits), $router, $dns).
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig)
    ip addr flush dev "$interface" scope global
    ip link set "$interface" up ;;
  bound|renew)
    ip addr show dev "$interface" | grep -q "inet $ip/$mask " || {
      ip addr flush dev "$interface" scope global
      ip addr add "$ip/$mask" dev "$interface"
    }
    if [ -n "$router" ]; then
      for r in $router; do ip route replace default via "$r" dev "$interface" && break; done
    fi
    if [ -n "$dns" ]; then
      : > /etc/resolv.conf
      for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    fi ;;
esac
exit 0
"""

FINDER = """
import json, modulefinder, sys
root = sys.argv[2]
path = [p for p in sys.path if p.startswith(root)]
mf = modulefinder.ModuleFinder(path=path, excludes=sys.argv[3].split(","))
mf.run_script(sys.argv[1])
print(json.dumps({n: m.__file__ for n, m in mf.modules.items() if m.__file__}))
"""


@dataclass(frozen=True)
class MinimalRecipe:
    modules: tuple[str, ...] = DEFAULT_MODULES
    cmdline: str = "console=ttyS0 quiet"
    mount_modules: tuple[str, ...] = MOUNT_MODULES

    def key(self, packages: dict[str, str], agent_sha: str) -> str:
        doc = {"builder": BUILDER_VERSION, "recipe": asdict(self), "packages": packages,
               "agent": agent_sha, "init": hashlib.sha256((INITTAB + RC_BOOT + RUN_AGENT +
                                                           UDHCPC_SCRIPT).encode()).hexdigest()}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MinimalArtifacts:
    dir: Path
    key: str
    cmdline: str
    packages: dict[str, str]

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd"

    def recipe(self) -> dict[str, object]:
        return {"builder": "minimal", "key": self.key, "packages": self.packages,
                "cmdline": self.cmdline}


def _package_set() -> tuple[str, list[str]]:
    kernel_pkg = resolve_dependency("linux-image-amd64", "linux-image-")
    py = resolve_dependency("python3-minimal", "python3.")  # e.g. python3.11-minimal
    ver = py.removeprefix("python").removesuffix("-minimal")
    return ver, [kernel_pkg, "busybox-static", py, f"libpython{ver}-minimal",
                 f"libpython{ver}-stdlib", "libc6", "zlib1g", "libexpat1"]


def _module_index(modroot: Path) -> dict[str, Path]:
    return {p.name[:-3].replace("-", "_"): p for p in modroot.rglob("*.ko")}


def _resolve_modules(wanted: tuple[str, ...], index: dict[str, Path]) -> list[str]:
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in order:
            return
        if name in stack:
            raise BuildError(f"module dependency cycle: {' -> '.join(stack + (name,))}")
        if name not in index:
            raise BuildError(f"kernel module {name} not found in the kernel package")
        deps = modinfo(index[name]).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep, stack + (name,))
        order.append(name)

    for w in wanted:
        visit(w, ())
    return order


def _find_lib(extract: Path, name: str) -> Path:
    for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib"):
        p = extract / d / name
        if p.exists():
            return p
    raise BuildError(f"shared library {name} is not in the fetched packages")


def _copy_libs(extract: Path, stage: Path, elves: list[Path]) -> None:
    todo = list(elves)
    seen: set[str] = set()
    libdir = stage / "lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True, exist_ok=True)
    while todo:
        for lib in needed_libs(todo.pop()):
            if lib in seen:
                continue
            seen.add(lib)
            src = _find_lib(extract, lib)
            shutil.copy2(src.resolve(), libdir / lib)
            todo.append(libdir / lib)
    (stage / "lib64").mkdir(exist_ok=True)
    ld = _find_lib(extract, "ld-linux-x86-64.so.2")
    shutil.copy2(ld.resolve(), stage / "lib64/ld-linux-x86-64.so.2")



def _stage_python(extract: Path, stage: Path, pyver: str, agent_src: Path,
                  progress: Say) -> None:
    py = extract / f"usr/bin/python{pyver}"
    env = {"PYTHONHOME": str(extract / "usr"), "PYTHONDONTWRITEBYTECODE": "1"}
    res = run.run([str(py), "-S", "-c", FINDER, str(agent_src), str(extract),
                   ",".join(PY_EXCLUDES)], env=env, what="modulefinder (guest python)")
    found: dict[str, str] = json.loads(res.stdout)
    libroot = extract / f"usr/lib/python{pyver}"
    files = {Path(f).resolve() for f in found.values()
             if Path(f).resolve().is_relative_to(libroot.resolve())}
    files |= {(libroot / e).resolve() for e in ESSENTIAL_PY}
    progress(f"python: {len(files)} stdlib files reached from the agent")
    dest_lib = stage / f"usr/lib/python{pyver}"
    elves = [py]
    for f in sorted(files):
        rel = f.relative_to(libroot.resolve())
        dst = dest_lib / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
        if f.suffix == ".so":
            elves.append(f)
    (stage / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(py, stage / f"usr/bin/python{pyver}")
    os.symlink(f"python{pyver}", stage / "usr/bin/python3")
    _copy_libs(extract, stage, elves)
    agent_dir = stage / "opt/vmforge"
    agent_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(agent_src, agent_dir / "agent.py")
    # Compile with the guest interpreter so the guest never compiles at boot (seconds under
    # TCG). unchecked-hash: the cpio's mtimes are 0 for reproducibility, and a timestamp pyc
    # would then look stale and be recompiled on every boot.
    run.run([str(py), "-S", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
             str(dest_lib), str(agent_dir)],
            env={"PYTHONHOME": str(extract / "usr")}, what="compileall (guest python)")
    # Prove the staged tree is complete: import the agent with only the staged stdlib.
    run.run([str(py), "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import agent; "
             "'localhost'.encode('idna'); agent.Decoder().feed(agent.encode({}))",
             str(agent_dir)], env={"PYTHONHOME": str(stage / "usr")},
            what="agent import check (staged python)")


def build_minimal(cache: Path, recipe: MinimalRecipe | None = None,
                  events: Progress = no_progress) -> MinimalArtifacts:
    progress = adapt(events, "minimal", "build")
    recipe = recipe or MinimalRecipe()
    progress("resolving packages")
    pyver, packages = _package_set()
    from .debs import package_uris
    versions = package_uris(packages)
    agent_src = Path(agent_module.__file__)
    agent_sha = hashlib.sha256(agent_src.read_bytes()).hexdigest()
    key = recipe.key(versions, agent_sha)
    out = cache / "minimal" / key
    if (out / "initrd").exists():
        progress(f"using cached build {key}")
        return MinimalArtifacts(out, key, recipe.cmdline, versions)
    progress(f"fetching {len(packages)} packages")
    debs = fetch_debs(packages, cache / "debs")
    (cache / "minimal").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache / "minimal"))
    try:
        extract, stage = work / "extract", work / "stage"
        for pkg in packages:
            progress(f"unpacking {pkg}")
            extract_deb(debs[pkg], extract)
        progress("kernel: extracting the uncompressed vmlinux (PVH)")
        vmlinuz = next((extract / "boot").glob("vmlinuz-*"))
        extract_vmlinux(vmlinuz, work / "vmlinux")
        shutil.copy2(vmlinuz, work / "vmlinuz")
        modroot = next((extract / "lib/modules").iterdir())
        order = _resolve_modules(recipe.modules, _module_index(modroot))
        progress(f"kernel modules: {len(order)} ({', '.join(order)})")
        index = _module_index(modroot)
        (stage / "lib/modules").mkdir(parents=True)
        for m in order:
            shutil.copy2(index[m], stage / "lib/modules" / f"{m}.ko")
        write_file(stage / "etc/modules.list", "\n".join(order) + "\n")
        on_demand = _resolve_modules(recipe.mount_modules, index)
        for m in on_demand:
            if m not in order:
                shutil.copy2(index[m], stage / "lib/modules" / f"{m}.ko")
        write_file(stage / "etc/modules.9p", "\n".join(on_demand) + "\n")
        progress("busybox")
        bb = stage / "bin/busybox"
        bb.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(extract / "bin/busybox", bb)
        applets = run.run([str(bb), "--list-full"], what="busybox --list-full").text.split()
        for applet in applets:
            link = stage / applet
            if link.exists() or link.name == "busybox":
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
        os.symlink("/bin/busybox", stage / "init")
        for d in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "var/log"):
            (stage / d).mkdir(parents=True, exist_ok=True)
        (stage / "tmp").chmod(0o1777)
        write_file(stage / "etc/inittab", INITTAB)
        write_file(stage / "etc/rc.boot", RC_BOOT.replace("READY_MARKER", READY_MARKER), 0o755)
        write_file(stage / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        write_file(stage / "etc/group", "root:x:0:\n")
        write_file(stage / "etc/acpi/PWRF/00000080", "#!/bin/sh\npoweroff -f\n", 0o755)
        write_file(stage / "opt/vmforge/run-agent", RUN_AGENT, 0o755)
        write_file(stage / "etc/udhcpc.script", UDHCPC_SCRIPT, 0o755)
        progress("python and the agent")
        _stage_python(extract, stage, pyver, agent_src, progress)
        progress("writing the initramfs")
        write_cpio(stage, work / "initrd")
        tmp_out = work / "out"
        tmp_out.mkdir()
        for name in ("vmlinux", "vmlinuz", "initrd"):
            os.replace(work / name, tmp_out / name)
        (tmp_out / "recipe.json").write_text(json.dumps(
            {"key": key, "packages": versions, "modules": order}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp_out, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return MinimalArtifacts(out, key, recipe.cmdline, versions)
