"""Images: the library (content-addressed store + catalog), downloads, qcow2 and kernels."""
