"""null-co: a node of a given size that reads zeroes (or nothing) and forgets what it is given.

No I/O happens, so nothing needs a worker thread; `latency-ns` delays each request the way the
driver's option says.
"""

from __future__ import annotations

import trio

from .base import Node


class NullNode(Node):
    driver = "null-co"

    def __init__(
        self, name: str, size: int, read_zeroes: bool = False, latency_ns: int = 0
    ) -> None:
        super().__init__(name, size)
        self.read_zeroes = read_zeroes
        self.latency_ns = latency_ns

    async def _latency(self) -> None:
        if self.latency_ns:
            await trio.sleep(self.latency_ns / 1e9)

    async def read(self, offset: int, length: int) -> bytes | None:
        await self._latency()
        return None

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        await self._latency()
