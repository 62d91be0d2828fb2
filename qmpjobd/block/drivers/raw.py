"""raw: the bytes of a child node, optionally a window of them (offset, size).

No format of its own: every request goes to the child, shifted by the window's offset.
"""

from __future__ import annotations

from typing import Any

from ..errors import BlockError
from .base import SECTOR, Driver, Extent, HostExtent, Node, Opener, discard_option, sectors_up
from .file_create import make_image


class RawNode(Node):
    driver = "raw"
    strong_options = ("offset", "size")

    def __init__(
        self, name: str, child: Node, offset: int, size: int, read_only: bool,
    ) -> None:
        super().__init__(name, size, read_only)
        self.file = child
        self.child = child  # the graph's view of the edge (who is in use by whom)
        self.offset = offset

    async def read(self, offset: int, length: int) -> bytes | None:
        return await self.file.read(self.offset + offset, length)

    def read_sync(self, offset: int, length: int) -> bytes | None:
        return self.file.read_sync(self.offset + offset, length)

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        await self.file.write(self.offset + offset, data, length)

    def write_sync(self, offset: int, data: bytes | None, length: int) -> None:
        self.file.write_sync(self.offset + offset, data, length)

    def write_exact_sync(self, offset: int, data: bytes) -> None:
        self.file.write_exact_sync(self.offset + offset, data)

    def can_zero_with_unmap(self) -> bool:
        return self.file.can_zero_with_unmap()

    def zero_sync(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.file.zero_sync(self.offset + offset, length, may_unmap)

    def grow_sync(self, size: int) -> None:
        if self.offset or "size" in self.options:
            super().grow_sync(size)
        self.file.grow_sync(size)
        self.size = size

    async def flush(self) -> None:
        await self.file.flush()

    def reopen(self, read_only: bool) -> None:
        self.file.reopen(read_only)
        self.read_only = read_only

    def take_write(self) -> None:
        self.file.take_write()

    def drop_write(self) -> None:
        self.file.drop_write()

    def block_status(self, offset: int, length: int) -> Extent:
        return self.file.block_status(self.offset + offset, length)

    def host_extent(self, offset: int, length: int) -> HostExtent | None:
        return self.file.host_extent(self.offset + offset, length)

    def write_from_sync(self, offset: int, source: HostExtent) -> None:
        self.file.write_from_sync(self.offset + offset, source)

    def format_info(self) -> dict[str, Any]:
        return self.file.format_info()  # raw passes QEMU's get-info down

    def allocated_size(self) -> int:
        return self.file.allocated_size()


async def open_raw(
    opener: Opener, name: str, options: dict[str, Any], inherited: dict[str, Any]
) -> Node:
    """blockdev-add's `raw` driver: its child by reference or inline, its window checked."""
    ref = options["file"]
    read_only = options.get("read-only", inherited.get("read-only", False))
    if isinstance(ref, str):
        child = opener.lookup(ref)
        inline = False
    else:
        # An inline child takes its parent's read-only, cache and discard settings unless it
        # has its own.
        cache = {**inherited.get("cache", {}), **options.get("cache", {})}
        child = await opener.open_child(name, ref, {
            "read-only": read_only, "cache": cache,
            "discard": discard_option(options, inherited)})
        inline = True
    try:
        offset = options.get("offset", 0)
        if offset < 0:
            raise BlockError("Parameter 'offset' expects a non-negative number below 2^64")
        has_size = "size" in options
        size = options.get("size", 0)
        if size < 0:
            raise BlockError("Parameter 'size' expects a non-negative number below 2^64")
        real = child.size
        if offset > real:
            raise BlockError(
                f"Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )
        if has_size and real - offset < size:
            # QEMU's message has the double space.
            raise BlockError(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to "
                f"the  actual size of the containing file ({real})"
            )
        if has_size and size % SECTOR:
            raise BlockError(f"Specified size is not multiple of {SECTOR}")
    except BaseException:
        if inline:
            await child.close()
        raise
    node = RawNode(name, child, offset, sectors_up(size if has_size else real - offset), read_only)
    node.discard = discard_option(options, inherited) == "unmap"
    child.monitor_owned = not inline
    if inline:
        child.owner = node
    return node


DRIVER = Driver(RawNode, open_raw, make_image=make_image)
