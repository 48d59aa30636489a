"""Letting libvirt's unprivileged QEMU reach a VM's files without opening them to anyone else.

Under ``qemu:///system`` QEMU runs as a service account (``libvirt-qemu`` on Debian), while
vmforge's data directory and VM directories are owner-only (0700 directories, 0600 files). The
driver therefore grants that one account, and nobody else, exactly what QEMU needs through
POSIX ACL entries (``setfacl``), as virt-manager does for the directories of a disk:

- search (``x``) on every directory above a file QEMU opens, where it lacks it;
- read on the kernel, initrd, cdroms, seed ISO and the read-only backing chain of each disk;
- read-write on each disk's top image and the UEFI variable store.

Nothing is chowned (the domain's ``<seclabel model='dac' relabel='no'>`` keeps libvirt from
relabelling), so shared library blobs keep their owner and read-only mode. Entries on the VM's
own files vanish with its directory; search and read entries on shared directories and library
blobs stay (they give that account nothing it could write). An ACL entry shows in ``ls -l`` as a
``+`` and as group bits (the ACL mask: a 0700 directory lists as 0710): still nobody but the
owner and that account. This module decides what to grant (reading modes and ACLs, no
processes); :func:`apply_grants` runs ``setfacl`` through :mod:`vmforge.run`.

Shared folders (``spec.mounts``) are the user's own directories, not vmforge's: the account gets
search on the directories above each (as for a disk), but the folder's tree is never changed.
:func:`mount_grants` refuses, naming the folder and the command that would open it, when the
account cannot read it (or, shared read-write, write it).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ... import run
from ...errors import CommandError, HostError

__all__ = ["Principal", "principal", "parse_label", "has_access", "needed_grants",
           "apply_grants", "backing_chain", "mount_grants", "READ", "WRITE", "SEARCH"]

READ, WRITE, SEARCH = 4, 2, 1

# <linux/posix_acl_xattr.h>: a little-endian u32 version (2), then (u16 tag, u16 perm, u32 id)
_ACL_XATTR = "system.posix_acl_access"
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@dataclass(frozen=True)
class Principal:
    """The account QEMU runs as: uid, primary gid and supplementary groups."""
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def label(self) -> str:
        return f"+{self.uid}:+{self.gid}"


def parse_label(label: str) -> tuple[int, int] | None:
    """``+64055:+64055`` (libvirt's DAC label syntax) -> (uid, gid); names are looked up."""
    try:
        user, group = label.split(":", 1)
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (ValueError, KeyError):
        return None
    return uid, gid


def principal(uid: int, gid: int) -> Principal:
    """As libvirt runs QEMU (``virGetGroupList``): ``gid`` plus the account's own groups, its
    passwd primary group included (Debian's libvirt-qemu is in ``kvm`` only that way)."""
    groups = {gid}
    try:
        pw = pwd.getpwuid(uid)
        groups.update(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except KeyError:
        pass
    return Principal(uid, gid, frozenset(groups))


def _acl(path: Path) -> list[tuple[int, int, int]]:
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            return []
        raise
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw) - 7, 8)]


