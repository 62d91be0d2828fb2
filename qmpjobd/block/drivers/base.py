"""What every node is: a name, a size, and its users."""

from __future__ import annotations

from ..graph import BlockError


class Node:
    driver = ""

    def __init__(self, name: str, size: int, read_only: bool = False) -> None:
        self.name = name
        self.size = size
        self.read_only = read_only
        # The job kind holding this node as a target ('backup', 'mirror'), and whether some
        # job reads it as its source.
        self.target_of: str | None = None
        self.source_of: str | None = None

    def check_not_busy(self) -> None:
        """Refuse a new job on a node a job already holds."""
        job = self.target_of or self.source_of
        if job is not None:
            raise BlockError(
                f"Node '{self.name}' is busy: block device is in use by block job: {job}"
            )

    def check_removable(self) -> None:
        if self.target_of is not None:
            raise BlockError(
                f"Node '{self.name}' is busy: block device is in use by block job: "
                f"{self.target_of}"
            )
        if self.source_of is not None:
            raise BlockError(f"Block device {self.name} is in use")

    async def read(self, offset: int, length: int) -> bytes | None:
        """LENGTH bytes at OFFSET; None for a range that reads as zeroes."""
        raise NotImplementedError

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        """Write DATA at OFFSET (None: LENGTH zero bytes)."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Make written data durable."""
