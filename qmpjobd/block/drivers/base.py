"""What every node is: a name, a size, and its users."""

from __future__ import annotations

import itertools
from typing import Any

from ..graph import BlockError

_serials = itertools.count()


class Node:
    driver = ""

    def __init__(self, name: str, size: int, read_only: bool = False) -> None:
        self.name = name
        self.serial = next(_serials)  # creation order: query-named-block-nodes lists by it
        self.size = size
        self.read_only = read_only
        # The kind of the job writing this node ('backup', 'mirror'), and of those reading it.
        self.target_of: str | None = None
        self.source_of: list[str] = []
        # Nodes whose child this is (a raw node over it), and whether the monitor owns it (a
        # root given to blockdev-add) or a parent does (an inline child, deleted with it).
        self.parents: list[Node] = []
        self.monitor_owned = True
        self.child: Node | None = None
        # The checked blockdev-add options the node was opened with (for query-named-block-nodes).
        self.options: dict[str, Any] = {}

    def _busy(self, job: str) -> BlockError:
        return BlockError(f"Node '{self.name}' is busy: block device is in use by block job: {job}")

    def check_backup_source(self) -> None:
        """Several backups may read a node; nothing may while a job writes it or mirrors it."""
        if self.target_of is not None:
            raise self._busy(self.target_of)
        if "mirror" in self.source_of:
            raise self._busy("mirror")

    def check_mirror_source(self) -> None:
        # A node a job holds has a job's filter above it: it is no longer a root.
        if self.target_of is not None or self.source_of:
            raise BlockError("Need a root block node")

    def check_target(self) -> None:
        """A job's target: no other job may hold it."""
        if self.target_of is not None:
            raise self._busy(self.target_of)
        if self.source_of:
            raise self._busy(self.source_of[0])

    def check_removable(self) -> None:
        if not self.monitor_owned:
            raise BlockError(f"Node {self.name} is not owned by the monitor")
        # QSD words this differently for each role the node plays in a job.
        if self.target_of == "backup":
            raise self._busy("backup")
        if self.target_of is not None:
            raise BlockError(f"Node {self.name} is in use")
        if "mirror" in self.source_of:
            raise self._busy("mirror")
        if self.source_of or self.parents:
            raise BlockError(f"Block device {self.name} is in use")

    async def read(self, offset: int, length: int) -> bytes | None:
        """LENGTH bytes at OFFSET; None for a range that reads as zeroes."""
        raise NotImplementedError

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        """Write DATA at OFFSET (None: LENGTH zero bytes)."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Make written data durable."""

    def take_write(self) -> None:
        """A job starts writing this node (file nodes take their image's write lock)."""

    def drop_write(self) -> None:
        """The job writing this node has ended."""

    async def close(self) -> None:
        """Release what the node holds (descriptors); after flush, on blockdev-del."""
