"""qmpjobd: a QMP job daemon with QEMU's job model, built on trio."""

__version__ = "0.1.0"
