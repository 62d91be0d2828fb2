"""A child process that makes kernel copies between files while a job goes on.

A job that backs up a sparse image spends as much time in Python (block status, tables) as in
the kernel's copies. A second thread cannot overlap the two in CPython: it needs the GIL after
every copy, while the job's thread holds it (tried: slower than no thread at all). A process
has a GIL of its own. The job sends each copy, its two descriptors passed along (SCM_RIGHTS),
and goes on; the child makes the copies in order and answers each.

The protocol, over a SOCK_SEQPACKET pair (one message per request or answer, native order):
a request is `_REQUEST` (ticket, source offset, target offset, length, reserve first) with the
source's and the target's descriptors; an answer is `_ANSWER` (ticket, bytes copied). The
child copies until the length is done or the kernel stops, at the source's end or at an error:
the parent makes the rest by hand, as after a kernel copy of its own (base.kernel_copy), and
meets the error itself if there is one.

The child exits when the socket closes; and, so that no copy of a dead daemon's lands in an
image another process has opened since, as soon as it finds its parent gone (checked before
every piece of at most 8 MiB). If it dies, the parent makes the copies it left unanswered
(hostfile.PendingCopy).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import threading
from typing import Final

_REQUEST: Final = struct.Struct("=QqqQ?")
_ANSWER: Final = struct.Struct("=QQ")
# Copies sent and not yet answered, at most: each holds two descriptors in flight, which
# the kernel counts against the sender's open-file limit.
MAX_PENDING: Final = 64

# Idle children kept for the next job (one starts in about 20 ms).
MAX_IDLE: Final = 2

# The child, read by `python -I -S -` from its standard input (`ps` shows "- qmpjobd-copier
# FD PARENT"): nothing imported but C modules and ctypes (not socket.py, which brings enum and
# selectors; not ctypes.util, which runs ldconfig), so that it starts in about 20 ms.
_CHILD: Final = r"""
import _socket, array, ctypes, os, signal, struct, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
REQUEST, ANSWER, PIECE = struct.Struct("=QqqQ?"), struct.Struct("=QQ"), 8 << 20
try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
parent = int(sys.argv[3])  # (os.getppid() here would be too late: the parent may be gone)
sock = _socket.socket(fileno=int(sys.argv[2]))
room = _socket.CMSG_SPACE(2 * array.array("i").itemsize)
while True:
    try:
        message, ancillary, _, _ = sock.recvmsg(REQUEST.size, room)
    except OSError:
        break
    if not message:
        break
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    ticket, source_offset, offset, length, reserve = REQUEST.unpack(message)
    copied = 0
    try:
        source, target = fds
        if reserve:
            libc.fallocate(target, 1, offset, length)  # FALLOC_FL_KEEP_SIZE, best effort
        while copied < length:
            if os.getppid() != parent:
                os._exit(0)
            n = os.copy_file_range(source, target, min(length - copied, PIECE),
                                   source_offset + copied, offset + copied)
            if not n:
                break
            copied += n
    except (OSError, ValueError):
        pass  # the parent goes on from here by hand, and meets the error if there is one
    finally:
        for fd in fds:
            os.close(fd)
    try:
        sock.send(ANSWER.pack(ticket, copied))
    except OSError:
        break
"""
class CopierDied(OSError):
    """The child died (or its socket failed) before it answered: the copy is the caller's."""


class Copier:
    """One child process making copies in the order sent; `send` returns a ticket, `result`
    waits for a ticket's answer. Not thread-safe: its image's lock serialises the calls."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child = None
        try:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", "-", "qmpjobd-copier", str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            assert child.stdin is not None
            with child.stdin as program:
                program.write(_CHILD.encode())
        except BaseException:
            ours.close()
            if child is not None:
                child.kill()
                child.wait()
            raise
        finally:
            theirs.close()
        self._child = child
        self._sock = ours
        self._next = 0
        self._answers: dict[int, int] = {}
        self._pending: set[int] = set()
        self._dead = False

    def send(self, source_fd: int, source_offset: int, fd: int, offset: int, length: int,
             reserve: bool) -> int:
        """Start a copy of LENGTH bytes at SOURCE_OFFSET of SOURCE_FD to OFFSET of FD (its
        blocks reserved first if RESERVE); its ticket."""
        while len(self._pending) >= MAX_PENDING and not self._dead:
            self._receive()
        ticket = self._next
        self._next += 1
        self._pending.add(ticket)
        if self._dead:
            return ticket
        try:
            socket.send_fds(self._sock, [_REQUEST.pack(
                ticket, source_offset, offset, length, reserve)], [source_fd, fd])
        except OSError:
            self._died()
        return ticket

    def result(self, ticket: int) -> int:
        """The bytes the copy of TICKET made (fewer than asked: the kernel stopped, and the
        rest is the caller's); CopierDied if the child died first."""
        while ticket not in self._answers:
            if self._dead:
                self._pending.discard(ticket)
                raise CopierDied(errno.EIO, "the copier process died")
            self._receive()
        return self._answers.pop(ticket)

    def _receive(self) -> None:
        try:
            message = self._sock.recv(_ANSWER.size)
        except OSError:
            message = b""
        if len(message) != _ANSWER.size:
            self._died()
            return
        ticket, copied = _ANSWER.unpack(message)
        self._pending.discard(ticket)
        self._answers[ticket] = copied

    def _died(self) -> None:
        # Copies not answered are the caller's to make (`result` raises CopierDied): the
        # child, if it still runs, must not make any of them meanwhile.
        self._dead = True
        self._child.kill()
        self._child.wait()

    @property
    def alive(self) -> bool:
        return not self._dead

    @property
    def pid(self) -> int:
        return self._child.pid

    def close(self) -> None:
        """The child told to go (the socket closed) and waited for."""
        self._sock.close()
        try:
            self._child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()


_idle: list[Copier] = []
_idle_lock = threading.Lock()


def lease() -> Copier:
    """A copier for one job's run of copies: an idle one, or a new one."""
    with _idle_lock:
        while _idle:
            copier = _idle.pop()
            if copier.alive:
                return copier
            copier.close()
    return Copier()


def give_back(copier: Copier) -> None:
    """COPIER, every copy it was sent answered, kept for the next lease (or let go)."""
    with _idle_lock:
        if copier.alive and len(_idle) < MAX_IDLE:
            _idle.append(copier)
            return
    copier.close()
