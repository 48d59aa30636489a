"""cloud-init NoCloud seeds: validated content, defaults, and the ISO/vfat writers."""

from .build import Seed, build_seed, default_user_data, find_ssh_public_key, inject_agent
from .writers import write_iso, write_seed, write_vfat

__all__ = ["Seed", "build_seed", "default_user_data", "find_ssh_public_key", "inject_agent",
           "write_iso", "write_vfat", "write_seed"]
