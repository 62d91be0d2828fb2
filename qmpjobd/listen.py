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
import os
import selectors
import socket
import stat
import threading


class SocketInUse(Exception):
    """Another live daemon answers on the socket path."""


def bind_unix_socket(path: str) -> socket.socket:
    """A listening socket at PATH, mode 0600. A socket file whose daemon still answers is never
    taken over (SocketInUse); a stale one, left by a daemon that was killed, is replaced."""
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
    sock.listen(socket.SOMAXCONN)
    return sock


def unlink_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class EarlyGreeter:
    """Accepts connections on listening sockets and greets them, in a thread, until `stop`."""

    def __init__(self, listeners: list[tuple[socket.socket, bytes]]) -> None:
        # Each listener with the greeting its clients get (monitors differ in pretty=on).
        self._listeners = listeners
        self._accepted: list[tuple[socket.socket, int]] = []
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="qmpjobd-greeter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[tuple[socket.socket, int]]:
        """Stop greeting; the connections greeted so far, each with its listener's index."""
        os.write(self._stop_write, b"x")
        self._thread.join()
        os.close(self._stop_read)
        os.close(self._stop_write)
        return self._accepted

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._stop_read, selectors.EVENT_READ, None)
            for index, (listener, _) in enumerate(self._listeners):
                selector.register(listener, selectors.EVENT_READ, index)
            while True:
                for key, _ in selector.select():
                    if key.data is None:
                        return
                    self._greet(key.data)

    def _greet(self, index: int) -> None:
        listener, greeting = self._listeners[index]
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # the client gave up already
        try:
            conn.sendall(greeting)  # a few hundred bytes into an empty socket buffer
        except OSError:
            conn.close()
            return
        self._accepted.append((conn, index))
