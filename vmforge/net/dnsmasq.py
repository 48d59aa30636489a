"""dnsmasq, one per managed network: DHCP in the network's DHCP range and DNS on its bridge.

It daemonizes itself (``--pid-file``): the parent exits only once the child has bound its
sockets, and reports start-up errors (an address in use, a missing interface) on stderr with
a non-zero exit, like QEMU's ``-daemonize``. Its pidfile path is in its command line, which
guards the pidfile against PID reuse. Everything it writes (pidfile, leases, a log with every
DHCP exchange, which answers "why did the VM get no address?") is in the network's directory.

The argv and the lease parser are pure (golden-tested); ``start``/``stop``/``find_pid`` are I/O.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .. import run
from ..errors import HostError
from .model import Network

__all__ = ["DnsmasqFiles", "Lease", "dnsmasq_argv", "parse_leases", "read_leases", "find_pid",
           "start", "stop", "LEASE_TIME"]

LEASE_TIME = "1h"


@dataclass(frozen=True)
class DnsmasqFiles:
    dir: Path

    @property
    def pidfile(self) -> Path:
        return self.dir / "dnsmasq.pid"

    @property
    def leases(self) -> Path:
        return self.dir / "leases"

    @property
    def log(self) -> Path:
        return self.dir / "dnsmasq.log"


@dataclass(frozen=True)
class Lease:
    expires: int  # epoch seconds; 0 = infinite
    mac: str
    ip: str
    hostname: str | None

    def to_json(self) -> dict[str, object]:
        return {"expires": self.expires, "mac": self.mac, "ip": self.ip,
                "hostname": self.hostname}


def dnsmasq_argv(net: Network, files: DnsmasqFiles, *, binary: str = "dnsmasq",
                 user: str = "root") -> list[str]:
    d0, d1 = net.dhcp_range
    argv = [binary,
            "--conf-file=/dev/null",        # never the host's /etc/dnsmasq.conf
            "--no-hosts",                   # nor its /etc/hosts
            "--strict-order",
            "--bind-dynamic", f"--interface={net.bridge}", "--except-interface=lo",
            f"--pid-file={files.pidfile}",
            f"--dhcp-leasefile={files.leases}",
            f"--log-facility={files.log}", "--log-dhcp",
            f"--dhcp-range={d0},{d1},{net.subnet.netmask},{LEASE_TIME}",
            f"--dhcp-lease-max={int(d1) - int(d0) + 1}",
            "--dhcp-authoritative", "--dhcp-no-override",
            f"--user={user}"]
    if net.router is None:
        argv.append("--dhcp-option=option:router")  # empty: no default route is handed out
    if not net.mode.gives_router:
        argv.append("--no-resolv")  # no way out: answer local names only
    return argv


def parse_leases(text: str) -> list[Lease]:
    """dnsmasq's lease file: ``EXPIRY MAC IP HOSTNAME CLIENT-ID`` per line (``*`` = none);
    lines that do not parse are skipped (the file is rewritten while we read it)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] == "duid":
            continue
        try:
            expires = int(parts[0])
        except ValueError:
            continue
        out.append(Lease(expires, parts[1].lower(), parts[2],
                         None if parts[3] == "*" else parts[3]))
    return out


def read_leases(files: DnsmasqFiles, now: float | None = None) -> list[Lease]:
    try:
        text = files.leases.read_text(errors="replace")
    except OSError:
        return []
    now = time.time() if now is None else now
    return [le for le in parse_leases(text) if le.expires == 0 or le.expires > now]


def _cmdline(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, IndexError):
        return None


def find_pid(files: DnsmasqFiles) -> int | None:
    """The pid of the network's dnsmasq if it runs (its command line names our pidfile)."""
    try:
        pid = int(files.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    args = _cmdline(pid)
    if args is None or f"--pid-file={files.pidfile}" not in args:
        return None
    return pid


def start(net: Network, files: DnsmasqFiles) -> int:
    import pwd
    binary = run.find_binary("dnsmasq")
    if binary is None:
        raise HostError("dnsmasq is not installed (managed networks use it for DHCP and DNS)",
                        hint="apt-get install dnsmasq-base")
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    user = pwd.getpwuid(os.geteuid()).pw_name
    run.run(dnsmasq_argv(net, files, binary=binary, user=user), timeout=30,
            what=f"dnsmasq for network {net.name}",
            hint=f"see {files.log}; is another DHCP server bound to {net.bridge}?")
    deadline = time.monotonic() + 5
    while (pid := find_pid(files)) is None:
        if time.monotonic() > deadline:
            raise HostError(f"dnsmasq for network {net.name} started but wrote no pidfile",
                            hint=f"see {files.log}")
        time.sleep(0.01)
    return pid


def stop(files: DnsmasqFiles, timeout: float = 3.0) -> bool:
    """Stop the network's dnsmasq (by its recorded pid, checked); True if one was running."""
    pid = find_pid(files)
    if pid is None:
        files.pidfile.unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and find_pid(files) == pid:
            time.sleep(0.01)
        if find_pid(files) != pid:
            break
    files.pidfile.unlink(missing_ok=True)
    return True
