"""A QMP connection over a blocking Unix socket, for the one-shot `qmpjob` subcommands: connect,
negotiate, run commands and dialogues (queries.py), read events as they come."""

from __future__ import annotations

import _socket  # socket's C core: the Python module and its enums cost a one-shot client 3 ms
import collections
import select
import time

from ..qmp.client import ClientProtocol, CommandFailed, ProtocolError, reply_value

# typing itself would cost a one-shot client 3 ms to load (mypy reads this as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .queries import Dialogue, T


class ConnectFailed(Exception):
    """The daemon could not be reached, or went away."""


class Connection:
    """A negotiated QMP connection to the daemon at PATH. Events that arrive while a command
    waits for its reply are kept, in order, for `next_event`."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.protocol = ClientProtocol()
        self.events: collections.deque[dict[str, Any]] = collections.deque()
        self._received: collections.deque[dict[str, Any]] = collections.deque()
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise ConnectFailed(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            if not self._next_message(time.monotonic() + timeout):
                raise ConnectFailed(f"no QMP greeting from {path} within {timeout:g} s")
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """COMMAND's return value; its error raised as CommandFailed."""
        request_id, data = self.protocol.command(command, arguments)
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ConnectFailed(f"the daemon at {self.path} went away: {e.strerror}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._next_message(deadline)
            if not message:
                raise ConnectFailed(f"no reply to {command} within {self.timeout:g} s")
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == request_id:
                return reply_value(message)
            else:
                raise ProtocolError(f"a reply to no command of ours: {message!r}")

    def run(self, dialogue: Dialogue[T]) -> T:
        """What DIALOGUE returns, its commands run one after the other (queries.py)."""
        try:
            request = next(dialogue)
            while True:
                try:
                    value = self.execute(*request)
                except CommandFailed as e:
                    request = dialogue.throw(e)
                else:
                    request = dialogue.send(value)
        except StopIteration as done:
            result: T = done.value
            return result

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event (those kept first); None if none came within TIMEOUT seconds
        (None: wait as long as it takes)."""
        if self.events:
            return self.events.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        message = self._next_message(deadline)
        if message and "event" not in message:
            raise ProtocolError(f"a reply to no command of ours: {message!r}")
        return message or None

    def _next_message(self, deadline: float | None) -> dict[str, Any]:
        """The next message; {} once DEADLINE has passed."""
        while not self._received:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.sock], [], [], wait)
            if not readable:
                return {}
            try:
                data = self.sock.recv(1 << 16)
            except OSError as e:
                raise ConnectFailed(f"the daemon at {self.path} went away: {e.strerror}") from None
            if not data:
                raise ConnectFailed(f"the daemon at {self.path} closed the connection")
            self._received.extend(self.protocol.receive(data))
        return self._received.popleft()
