"""qmpjob's live views, `watch` and `events`, on trio and the sans-IO protocol core.

A connection here is two parties: a reader task that hands each reply to the command waiting
for it and each event to the view, and the view, which runs commands and dialogues
(queries.py), draws, and waits for whichever comes first: an event or its next look. Only these
views import trio (and rich, for watch): the one-shot subcommands start without either.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ..qmp.client import ClientProtocol, CommandFailed, ProtocolError, reply_value
from . import render
from .connection import ConnectFailed
from .outcomes import Outcomes, follow
from .queries import entry, rows

if TYPE_CHECKING:
    from .queries import Dialogue, T

TIMEOUT = 30.0  # seconds for the greeting, and for each reply


class LiveConnection:
    """A negotiated QMP connection, read by a task of its own (made by `connect`)."""

    def __init__(self, stream: trio.SocketStream, path: str) -> None:
        self.path = path
        self._stream = stream
        self._protocol = ClientProtocol()
        self._greeted = trio.Event()
        self._waiting: dict[str, trio.Event] = {}  # request id -> set once its reply is in
        self._replies: dict[str, dict[str, Any]] = {}
        self._failure: ConnectFailed | ProtocolError | None = None
        events: tuple[trio.MemorySendChannel[tuple[dict[str, Any], str]],
                      trio.MemoryReceiveChannel[tuple[dict[str, Any], str]]]
        events = trio.open_memory_channel(math.inf)  # (as the blocking client keeps them all)
        self._events_in, self._events = events

    async def _read(self) -> None:
        """Until the daemon goes away or breaks the protocol: then every waiter is woken, to
        find the failure."""
        try:
            while True:
                try:
                    data = await self._stream.receive_some(1 << 16)
                except (OSError, trio.BrokenResourceError) as e:
                    raise ConnectFailed(f"the daemon at {self.path} went away: {e}") from None
                if not data:
                    raise ConnectFailed(f"the daemon at {self.path} closed the connection")
                for message, text in self._protocol.receive_text(data):
                    self._take(message, text)
        except (ConnectFailed, ProtocolError) as e:
            self._failure = e
            self._greeted.set()
            for waiter in self._waiting.values():
                waiter.set()
            self._events_in.close()

    def _take(self, message: dict[str, Any], text: str) -> None:
        if not self._greeted.is_set():  # (the protocol core checked that it is one)
            self._greeted.set()
        elif "event" in message:
            self._events_in.send_nowait((message, text))
        else:
            request_id = message.get("id")
            waiter = self._waiting.pop(request_id, None) if isinstance(request_id, str) else None
            if waiter is None:
                raise ProtocolError(f"a reply to no command of ours: {message!r}")
            self._replies[str(request_id)] = message
            waiter.set()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(*self._failure.args)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """COMMAND's return value; its error raised as CommandFailed."""
        self._raise_failure()
        request_id, data = self._protocol.command(command, arguments)
        done = self._waiting[request_id] = trio.Event()
        try:
            await self._stream.send_all(data)
        except (OSError, trio.BrokenResourceError) as e:
            raise ConnectFailed(f"the daemon at {self.path} went away: {e}") from None
        with trio.move_on_after(TIMEOUT):
            await done.wait()
        self._raise_failure()
        if request_id not in self._replies:
            raise ConnectFailed(f"no reply to {command} within {TIMEOUT:g} s")
        return reply_value(self._replies.pop(request_id))

    async def run(self, dialogue: Dialogue[T]) -> T:
        """What DIALOGUE returns, its commands run one after the other (queries.py)."""
        try:
            request = next(dialogue)
            while True:
                try:
                    value = await self.execute(*request)
                except CommandFailed as e:
                    request = dialogue.throw(e)
                else:
                    request = dialogue.send(value)
        except StopIteration as done:
            result: T = done.value
            return result

    async def next_event(self) -> tuple[dict[str, Any], str]:
        """The next event, and its text as the daemon sent it."""
        try:
            return await self._events.receive()
        except trio.EndOfChannel:
            self._raise_failure()
            raise  # (not reached: the channel closes only on a failure)

    async def next_events(self) -> list[dict[str, Any]]:
        """The next event, and those that came with it."""
        found = [(await self.next_event())[0]]
        while True:
            try:
                found.append(self._events.receive_nowait()[0])
            except trio.WouldBlock:
                return found
            except trio.EndOfChannel:
                self._raise_failure()
                raise


@asynccontextmanager
async def connect(path: str) -> AsyncIterator[LiveConnection]:
    """A LiveConnection to the daemon at PATH, greeted and negotiated."""
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as e:
        raise ConnectFailed(f"cannot connect to {path}: {e.strerror or e}") from None
    async with stream, trio.open_nursery() as nursery:
        conn = LiveConnection(stream, path)
        nursery.start_soon(conn._read)
        with trio.move_on_after(TIMEOUT):
            await conn._greeted.wait()
        conn._raise_failure()
        if not conn._greeted.is_set():
            raise ConnectFailed(f"no QMP greeting from {path} within {TIMEOUT:g} s")
        await conn.execute("qmp_capabilities")
        yield conn
        nursery.cancel_scope.cancel()


# -- the views -----------------------------------------------------------------------------------

async def events(path: str, args: argparse.Namespace) -> int:
    """Every event, as it comes: a readable line, or (--json) the daemon's own text, one
    line each (a pretty monitor's many-line text is written compact instead)."""
    async with connect(path) as conn:
        while True:
            event, text = await conn.next_event()
            if args.json and "\n" in text:
                text = json.dumps(event, separators=(",", ":"))
            print(text if args.json else render.event_line(event), flush=True)


def watch_rows(outcomes: Outcomes | None) -> Dialogue[list[dict[str, Any]]]:
    """The jobs and running tasks, and the IDs followed however they ended."""
    found = yield from rows(False)
    if outcomes is not None:
        shown = {row["uuid"] for row in found}
        now = time.time()
        found += [entry("task", ident, task["type"], task["status"], task, now,
                        task["progress"], None, None)
                  for uuid, (ident, task) in outcomes.tasks.items() if uuid not in shown]
    return found


async def watch(path: str, args: argparse.Namespace) -> int:
    """The live view, until the IDs asked for have ended (with none: until interrupted)."""
    from .watch import draw  # rich

    async with connect(path) as conn:
        outcomes = await conn.run(follow(args.ids)) if args.ids else None

        def fetch() -> Awaitable[list[dict[str, Any]]]:
            return conn.run(watch_rows(outcomes))

        await draw(outcomes, fetch, conn.next_events)
    return 0 if outcomes is None or outcomes.report() else 1


VIEWS: dict[str, Callable[[str, argparse.Namespace], Awaitable[int]]] = {
    "events": events, "watch": watch,
}


def view(path: str, args: argparse.Namespace) -> int:
    """Run the live view ARGS names. Its exceptions come out as themselves, not in a group
    (main() tells the user about each kind)."""
    try:
        return trio.run(VIEWS[args.command], path, args)
    except BaseExceptionGroup as group:
        raise _single(group) from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a group of nurseries wraps (the first, if there are several)."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found
