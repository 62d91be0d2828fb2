"""Where the daemon listens when no monitor is given, computed alike by the daemon (which makes
the private directory) and by its clients (which only look)."""

from __future__ import annotations

import os


def private_directory(tmp: str = "/tmp") -> str | None:
    """The directory of its own the default socket goes in when there is no $XDG_RUNTIME_DIR:
    TMP/qmpjobd-$UID (None when there is one)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return None
    return os.path.join(tmp, f"qmpjobd-{os.getuid()}")


def default_socket_path(tmp: str = "/tmp") -> str:
    """$XDG_RUNTIME_DIR/qmpjobd.sock, else TMP/qmpjobd-$UID/qmp.sock."""
    private = private_directory(tmp)
    if private is None:
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "qmpjobd.sock")
    return os.path.join(private, "qmp.sock")
