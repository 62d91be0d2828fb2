"""systemd's two hand-offs, from the documented protocol (sd_listen_fds(3), sd_notify(3)), with
the standard library only: the listening sockets a service manager passes at start
(LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES), and the states told back (READY=1, STOPPING=1 on
NOTIFY_SOCKET). Any launcher that speaks them works: systemd, systemd-socket-activate, s6."""

from __future__ import annotations

import errno
import logging
import os
import socket

log = logging.getLogger("qmpjobd.systemd")

LISTEN_FDS_START = 3  # the first descriptor passed
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """What the launcher passed cannot be served (one line, for the command line's error)."""


def inherited_sockets() -> list[tuple[str, socket.socket]]:
    """The sockets passed to this process, each with its name ("unknown" when the launcher
    names none, as sd_listen_fds_with_names says). The variables are removed, so that no
    child takes them for its own; the descriptors are made close-on-exec."""
    values = {name: os.environ.pop(name, None) for name in _VARIABLES}
    pid, count_text, names_text = (values[name] for name in _VARIABLES)
    if pid is None or count_text is None:
        return []
    if not (pid.isascii() and pid.isdigit()) or int(pid) != os.getpid():
        return []  # meant for another process (a parent that did not clear them)
    if not (count_text.isascii() and count_text.isdigit()):
        raise ActivationError(f"LISTEN_FDS={count_text!r} is not a count of descriptors")
    count = int(count_text)
    names = names_text.split(":") if names_text else ["unknown"] * count
    if len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES names {len(names)} sockets, LISTEN_FDS "
                              f"passes {count}")
    found = []
    for index, name in enumerate(names):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as e:
            if e.errno == errno.ENOTSOCK:
                raise ActivationError(f"passed socket '{name}' (fd {fd}) is not a listening "
                                      "Unix stream socket") from None
            raise ActivationError(f"passed socket '{name}' (fd {fd}): {e.strerror}") from None
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            sock.detach()
            raise ActivationError(f"passed socket '{name}' (fd {fd}) is not a listening Unix "
                                  "stream socket")
        found.append((name, sock))
    return found


def socket_path(sock: socket.socket) -> str:
    """Where a passed socket listens, for logs and messages."""
    address = sock.getsockname()
    if isinstance(address, bytes):  # abstract
        return "@" + address[1:].decode(errors="replace")
    return str(address) or "(unnamed)"


def notify(state: str) -> None:
    """Tell the service manager STATE ("READY=1", "STOPPING=1") if it asked to be told
    (NOTIFY_SOCKET: a path, or an abstract name starting with @). A failure is logged: the
    daemon serves all the same."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("cannot tell the service manager %s on %s: %s", state,
                    os.environ["NOTIFY_SOCKET"], e.strerror)
