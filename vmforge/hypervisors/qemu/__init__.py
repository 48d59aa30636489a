"""The QEMU backend: ``render`` (pure argv) and ``driver`` (process control)."""
