"""Cloud Hypervisor backend: ``render`` (pure: MachinePlan -> API requests) and ``driver``
(the VMM process and its HTTP API on a unix socket)."""
