"""A connection's file descriptors, driven the way the request path wants them: make the
system call now, and wait only when it would block.

Waiting for input goes through a `ReadinessHub`: one edge-triggered epoll set, registered once
per connection. With trio's own wait_readable, every wait re-arms the descriptor (a system call
and some bookkeeping per request) and every readable socket wakes through trio's I/O loop on its
own; with the hub a request on an idle connection costs one read and one write, and one
epoll_wait serves every connection that became readable at the same time.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat

import outcome
import trio

from .access import peer_of

# Errors that mean the peer is gone.
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_INPUT = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_ENDED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# Why a waiting task was woken.
_READY, _LEAD = "ready", "lead"


class ReadinessHub:
    """Edge-triggered readiness for many descriptors, delivered to the tasks waiting on them.

    One waiting task at a time, the leader, waits on the epoll set itself (trio wakes it) and
    hands out what it finds: its own descriptor ready, it goes on and makes another waiter the
    leader; others ready, it wakes their tasks. A lone busy connection so costs no more task
    switches than waiting on its own socket; many busy connections share one epoll_wait.

    Edge-triggered: epoll reports new input once. A task reads until the kernel has nothing
    more (or got a short read, which means the same) before it waits again; an edge that comes
    while nobody waits on that descriptor is kept in `_pending`, and a hang-up in `_hungup`
    (after a hang-up, reads return the end at once, so waiting is never needed again).
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiters: dict[int, trio.lowlevel.Task] = {}
        self._pending: set[int] = set()
        self._hungup: set[int] = set()
        self._leader: trio.lowlevel.Task | None = None

    def register(self, fd: int) -> bool:
        """Watch FD; False if epoll cannot (a regular file on stdin, say)."""
        try:
            self._epoll.register(fd, _INPUT)
        except PermissionError:
            return False
        self._pending.add(fd)  # whatever is already there has raised no edge yet
        return True

    def unregister(self, fd: int) -> None:
        """Stop watching FD; call before closing it, as its number may be reused."""
        if not self._epoll.closed:
            self._epoll.unregister(fd)
        self._pending.discard(fd)
        self._hungup.discard(fd)
        # Nobody may wait on a descriptor that is going away: its reader task has ended.
        assert fd not in self._waiters, "unregistering a descriptor a task waits on"

    async def wait_readable(self, fd: int) -> None:
        me = trio.lowlevel.current_task()
        while True:
            if fd in self._hungup:
                await trio.lowlevel.checkpoint()
                return
            if fd in self._pending:
                self._pending.discard(fd)
                await trio.lowlevel.checkpoint()
                return
            if self._leader is None or self._leader is me:
                self._leader = me
                try:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                    mine = self._hand_out(fd)
                except BaseException:
                    self._leader = None
                    self._promote()
                    raise
                if mine:
                    self._leader = None
                    self._promote()
                    return
                continue  # not ours yet: lead on
            self._waiters[fd] = me

            def abort(_: object) -> trio.lowlevel.Abort:
                self._waiters.pop(fd, None)
                return trio.lowlevel.Abort.SUCCEEDED

            if await trio.lowlevel.wait_task_rescheduled(abort) == _READY:
                return
            # Made the leader: loop round and lead.

    def _hand_out(self, own: int) -> bool:
        """Deliver what epoll reports; whether OWN is among it."""
        mine = False
        for fd, events in self._epoll.poll(0):
            if events & _ENDED:
                self._hungup.add(fd)
            if fd == own:
                mine = True
                continue
            task = self._waiters.pop(fd, None)
            if task is None:
                self._pending.add(fd)
            else:
                trio.lowlevel.reschedule(task, outcome.Value(_READY))
        return mine

    def _promote(self) -> None:
        """Make a waiting task the leader, so that someone keeps watching."""
        if self._waiters:
            fd = next(iter(self._waiters))
            task = self._waiters.pop(fd)
            trio.lowlevel.reschedule(task, outcome.Value(_LEAD))

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._epoll.fileno())
        self._epoll.close()


class FdChannel:
    def __init__(
        self, read_fd: int, write_fd: int, owned: tuple[int, ...], hub: ReadinessHub | None
    ) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._owned = owned
        for fd in {read_fd, write_fd}:
            os.set_blocking(fd, False)
        self._hub = hub if hub is not None and hub.register(read_fd) else None
        # On a socket or a pipe a short read took all there was; a terminal gives a line at a
        # time, so there only a read that would block says so.
        self.short_read_drains = stat.S_ISSOCK(os.fstat(read_fd).st_mode) or stat.S_ISFIFO(
            os.fstat(read_fd).st_mode
        )
        # Regular files are always readable, and epoll refuses them.
        self._pollable = not stat.S_ISREG(os.fstat(read_fd).st_mode)

    def peer_credentials(self) -> tuple[int, int] | None:
        """(uid, pid) of the process at the other end of a Unix socket (SO_PEERCRED); None for
        anything else (stdio)."""
        if not stat.S_ISSOCK(os.fstat(self.read_fd).st_mode):
            return None
        peer = peer_of(self.read_fd)
        if peer is None:
            return None
        pid, uid, _gid = peer
        return uid, pid

    def read_now(self, size: int) -> bytes | None:
        """What the kernel holds (b'' at end of input or if the peer is gone), or None if
        reading would block."""
        try:
            return os.read(self.read_fd, size)
        except BlockingIOError:
            return None
        except _GONE:
            return b""
        except OSError as exc:
            if exc.errno == errno.EBADF:
                return b""
            raise

    async def wait_readable(self) -> None:
        """Wait for input. With a hub: only after a read found the kernel's buffer empty (None)
        or took less than it asked for."""
        if self._hub is not None:
            await self._hub.wait_readable(self.read_fd)
        elif self._pollable:
            await trio.lowlevel.wait_readable(self.read_fd)
        else:
            await trio.lowlevel.checkpoint()

    def write_now(self, data: bytes | bytearray | memoryview) -> int:
        """Bytes written (0 if writing would block); raises ConnectionError if the peer is gone."""
        try:
            return os.write(self.write_fd, data)
        except BlockingIOError:
            return 0

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.write_fd)

    def shutdown_write(self) -> None:
        """Send end-of-file, still reading: a peer that has unread input of ours in flight
        then sees our last words rather than a reset."""
        if stat.S_ISSOCK(os.fstat(self.write_fd).st_mode):
            sock = socket.socket(fileno=self.write_fd)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # gone already
            finally:
                sock.detach()

    def close(self) -> None:
        if self._hub is not None:
            self._hub.unregister(self.read_fd)
            self._hub = None
        for fd in self._owned:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        self._owned = ()
