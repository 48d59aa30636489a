"""Image builders: minimal (busybox + python + agent), debian (debootstrap), golden."""
