"""raw: the bytes of a child node, optionally a window of them (offset, size).

No format of its own: every request goes to the child, shifted by the window's offset.
"""

from __future__ import annotations

from .base import Node


class RawNode(Node):
    driver = "raw"

    def __init__(
        self, name: str, child: Node, offset: int, size: int, read_only: bool,
    ) -> None:
        super().__init__(name, size, read_only)
        self.file = child
        self.child = child  # the graph's view of the edge (who is in use by whom)
        self.offset = offset

    async def read(self, offset: int, length: int) -> bytes | None:
        return await self.file.read(self.offset + offset, length)

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        await self.file.write(self.offset + offset, data, length)

    async def flush(self) -> None:
        await self.file.flush()

    def take_write(self) -> None:
        self.file.take_write()

    def drop_write(self) -> None:
        self.file.drop_write()