def has_access(path: Path, who: Principal, want: int) -> bool:
    """Whether ``who`` has ``want`` (READ|WRITE|SEARCH bits) on ``path`` itself, by the POSIX
    ACL access check algorithm (owner, named users, groups, other)."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if who.uid == 0:
        return True
    if who.uid == st.st_uid:
        return (mode >> 6) & want == want
    entries = _acl(path)
    mask = next((p for t, p, _ in entries if t == _MASK), 7)
    for tag, perm, ident in entries:
        if tag == _USER and ident == who.uid:
            return perm & mask & want == want
    group_perms = []
    if st.st_gid in who.groups:
        group_perms.append((mode >> 3) & 7 if not entries
                           else next((p for t, p, _ in entries if t == _GROUP_OBJ), 0) & mask)
    group_perms += [perm & mask for tag, perm, ident in entries
                    if tag == _GROUP and ident in who.groups]
    if group_perms:
        return any(p & want == want for p in group_perms)
    return mode & want == want


def backing_chain(image: str | Path, depth: int = 16) -> list[Path]:
    """The backing files of a qcow2 image, nearest first, read from the headers (a relative
    name is relative to the image that names it)."""
    chain: list[Path] = []
    current = Path(image)
    for _ in range(depth):
        try:
            with open(current, "rb") as f:
                head = f.read(20)
                if len(head) < 20 or head[:4] != b"QFI\xfb":
                    break
                offset, size = struct.unpack(">QI", head[8:20])
                if not offset or not size:
                    break
                f.seek(offset)
                name = f.read(size).decode()
        except (OSError, UnicodeDecodeError):
            break
        if name.startswith(("json:", "nbd:", "http:", "https:")):
            break
        nxt = Path(name) if os.path.isabs(name) else current.parent / name
        chain.append(nxt)
        current = nxt
    return chain


def _ancestors(path: Path) -> list[Path]:
    return list(reversed(Path(os.path.abspath(path)).parents))


def needed_grants(who: Principal, read: Iterable[str | Path], write: Iterable[str | Path]
                  ) -> dict[str, list[Path]]:
    """What to grant ``who``: ``{"x": dirs, "r": files, "rw": files}``, in path order, only
    where the access is missing. Paths that do not exist are left to libvirt's own error."""
    plan: dict[str, list[Path]] = {"x": [], "r": [], "rw": []}
    wanted: dict[Path, int] = {}
    for paths, bits in ((read, READ), (write, READ | WRITE)):
        for p in paths:
            path = Path(os.path.abspath(p))
            wanted[path] = wanted.get(path, 0) | bits
    dirs: dict[Path, None] = {}
    for path in wanted:
        for d in _ancestors(path):
            dirs.setdefault(d, None)
    for d in dirs:
        if not has_access(d, who, SEARCH):
            plan["x"].append(d)
    for path, bits in wanted.items():
        if not path.exists():
            continue
        if not has_access(path, who, bits):
            plan["rw" if bits & WRITE else "r"].append(path)
    return plan


def apply_grants(who: Principal, grants: dict[str, list[Path]]) -> None:
    """``setfacl -m u:UID:PERM`` on each group of paths (one process per permission)."""
    todo = [(perm, paths) for perm, paths in grants.items() if paths]
    if not todo:
        return
    setfacl = run.find_binary("setfacl")
    if setfacl is None:
        raise HostError("setfacl is needed to let libvirt's QEMU (uid "
                        f"{who.uid}) read the VM's owner-only files", hint="apt-get install acl")
    for perm, paths in todo:
        try:
            run.run([setfacl, "-m", f"u:{who.uid}:{perm}", *map(str, paths)], what="setfacl")
        except CommandError as exc:
            raise HostError(f"could not grant libvirt's QEMU (uid {who.uid}) {perm!r} on "
                            f"{', '.join(map(str, paths))}: {exc.stderr.strip()}",
                            hint="the files must be yours (or run as root), on a file system "
                                 "with POSIX ACLs") from exc


def mount_grants(who: Principal, mounts: Iterable[tuple[str | Path, bool]]
                 ) -> dict[str, list[Path]]:
    """What to grant ``who`` for shared folders ``(directory, readonly)``: search on the
    directories above them. A folder ``who`` cannot use (read and search; write too unless
    read-only) is a HostError: vmforge does not change the permissions of the user's tree."""
    plan: dict[str, list[Path]] = {"x": [], "r": [], "rw": []}
    for source, readonly in mounts:
        path = Path(os.path.abspath(source))
        for d in _ancestors(path):
            if d not in plan["x"] and not has_access(d, who, SEARCH):
                plan["x"].append(d)
        want = READ | SEARCH | (0 if readonly else WRITE)
        if path.is_dir() and not has_access(path, who, want):
            perm = "rX" if readonly else "rwX"
            raise HostError(f"libvirt's QEMU (uid {who.uid}) cannot "
                            f"{'read' if readonly else 'read and write'} the shared folder "
                            f"{path}",
                            hint=f"open it to that account: setfacl -R -m u:{who.uid}:{perm} "
                                 f"-m d:u:{who.uid}:{perm} {path}; or share it read-only, "
                                 "or use qemu:///session (QEMU then runs as you)")
    return plan
