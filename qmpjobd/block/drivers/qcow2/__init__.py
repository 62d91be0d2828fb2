"""qcow2: the image format, on a file child (docs/interop/qcow2.txt of QEMU's source)."""
