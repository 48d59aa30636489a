"""Assemble a NoCloud seed from a spec: validation, defaults and the agent MIME part."""

from __future__ import annotations

import os
import re

from .validate import parse_meta_data, validate_network_config, validate_user_data

TYPE_CHECKING = False  # not typing's: the seed path must not import it (nor dataclasses)

if TYPE_CHECKING:  # the seed path (`vmforge seed build`) stays free of pydantic and email,
    # and of PyYAML, pathlib, typing and dataclasses (each imported where it is needed)
    from email.mime.text import MIMEText
    from pathlib import Path
    from typing import Any

    from ..spec import CloudInit

__all__ = ["Seed", "build_seed", "default_user_data", "find_ssh_public_key", "inject_agent"]


class Seed:
    """The four NoCloud files (immutable)."""

    __slots__ = ("meta_data", "user_data", "network_config", "vendor_data")
    meta_data: bytes
    user_data: bytes
    network_config: bytes | None
    vendor_data: bytes | None

    def __init__(self, meta_data: bytes, user_data: bytes, network_config: bytes | None = None,
                 vendor_data: bytes | None = None) -> None:
        for name, value in (("meta_data", meta_data), ("user_data", user_data),
                            ("network_config", network_config), ("vendor_data", vendor_data)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Seed is immutable: cannot set {name}")

    def _key(self) -> tuple[bytes | None, ...]:
        return (self.meta_data, self.user_data, self.network_config, self.vendor_data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Seed) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Seed(meta_data={self.meta_data!r}, user_data=<{len(self.user_data)} bytes>, "
                f"network_config={self.network_config!r}, "
                f"vendor_data={'None' if self.vendor_data is None else '<bytes>'})")

    def files(self) -> list[tuple[str, bytes]]:
        out = [("meta-data", self.meta_data), ("user-data", self.user_data)]
        if self.network_config is not None:
            out.append(("network-config", self.network_config))
        if self.vendor_data is not None:
            out.append(("vendor-data", self.vendor_data))
        return out


def find_ssh_public_key(home: Path | None = None) -> str | None:
    """The invoking user's SSH public key, if there is one."""
    from pathlib import Path
    home = home or Path(os.environ.get("HOME") or Path.home())
    for name in ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"):
        p = home / ".ssh" / name
        if p.is_file():
            return p.read_text().strip()
    return None


def default_user_data(hostname: str, ssh_key: str | None, user: str | None = None) -> bytes:
    """A sensible default for a cloud image that was given no cloud-init config."""
    import getpass

    import yaml
    user = user or os.environ.get("SUDO_USER") or getpass.getuser()
    if user == "root":
        user = "vmforge"
    entry: dict[str, object] = {
        "name": user, "groups": ["sudo"], "shell": "/bin/bash",
        "sudo": "ALL=(ALL) NOPASSWD:ALL", "lock_passwd": True,
    }
    if ssh_key:
        entry["ssh_authorized_keys"] = [ssh_key]
    doc = {"hostname": hostname, "preserve_hostname": False, "users": ["default", entry],
           "ssh_pwauth": False}
    return b"#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False).encode()


def _meta_data(text: str | None, name: str, field: str = "spec.cloud_init.meta_data") -> bytes:
    meta = parse_meta_data(text or "", field)
    meta.setdefault("instance-id", name)
    meta.setdefault("local-hostname", name)
    simple = _dump_simple(meta)
    if simple is not None:
        return simple.encode()
    import yaml
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(meta, Dumper=dumper, sort_keys=False).encode()


# A string PyYAML writes as it is (plain) when the YAML 1.1 resolver reads it back as a string.
_SIMPLE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}\Z")


def _dump_simple(meta: dict[str, Any]) -> str | None:
    """``key: value`` lines, exactly as ``yaml.dump`` writes them, for the usual meta-data
    (instance-id and hostnames); None for anything else, which goes to PyYAML."""
    from .miniyaml import Unsupported, _plain
    lines = []
    for k, v in meta.items():
        for s in (k, v):
            try:
                if not isinstance(s, str) or not _SIMPLE.match(s) or _plain(s) != s:
                    return None
            except Unsupported:
                return None
        lines.append(f"{k}: {v}\n")
    return "".join(lines)


