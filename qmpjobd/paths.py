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


class NotPrivate(Exception):
    """The default socket's private directory is there, but not this user's alone."""


def check_private(directory: str) -> None:
    """NotPrivate unless DIRECTORY is a directory of this user's that nobody else may write
    (not a symlink): someone else's would let them stand in for the daemon."""
    info = os.lstat(directory)
    if (not os.path.isdir(directory) or os.path.islink(directory)
            or info.st_uid != os.getuid() or info.st_mode & 0o077):
        raise NotPrivate(f"{directory} exists but is not a private directory of this user")


def default_socket_path(tmp: str = "/tmp") -> str:
    """$XDG_RUNTIME_DIR/qmpjobd.sock, else TMP/qmpjobd-$UID/qmp.sock."""
    private = private_directory(tmp)
    if private is None:
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "qmpjobd.sock")
    return os.path.join(private, "qmp.sock")
