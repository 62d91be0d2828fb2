"""The event bus: one emit, stamped once, fanned out to every negotiated client.

Publishers (jobs, block graph, commands, the task feed) call `emit(name, data)`; each
subscriber is a callable that queues the event on its connection (or, the task recorder, keeps
task records in step). Delivery is synchronous and never blocks: a subscriber
that cannot keep up is disconnected by its connection's own output bound, never skipped, so a
connected client sees every event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio


class Event:
    """One emitted event. `message` is the wire object; encodings are cached per format."""

    __slots__ = ("_encoded", "message", "name")

    def __init__(self, name: str, data: dict[str, Any] | None, now: float) -> None:
        seconds = int(now)
        message: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
            "event": name,
        }
        if data is not None:
            message["data"] = data
        self.name = name
        self.message = message
        self._encoded: dict[Callable[[object], bytes], bytes] = {}

    def encoded(self, encoder: Callable[[object], bytes]) -> bytes:
        cached = self._encoded.get(encoder)
        if cached is None:
            cached = self._encoded[encoder] = encoder(self.message)
        return cached


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        event = Event(name, data, self._clock())
        # A copy: a subscriber may unsubscribe itself (disconnect) while we deliver.
        for subscriber in tuple(self._subscribers):
            subscriber(event)
        return event


class OutputGate:
    """Holds every client's output while something must happen first.

    The task feed holds it from the moment a job's final status is recorded until that change
    is committed, so that no client sees the job's `concluded` before the database has it.
    While held, connections queue what they would send (replies and events alike, so their
    order is kept) and send it once the gate opens. Holds nest: the gate opens when the last
    is released.
    """

    def __init__(self) -> None:
        self._holds = 0
        self._opened: trio.Event = trio.Event()
        self._opened.set()

    @property
    def open(self) -> bool:
        return self._holds == 0

    def hold(self) -> None:
        if self._holds == 0:
            self._opened = trio.Event()
        self._holds += 1

    def release(self) -> None:
        if self._holds == 0:
            raise RuntimeError("output gate released more often than held")
        self._holds -= 1
        if self._holds == 0:
            self._opened.set()

    async def wait_open(self) -> None:
        await self._opened.wait()
