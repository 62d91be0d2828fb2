"""QEMU's job model, independent of blocks and of the protocol."""
