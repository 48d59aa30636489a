"""libvirt backend: ``render`` (pure: MachinePlan -> domain XML) and ``driver`` (I/O through
libvirt's own Python binding, imported only there and only when the backend is used)."""
