"""Monitor sockets: binding them safely, and greeting clients while the daemon starts.

Both run before the event loop exists, with the standard library only: the daemon binds its
sockets first thing, so that a client can connect at once, and an `EarlyGreeter` thread sends
each early client the greeting, which depends on nothing the start-up still has to load. The
client then sends qmp_capabilities, which waits in the socket until the server takes the
connection over and answers it. (Loading trio and compiling the schema takes a few hundred
milliseconds; a QMP client should not have to wait that long for the greeting.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import stat
import struct
import threading

from .access import AccessPolicy, MonitorAccess, needs_groups, peer_of

log = logging.getLogger("qmpjobd.listen")
# The peer's groups as they were when it connected (Linux 4.13; socket.py does not name it).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# The most groups read (Python's getsockopt takes at most 1024 bytes); a peer in more is
# treated as one whose groups are unknown.
_MAX_GROUPS = 256


class SocketInUse(Exception):
    """Another live daemon answers on the socket path."""


def bind_unix_socket(path: str, mode: int | None = None) -> socket.socket:
    """A listening socket at PATH, mode 0600 (or MODE, once bound). A socket file whose daemon
    still answers is never taken over (SocketInUse); a stale one, left by a daemon that was
    killed, is replaced."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketInUse(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
        else:
            raise SocketInUse(f"{path} is in use by a running daemon")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the socket file; the umask makes it 0600 from the first instant.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    if mode is not None:
        try:
            os.chmod(path, mode)
        except OSError:
            sock.close()
            raise
    sock.listen(socket.SOMAXCONN)
    return sock


def unlink_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class EarlyGreeter:
    """Accepts connections on listening sockets and greets them, in a thread, until `stop`."""

    def __init__(self, listeners: list[tuple[socket.socket, bytes, MonitorAccess]],
                 policy: AccessPolicy) -> None:
        # Each listener with the greeting its clients get (monitors differ in pretty=on), and
        # the peers it admits.
        self._listeners = listeners
        self._policy = policy
        self._accepted: list[tuple[socket.socket, int, int]] = []
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="qmpjobd-greeter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[tuple[socket.socket, int, int]]:
        """Stop greeting; the connections greeted so far, each with its listener's index and
        its role there."""
        os.write(self._stop_write, b"x")
        self._thread.join()
        os.close(self._stop_read)
        os.close(self._stop_write)
        return self._accepted

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._stop_read, selectors.EVENT_READ, None)
            for index, (listener, _, _) in enumerate(self._listeners):
                selector.register(listener, selectors.EVENT_READ, index)
            while True:
                for key, _ in selector.select():
                    if key.data is None:
                        return
                    self._greet(key.data)

    def _greet(self, index: int) -> None:
        listener, greeting, access = self._listeners[index]
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # the client gave up already
        role: int | None = access.role
        if access.filters or self._policy:
            role = judge(conn.fileno(), access, self._policy)
        if role is None:
            conn.close()
            return
        try:
            conn.sendall(greeting)  # a few hundred bytes into an empty socket buffer
        except OSError:
            conn.close()
            return
        self._accepted.append((conn, index, role))


def groups_of(fd: int, gid: int) -> frozenset[int] | None:
    """The groups of the peer of the Unix socket FD when it connected (SO_PEERGROUPS), with
    its primary GID; None if the kernel will not say."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _MAX_GROUPS * 4)
    except OSError:
        return None
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw)) | {gid}


def judge(fd: int, access: MonitorAccess, policy: AccessPolicy) -> int | None:
    """The role of the peer of FD on a monitor with ACCESS (the monitor's, lowered by POLICY),
    or None if the monitor does not admit it (logged). What cannot be known counts against
    the peer: unknown credentials or groups get the lowest role the policy names (refused
    where allow-uid or allow-gid would decide)."""
    peer = peer_of(fd)
    if peer is None:
        if access.filters:
            log.info("refused a client: its credentials are unknown")
            return None
        return min(access.role, policy.lowest)
    pid, uid, gid = peer
    groups = frozenset({gid})
    if needs_groups(access, policy):
        known = groups_of(fd, gid)
        if known is not None:
            groups = known
        else:
            if access.allow_gids is not None and uid not in (access.allow_uids or ()):
                log.info("refused a client: uid %d (pid %d): its groups are unknown", uid, pid)
                return None
            return min(access.role, policy.lowest)
    if not access.admits(uid, groups):
        log.info("refused a client: uid %d (pid %d, groups %s) is not among the socket's "
                 "allow-uid/allow-gid", uid, pid, ",".join(map(str, sorted(groups))))
        return None
    return min(access.role, policy.ceiling(uid, groups))
