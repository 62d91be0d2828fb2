"""null-co: a node of a given size that reads zeroes (or nothing) and forgets what it is given.

No I/O happens, so nothing needs a worker thread; `latency-ns` delays each request the way the
driver's option says.
"""

from __future__ import annotations

from typing import Any

import trio

from ..errors import BlockError
from .base import Driver, Extent, Node, Opener, sectors_up

DEFAULT_SIZE = 1 << 30
# The largest length QEMU's block layer can address: INT64_MAX rounded down to a multiple of
# the largest request (2^31 - 512 bytes).
MAX_LENGTH = ((1 << 63) - 1) // (2147483136) * 2147483136


class NullNode(Node):
    driver = "null-co"
    strong_options = ("size", "read-zeroes")
    is_protocol = True

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

    def read_sync(self, offset: int, length: int) -> bytes | None:
        return None

    def write_sync(self, offset: int, data: bytes | None, length: int) -> None:
        pass

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        await self._latency()

    def block_status(self, offset: int, length: int) -> Extent:
        # As QEMU's null-co: known zeroes only with read-zeroes (else the data is undefined).
        return Extent(length, zero=self.read_zeroes, allocated=True)

    def exact_filename(self) -> str:
        return "" if self.strong_options_given else "null-co://"


async def open_null(
    opener: Opener, name: str, options: dict[str, Any], inherited: dict[str, Any]
) -> Node:
    size = options.get("size", DEFAULT_SIZE)
    if size < 0:
        # QSD 7.2 aborts here (docs/compat.md); this is the message it prints as it dies.
        raise BlockError("Parameter 'size' expects a non-negative number below 2^64")
    latency = options.get("latency-ns", 0)
    if latency < 0:
        raise BlockError("latency-ns is invalid")
    length = sectors_up(size)
    if length > MAX_LENGTH:
        raise BlockError("Could not refresh total sector count: File too large")
    node = NullNode(name, length, options.get("read-zeroes", False), latency)
    node.read_only = options.get("read-only", inherited.get("read-only", False))
    return node


DRIVER = Driver(NullNode, open_null)
