"""qmpjobd: a QMP job daemon with QEMU's job model, built on trio."""

__version__ = "0.1.0"

# The QEMU release whose QMP interface qmpjobd implements, and how the daemon names itself in
# the greeting and in query-version.
QMP_API_VERSION = (7, 2, 0)
PACKAGE = f"qmpjobd {__version__}"
