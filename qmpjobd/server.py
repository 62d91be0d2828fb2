"""The trio I/O shell: listeners, a task pair per connection, bounded output.

Each connection has a reader task, which parses input (qmp.framing), runs it through the
session (qmp.session) and the dispatcher, and a writer task, which drains the connection's
output buffer. Replies and events are appended to that buffer in the order they are produced,
so events a command causes precede its reply. Nothing a connection does can block another: a
client whose unsent output passes `output_limit` bytes is disconnected (and the log says why);
events are never dropped for a client that stays connected. A pipelining client yields after
every few requests, a large message is parsed in a worker thread, and the daemon-wide budgets
and counts of limits.py are enforced here (the client over one is told, then closed).

The protocol's rules are the session's (qmp/session.py): what is refused before a command runs,
and which requests wait in the in-band queue. Without oob, a connection's commands run one at a
time, in order, inline in its reader task (no channel hop). Once a client enables oob, in-band
requests wait in the session's queue, served by a second task, and reading stops while the
session says the queue is full; `exec-oob` requests run at once in the reader task, overtaking
the queue.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import NamedTuple

import trio

from . import systemd
from .access import ADMIN, AccessPolicy, MonitorAccess
from .context import Context, Daemon
from .dispatch import Dispatcher
from .events import Event
from .fdio import FdChannel, ReadinessHub
from .jobs.errors import JobError
from .limits import Limits
from .listen import judge, unlink_socket
from .qmp.errors import QmpError
from .qmp.fastpath import FAST_DEPTH, fast_patterns
from .qmp.framing import JsonSplitter
from .qmp.session import NO_ID, Session

log = logging.getLogger("qmpjobd.server")

RECEIVE_SIZE = 65536
# How many reads a connection may serve back to back before it lets other tasks run.
FAIR_READS = 8
# How many requests of one read a connection may serve back to back before it lets other tasks
# run: a read of 64 KiB holds thousands.
FAIR_COMMANDS = 8
# Input of more bytes than this (with the message it continues) is parsed in a worker thread,
# at most PARSE_THREADS at a time; a smaller message parses in tens of microseconds inline.
PARSE_INLINE_MAX = 4096
PARSE_THREADS = 4
# accept() errors that say the daemon is out of something, for now, and how long to wait then.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY = 0.1
# How long a client that has been told why it is being closed may take to close its end.
LINGER = 2.0
# How long jobs get to end when the daemon shuts down.
SHUTDOWN_GRACE = 5


class Listening(NamedTuple):
    """A monitor socket, bound and listening before the event loop started (see listen.py)."""

    sock: socket.socket
    path: str
    pretty: bool
    access: MonitorAccess = MonitorAccess()
    owned: bool = True  # bound here (its file removed at exit), not passed by systemd


class ServerOptions(NamedTuple):
    version: tuple[int, int, int]
    package: str
    listening: Sequence[Listening] = ()
    # Connections accepted and greeted before the server started, with their listener's index
    # and their role (judged as they were accepted).
    greeted: Sequence[tuple[socket.socket, int, int]] = ()
    # stdin/stdout monitors (their pretty flags and roles).
    stdio: Sequence[tuple[bool, int]] = ()
    # --access-policy: the most each peer may do, by its uid and groups.
    access_policy: AccessPolicy = AccessPolicy()
    limits: Limits = Limits()
    # Called once the server serves every monitor (pidfile, daemonize, "listening on").
    on_ready: Callable[[], None] = lambda: None


def tell(channel: FdChannel, last_words: bytes) -> None:
    """Send a client LAST_WORDS (as much as the socket takes now) and end-of-file."""
    with contextlib.suppress(OSError):
        channel.write_now(last_words)
    channel.shutdown_write()


class Connection:
    """One client: its session, its output buffer and the tasks that serve it."""

    def __init__(
        self, server: Server, channel: FdChannel, pretty: bool, name: str, greeted: bool = False
    ) -> None:
        self.server = server
        self.greeted = greeted
        self.channel = channel
        self.name = name
        self.session = Session(
            version=server.options.version, package=server.options.package, pretty=pretty,
            commands=server.dispatcher.commands,
        )
        self.context = Context(
            self.session, server.daemon, peer=channel.peer_credentials(),
            send_event=self.send_event,
        )
        self._gate = server.daemon.gate
        # Replies that wait for their task change's commit, and what follows them: (the feed's
        # batch to wait for, or 0; the bytes), sent in order by a task while not empty.
        self._feed = server.daemon.tasks.feed
        self._after_commit: collections.deque[tuple[int, bytes]] = collections.deque()
        self._flushing = False
        self._flushed = trio.Event()
        # (The fast path's patterns come from the worker thread Server.run starts: not on the
        # first reply's way.)
        self.splitter = JsonSplitter(compile_patterns=False)
        # Output the kernel has not taken yet. While it is not empty, the writer task waits
        # for the socket to become writable and nobody else writes.
        self._output = bytearray()
        self._blocked = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._closing = False
        self._refused = False  # told why and closing: its input is dropped
        self._subscribed = False
        self._scope = trio.CancelScope()
        # The task serving the session's in-band queue runs once oob is enabled; this wakes it
        # (a request queued, the input ended) and the reader (a request served).
        self._inband_started = False
        self._inband_changed = trio.Event()
        self._input_ended = False
        # Input bytes this client makes the daemon hold (its partial message, its queue).
        self.input_held = 0
        self._inband_done = trio.Event()

    # -- output ----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send DATA now, or after the replies that wait for a commit (send_after_commit)."""
        if self._after_commit:
            self._after_commit.append((0, data))
            return
        self._transmit(data)

    def send_after_commit(self, ticket: int, data: bytes) -> None:
        """Send DATA (a reply) once the task feed's batch TICKET is committed; what the
        connection sends meanwhile follows it."""
        if not self._after_commit and ticket <= self._feed.committed_batch:
            self._transmit(data)
            return
        self._after_commit.append((ticket, data))
        if not self._flushing:
            self._flushing = True
            self._nursery.start_soon(self._flush_after_commit)

    async def _flush_after_commit(self) -> None:
        queue = self._after_commit
        while queue:
            ticket, data = queue[0]
            if ticket > self._feed.committed_batch:
                await self._feed.wait_committed(ticket)
                continue
            queue.popleft()
            self._transmit(data)
        self._flushing = False
        self._flushed.set()
        self._flushed = trio.Event()

    def _transmit(self, data: bytes) -> None:
        """Send DATA now, or queue what the kernel does not take; never blocks. A client whose
        queued output passes the bound is disconnected."""
        if self._closing:
            return
        if not self._output and not self._gate.open:
            # Held (a job's outcome is being committed): the writer sends it in order later.
            self._drained = trio.Event()
            self._blocked.set()
        elif not self._output:
            try:
                written = self.channel.write_now(data)
            except OSError:
                self.close()  # the client is gone; its reader sees the end too
                return
            if written == len(data):
                return
            data = data[written:]
            self._drained = trio.Event()
            self._blocked.set()
        self._output += data
        self.server.output_held += len(data)
        limit = self.server.options.limits.output_limit
        if len(self._output) > limit:
            log.warning(
                "%s: disconnecting: %d bytes of output unsent (limit %d); the client is not "
                "reading", self.name, len(self._output), limit,
            )
            self.close()
        elif self.server.output_held > self.server.options.limits.output_budget:
            self.server.shed_output()

    @property
    def unsent(self) -> int:
        return len(self._output)

    def deliver(self, event: Event) -> None:
        """An event from the bus: TASK_CHANGE only through the connection's watch."""
        if event.name == "TASK_CHANGE":
            watch = self.context.watch
            if watch is not None:
                watch.offer(event)
            return
        self.send(event.encoded(self.session.encode))

    def send_event(self, event: Event) -> None:
        self.send(event.encoded(self.session.encode))

    async def _writer(self) -> None:
        """Finish what `send` could not write at once."""
        while True:
            await self._blocked.wait()
            self._blocked = trio.Event()
            while self._output:
                if not self._gate.open:
                    await self._gate.wait_open()
                await self.channel.wait_writable()
                try:
                    written = self.channel.write_now(self._output)
                except OSError:
                    self.close()
                    return
                del self._output[:written]
                self.server.output_held -= written
            self._drained.set()

    async def drain(self) -> None:
        """Wait until everything queued so far has been handed to the kernel."""
        await self._drained.wait()

    def close(self) -> None:
        self._closing = True
        self._after_commit.clear()
        self.server.output_held -= len(self._output)
        self._output.clear()
        self._drained.set()
        self._scope.cancel()

    def refuse(self, why: str) -> None:
        """Tell the client WHY in one error, then close: its input is read and dropped from
        now on (nothing it sent is served) until it closes too, or LINGER seconds pass, so
        that the error is not lost to a reset."""
        if self._closing:
            return
        tell(self.channel, self.session.error_reply(NO_ID, QmpError("GenericError", why)))
        self._refused = True
        self._closing = True
        self.server.output_held -= len(self._output)
        self._output.clear()
        self._drained.set()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + LINGER)

    # -- input -----------------------------------------------------------------------------

    async def serve(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                if not self.greeted:
                    self.send(self.session.greeting())
                await self._read(nursery)
                # End of input: answer what is queued, let the replies go out, then close.
                if self._inband_started:
                    self._input_ended = True
                    self._signal_inband()
                    await self._inband_done.wait()
                while self._flushing:
                    await self._flushed.wait()
                await self.drain()
                nursery.cancel_scope.cancel()

    async def _read(self, nursery: trio.Nursery) -> None:
        unyielding = 0  # reads in a row that found input waiting, so never yielded
        drained = False  # did the last read take all the kernel had?
        while True:
            if drained:
                await self.channel.wait_readable()
                unyielding = 0
            data = self.channel.read_now(RECEIVE_SIZE)
            if data is None:
                drained = True
                continue
            if not data:
                return
            # A short read took everything there was: wait before reading again.
            drained = len(data) < RECEIVE_SIZE and self.channel.short_read_drains
            unyielding += 1
            if unyielding > FAIR_READS:
                # A client that keeps input coming must not starve the others.
                await trio.lowlevel.checkpoint()
                unyielding = 0
            if self._refused:
                continue
            before = self.splitter.buffered
            if before + len(data) > PARSE_INLINE_MAX:
                # A large message: QEMU's lexer, in Python, takes a while over one; in a worker
                # thread it only costs the loop its share of the GIL, so others are served.
                items = await trio.to_thread.run_sync(
                    self.splitter.feed, data, limiter=self.server.parse_limiter
                )
            else:
                items = self.splitter.feed(data)
            after = self.splitter.buffered
            self._hold(after - before)
            # The bytes the messages took, shared out among them: a queued request holds its
            # share until it has been served.
            share = (before + len(data) - after) // max(len(items), 1)
            for served, item in enumerate(items, 1):
                if self._closing:
                    break  # cut off or refused: nothing it sent is served any more
                if self._inband_started and self.session.queues(item):
                    while self.session.inband_full:
                        await self._inband_changed.wait()
                    self._hold(share)
                    self.session.enqueue(item, share)
                    self._signal_inband()
                else:
                    await self._handle(item)
                    if self.session.oob_enabled and not self._inband_started:
                        self._inband_started = True
                        nursery.start_soon(self._serve_inband)
                    if served % FAIR_COMMANDS == 0:
                        # A client that pipelines many requests must not starve the others.
                        await trio.lowlevel.checkpoint()

    def _hold(self, n: int) -> None:
        """Count N more bytes of input held (negative: released), against the budget."""
        if self._refused:
            return  # all it held was released when it was refused
        self.input_held += n
        server = self.server
        server.input_held += n
        if n > 0 and server.input_held > server.options.limits.input_budget:
            server.shed_input()

    def release_input(self) -> None:
        """The connection ends: what it held is free."""
        self.server.input_held -= self.input_held
        self.input_held = 0

    def _signal_inband(self) -> None:
        self._inband_changed.set()
        self._inband_changed = trio.Event()

    async def _serve_inband(self) -> None:
        """Serve the session's in-band queue, in order, until the input has ended and the
        queue is empty."""
        while True:
            taken = self.session.next_inband()
            if taken is None:
                if self._input_ended:
                    break
                await self._inband_changed.wait()
                continue
            item, share = taken
            self._hold(-share)
            try:
                if not self._refused:
                    await self._handle(item)
            finally:
                self.session.served()
                self._signal_inband()
        self._inband_done.set()

    async def _handle(self, item: object) -> None:
        session = self.session
        request = session.receive(item)
        if isinstance(request, bytes):
            self.send(request)
            return
        try:
            value = await self.server.dispatcher.run(self.context, request)
        except QmpError as error:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s: %s: %s", self.name, request.command, error.cls, error.desc,
                          extra={"client": self.name})
            self.context.reply_after = 0
            self.send(session.error_reply(request.id, error))
        else:
            if log.isEnabledFor(logging.DEBUG):  # (every command passes here)
                log.debug("%s: %s: ok", self.name, request.command, extra={"client": self.name})
            commit, self.context.reply_after = self.context.reply_after, 0
            if commit:
                self.send_after_commit(commit, session.reply(request, value))
            else:
                self.send(session.reply(request, value))
        after, self.context.after_reply = self.context.after_reply, []
        for action in after:
            action()
        if not self._subscribed and session.negotiated:
            self._subscribed = True
            self.server.daemon.events.subscribe(self.deliver)

    def unsubscribe(self) -> None:
        if self._subscribed:
            self.server.daemon.events.unsubscribe(self.deliver)
            self._subscribed = False


