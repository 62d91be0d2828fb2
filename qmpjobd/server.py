"""The trio I/O shell: listeners, a task pair per connection, bounded output.

Each connection has a reader task, which parses input (qmp.framing), runs it through the
session (qmp.session) and the dispatcher, and a writer task, which drains the connection's
output buffer. Replies and events are appended to that buffer in the order they are produced,
so events a command causes precede its reply. Nothing a connection does can block another: a
client whose unsent output passes `output_limit` bytes is disconnected (and the log says why);
events are never dropped for a client that stays connected.

Without oob, a connection's commands run one at a time, in order, inline in its reader task (no
channel hop). Once a client enables oob, in-band commands go to a queue of at most
`INBAND_QUEUE` requests served by a second task, and reading stops while the queue is full;
`exec-oob` requests run at once in the reader task, overtaking the queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .dispatch import Context, Daemon, Dispatcher
from .events import Event
from .fdio import FdChannel
from .qmp.errors import QmpError
from .qmp.framing import JsonSplitter
from .qmp.session import Request, Session

log = logging.getLogger("qmpjobd.server")

# QEMU's limit on queued in-band requests once oob is enabled.
INBAND_QUEUE = 8
RECEIVE_SIZE = 65536
# How many reads a connection may serve back to back before it lets other tasks run.
FAIR_READS = 8
DEFAULT_OUTPUT_LIMIT = 8 * 1024 * 1024


@dataclass(frozen=True)
class MonitorSpec:
    """A QMP monitor: a Unix socket path, or None for stdin/stdout."""

    path: str | None
    pretty: bool = False


@dataclass
class ServerOptions:
    monitors: list[MonitorSpec]
    version: tuple[int, int, int]
    package: str
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    # Ready callback: called once every socket listens (pidfile, daemonize, "listening on").
    on_ready: Callable[[list[str]], None] = field(default=lambda paths: None)


class SocketInUse(Exception):
    """Another live daemon answers on the socket path."""


class Connection:
    """One client: its session, its output buffer and the tasks that serve it."""

    def __init__(self, server: Server, channel: FdChannel, pretty: bool, name: str) -> None:
        self.server = server
        self.channel = channel
        self.name = name
        self.session = Session(
            version=server.options.version, package=server.options.package, pretty=pretty
        )
        self.context = Context(self.session, server.daemon)
        self.splitter = JsonSplitter()
        # Output the kernel has not taken yet. While it is not empty, the writer task waits
        # for the socket to become writable and nobody else writes.
        self._output = bytearray()
        self._blocked = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._closing = False
        self._subscribed = False
        self._scope = trio.CancelScope()
        self._inband_send: trio.MemorySendChannel[object] | None = None

    # -- output ----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send DATA now, or queue what the kernel does not take; never blocks. A client whose
        queued output passes the bound is disconnected."""
        if self._closing:
            return
        if not self._output:
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
        if len(self._output) > self.server.options.output_limit:
            log.warning(
                "%s: disconnecting: %d bytes of output unsent (limit %d); the client is not "
                "reading", self.name, len(self._output), self.server.options.output_limit,
            )
            self.close()

    def deliver(self, event: Event) -> None:
        self.send(event.encoded(self.session.encode))

    async def _writer(self) -> None:
        """Finish what `send` could not write at once."""
        while True:
            await self._blocked.wait()
            self._blocked = trio.Event()
            while self._output:
                await self.channel.wait_writable()
                try:
                    written = self.channel.write_now(self._output)
                except OSError:
                    self.close()
                    return
                del self._output[:written]
            self._drained.set()

    async def drain(self) -> None:
        """Wait until everything queued so far has been handed to the kernel."""
        await self._drained.wait()

    def close(self) -> None:
        self._closing = True
        self._output.clear()
        self._drained.set()
        self._scope.cancel()

    # -- input -----------------------------------------------------------------------------

    async def serve(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                self.send(self.session.greeting())
                await self._read(nursery)
                # End of input: let the replies already produced go out, then close.
                await self.drain()
                nursery.cancel_scope.cancel()

    async def _read(self, nursery: trio.Nursery) -> None:
        unyielding = 0  # reads in a row that found input waiting, so never yielded
        drained = False  # did the last read empty the kernel's buffer?
        while True:
            if drained:
                # Input will most likely come later: wait for it rather than ask in vain.
                await self.channel.wait_readable()
                unyielding = 0
            data = self.channel.read_now(RECEIVE_SIZE)
            if data is None:
                drained = True
                continue
            if not data:
                return
            drained = len(data) < RECEIVE_SIZE
            unyielding += 1
            if unyielding > FAIR_READS:
                # A client that keeps input coming must not starve the others.
                await trio.lowlevel.checkpoint()
                unyielding = 0
            for item in self.splitter.feed(data):
                if self._inband_send is not None and not Session.is_oob(item):
                    await self._inband_send.send(item)
                else:
                    await self._handle(item)
                    if self.session.oob_enabled and self._inband_send is None:
                        self._start_inband_queue(nursery)

    def _start_inband_queue(self, nursery: trio.Nursery) -> None:
        # Capacity INBAND_QUEUE - 1 plus the request being served: at most INBAND_QUEUE wait.
        send, receive = trio.open_memory_channel[object](INBAND_QUEUE - 1)
        self._inband_send = send

        async def serve_queue() -> None:
            async for item in receive:
                await self._handle(item)

        nursery.start_soon(serve_queue)

    async def _handle(self, item: object) -> None:
        accepted = self.session.accept(item)
        if isinstance(accepted, bytes):
            self.send(accepted)
            return
        self.send(await self._run(accepted))
        if self.session.negotiated and not self._subscribed:
            self._subscribed = True
            self.server.daemon.events.subscribe(self.deliver)

    async def _run(self, request: Request) -> bytes:
        try:
            value = await self.server.dispatcher.run(self.context, request)
        except QmpError as error:
            return self.session.error_reply(request.id, error)
        return self.session.reply(request, value)

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
        daemon.quit_requested = self._quit.set

    async def run(self) -> None:
        """Listen on every monitor until quit, SIGTERM or SIGINT; then close down cleanly."""
        listeners: list[tuple[trio.SocketListener, str]] = []
        try:
            for monitor in self.options.monitors:
                if monitor.path is not None:
                    listeners.append((await bind_unix_socket(monitor.path), monitor.path))
            self.options.on_ready([path for _, path in listeners])
            async with trio.open_nursery() as nursery:
                for (listener, path), monitor in zip(
                    listeners, [m for m in self.options.monitors if m.path], strict=True
                ):
                    nursery.start_soon(self._accept_loop, listener, path, monitor.pretty)
                for monitor in self.options.monitors:
                    if monitor.path is None:
                        nursery.start_soon(self._serve_stdio, monitor.pretty)
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                await self._quit.wait()
                await self._flush_all()
                nursery.cancel_scope.cancel()
        finally:
            for listener, path in listeners:
                await listener.aclose()
                _unlink_socket(path)

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        import signal

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                self._quit.set()
                return

    async def _flush_all(self) -> None:
        # Give replies already produced (quit's own) a moment to reach their clients.
        with trio.move_on_after(1):
            for connection in list(self.connections):
                await connection.drain()

    async def _accept_loop(self, listener: trio.SocketListener, path: str, pretty: bool) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                fd = stream.socket.detach()  # the connection owns the fd from here on
                self._counter += 1
                channel = FdChannel(fd, fd, owned=(fd,))
                nursery.start_soon(self._serve, channel, pretty, f"{path}#{self._counter}")

    async def _serve_stdio(self, pretty: bool) -> None:
        read_fd, write_fd = os.dup(0), os.dup(1)
        channel = FdChannel(read_fd, write_fd, owned=(read_fd, write_fd))
        await self._serve(channel, pretty, "stdio")

    async def _serve(self, channel: FdChannel, pretty: bool, name: str) -> None:
        connection = Connection(self, channel, pretty, name)
        self.connections.add(connection)
        log.debug("%s: connected", name)
        try:
            await connection.serve()
        except Exception:
            # A bug must cost at most this connection, never the daemon.
            log.exception("%s: connection failed", name)
        finally:
            connection.unsubscribe()
            self.connections.discard(connection)
            channel.close()
            log.debug("%s: disconnected", name)


# -- Unix sockets ------------------------------------------------------------------------------


async def bind_unix_socket(path: str) -> trio.SocketListener:
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
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket file is created by bind(); the umask makes it 0600 from the first instant.
    old_umask = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(socket.SOMAXCONN)
    return trio.SocketListener(sock)


def _unlink_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