def build_seed(name: str, cloud_init: CloudInit | None, *, default_if_empty: bool = False,
               ssh_key: str | None = None, schema: bool = True,
               network_config: str | None = None) -> Seed:
    """Validate the spec's cloud_init (against cloud-init's schemas unless ``schema`` is
    False) and produce the seed files (pure apart from defaults). ``network_config`` is the
    one vmforge made for the spec's NICs (static addresses, by MAC): used when cloud_init
    has none of its own."""
    ci = cloud_init
    if ci is None:
        from ..spec import CloudInit
        ci = CloudInit()
    if ci.user_data is not None:
        user = ci.user_data.encode()
        validate_user_data(user, "spec.cloud_init.user_data", schema=schema)
    elif default_if_empty:
        user = default_user_data(name, ssh_key)
    else:
        user = b"#cloud-config\n{}\n"
    net = None
    if ci.network_config is not None:
        validate_network_config(ci.network_config, "spec.cloud_init.network_config",
                                schema=schema)
        net = ci.network_config.encode()
    elif network_config is not None:
        validate_network_config(network_config, "network-config (from spec.nics)",
                                schema=schema)
        net = network_config.encode()
    vendor = None
    if ci.vendor_data is not None:
        validate_user_data(ci.vendor_data.encode(), "spec.cloud_init.vendor_data",
                           schema=schema)
        vendor = ci.vendor_data.encode()
    meta = _meta_data(ci.meta_data, name)
    return Seed(meta, user, net, vendor)


AGENT_UNIT = """[Unit]
Description=vmforge guest agent
After=systemd-udevd.service
ConditionPathExists=/usr/local/lib/vmforge/agent.py

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/vmforge/agent.py
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def _user_part(user: bytes) -> list[MIMEText]:
    import email
    import email.policy
    from email.mime.text import MIMEText
    text = user.decode()
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if first.lower().startswith(("content-type:", "mime-version:")):
        msg = email.message_from_string(text, policy=email.policy.compat32)
        parts = []
        for part in msg.walk():
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            sub = part.get_content_subtype()
            parts.append(MIMEText(payload.decode(), sub, "utf-8"))
        return parts
    if first.startswith("#cloud-config"):
        return [MIMEText(text, "cloud-config", "utf-8")]
    if first.startswith("#!"):
        return [MIMEText(text, "x-shellscript", "utf-8")]
    if first.startswith("#cloud-boothook"):
        return [MIMEText(text, "cloud-boothook", "utf-8")]
    return [MIMEText(text, "x-include-url" if first.startswith("#include") else "plain", "utf-8")]


def inject_agent(seed: Seed, agent_source: bytes) -> Seed:
    """Add the guest agent as its own MIME part; the user's own parts are kept byte for byte.

    Our part merges with ``list(append)`` and ``dict(no_replace)`` so it can never replace a
    key the user set (cloud-init's default merge would let a later part replace lists).
    """
    if seed.user_data[:2] == b"\x1f\x8b":
        import gzip
        user = gzip.decompress(seed.user_data)
    else:
        user = seed.user_data
    doc = {
        "merge_how": [{"name": "list", "settings": ["append"]},
                      {"name": "dict", "settings": ["no_replace", "recurse_list"]}],
        "write_files": [
            {"path": "/usr/local/lib/vmforge/agent.py", "permissions": "0755",
             "encoding": "b64", "content": _b64(agent_source)},
            {"path": "/etc/systemd/system/vmforge-agent.service", "permissions": "0644",
             "content": AGENT_UNIT},
        ],
        # No daemon-reload: it reruns every generator (cloud-init's is Python), seconds under
        # TCG. Enable for later boots, and start this boot's agent as a transient unit.
        "runcmd": [["systemctl", "enable", "--no-reload", "vmforge-agent.service"],
                   ["systemd-run", "--unit=vmforge-agent-firstboot", "--property=Restart=always",
                    "/usr/bin/python3", "/usr/local/lib/vmforge/agent.py"]],
    }
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    import yaml
    agent_part = MIMEText("#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False),
                          "cloud-config", "utf-8")
    agent_part.add_header("Content-Disposition", 'attachment; filename="vmforge-agent.yaml"')
    outer = MIMEMultipart()
    if user.strip() and user.strip() not in (b"#cloud-config\n{}", b"#cloud-config"):
        for part in _user_part(user):
            outer.attach(part)
    outer.attach(agent_part)
    return Seed(seed.meta_data, outer.as_bytes(), seed.network_config, seed.vendor_data)


def _b64(data: bytes) -> str:
    import base64
    return base64.b64encode(data).decode()