class Server:
    def __init__(self, options: ServerOptions, daemon: Daemon, dispatcher: Dispatcher) -> None:
        self.options = options
        self.daemon = daemon
        self.dispatcher = dispatcher
        self.connections: set[Connection] = set()
        self._quit = trio.Event()
        self._counter = 0
        self.parse_limiter = trio.CapacityLimiter(PARSE_THREADS)
        # Across all connections: input held, output unsent (limits.py's budgets).
        self.input_held = 0
        self.output_held = 0
        self.hub = ReadinessHub()
        daemon.quit_requested = self._quit.set

    async def run(self) -> None:
        """Serve every monitor until quit, SIGTERM or SIGINT; then close down cleanly."""
        options = self.options
        listeners = [
            trio.SocketListener(trio.socket.from_stdlib_socket(m.sock)) for m in options.listening
        ]
        try:
            async with trio.open_nursery() as nursery:
                self.daemon.jobs.run_in(nursery)
                nursery.start_soon(self.daemon.tasks.run)
                for listener, monitor in zip(listeners, options.listening, strict=True):
                    nursery.start_soon(self._accept_loop, listener, monitor)
                for conn, index, role in options.greeted:
                    monitor = options.listening[index]
                    fd = conn.detach()
                    channel = FdChannel(fd, fd, (fd,), self.hub)
                    nursery.start_soon(self._serve, channel, monitor.pretty,
                                       self._name(monitor.path), True, role)
                for pretty, role in options.stdio:
                    nursery.start_soon(self._serve_stdio, pretty, role)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(trio.to_thread.run_sync, fast_patterns, FAST_DEPTH)
                options.on_ready()
                await self._quit.wait()
                systemd.notify("STOPPING=1")
                await self._stop_jobs()
                await self.daemon.graph.close_all()
                await self.daemon.tasks.close()
                await self._flush_all()
                nursery.cancel_scope.cancel()
        finally:
            self.hub.close()
            for listener, monitor in zip(listeners, options.listening, strict=True):
                await listener.aclose()
                if monitor.owned:
                    unlink_socket(monitor.path)

    def _name(self, path: str) -> str:
        self._counter += 1
        return f"{path}#{self._counter}"

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                self._quit.set()
                return

    async def _stop_jobs(self) -> None:
        """Cancel every job still alive, as QEMU does at exit, so that clients see them end
        (their events go out before the connections close)."""
        jobs = [job for job in self.daemon.jobs.jobs() if not job.finished]
        for job in jobs:
            with contextlib.suppress(JobError):
                job.cancel(force=True)
        with trio.move_on_after(SHUTDOWN_GRACE):
            for job in jobs:
                while not job.finished:
                    await job.changed()

    async def _flush_all(self) -> None:
        # Give replies already produced (quit's own) a moment to reach their clients.
        with trio.move_on_after(1):
            for connection in list(self.connections):
                await connection.drain()

    async def _accept_loop(self, listener: trio.SocketListener, monitor: Listening) -> None:
        path = monitor.path
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _OUT_OF_RESOURCES:
                        raise
                    # Out of descriptors (or memory): the client waits in the backlog until
                    # one that is served leaves. Retrying at once would spin.
                    log.warning("%s: cannot accept a client now: %s", path, exc.strerror)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                fd = stream.socket.detach()  # the connection owns the fd from here on
                channel = FdChannel(fd, fd, (fd,), self.hub)
                nursery.start_soon(self._admit, channel, monitor)

    async def _admit(self, channel: FdChannel, monitor: Listening) -> None:
        """Serve a client of MONITOR with its role; close it unseen if the socket's allow-uid
        and allow-gid leave it out (as the early greeter does for those it greets)."""
        access, policy = monitor.access, self.options.access_policy
        role: int | None = access.role
        if access.filters or policy:
            role = await trio.to_thread.run_sync(judge, channel.read_fd, access, policy)
        if role is None:
            channel.close()
            return
        await self._serve(channel, monitor.pretty, self._name(monitor.path), False, role)

    async def _serve_stdio(self, pretty: bool, role: int) -> None:
        read_fd, write_fd = os.dup(0), os.dup(1)
        channel = FdChannel(read_fd, write_fd, (read_fd, write_fd), self.hub)
        await self._serve(channel, pretty, "stdio", role=role)

    def shed_input(self) -> None:
        """Over the input budget: the client holding the most input is told and closed."""
        hog = max(self.connections, key=lambda c: c.input_held)
        log.warning("%s: disconnecting: it holds %d bytes of input and all clients together "
                    "more than the budget (%d)", hog.name, hog.input_held,
                    self.options.limits.input_budget)
        hog.refuse("The daemon's input budget is exhausted; closing the connection that "
                   "holds the most")
        hog.release_input()

    def shed_output(self) -> None:
        """Over the output budget: the client with the most unsent output is disconnected."""
        hog = max(self.connections, key=lambda c: c.unsent)
        log.warning("%s: disconnecting: %d bytes of output unsent, all clients together more "
                    "than the budget (%d)", hog.name, hog.unsent,
                    self.options.limits.output_budget)
        hog.close()

    async def _serve(
        self, channel: FdChannel, pretty: bool, name: str, greeted: bool = False,
        role: int = ADMIN,
    ) -> None:
        connection = Connection(self, channel, pretty, name, greeted)
        connection.context.role = role
        limit = self.options.limits.max_clients
        if len(self.connections) >= limit:
            log.warning("%s: refused: %d clients already (the limit)", name, limit,
                        extra={"client": name})
            why = QmpError("GenericError", f"Too many clients: the daemon serves at most "
                           f"{limit} at once")
            tell(channel, connection.session.error_reply(NO_ID, why))
            with trio.move_on_after(LINGER):
                while (data := channel.read_now(RECEIVE_SIZE)) != b"":
                    if data is None:
                        await channel.wait_readable()
            channel.close()
            return
        self.connections.add(connection)
        peer = connection.context.peer
        log.debug("%s: connected%s", name, "" if peer is None else
                  f" (uid {peer[0]}, pid {peer[1]})", extra={"client": name})
        try:
            await connection.serve()
        except Exception:
            # A bug must cost at most this connection, never the daemon.
            log.exception("%s: connection failed", name)
        finally:
            connection.unsubscribe()
            connection.release_input()
            self.connections.discard(connection)
            channel.close()
            log.debug("%s: disconnected", name, extra={"client": name})
