"""Reading a qcow2 image: its header, its cluster map, and the bytes of a guest range, falling
through to the backing file where this layer holds nothing.

Blocking throughout (the file is read with pread): the node runs it in worker threads. Reads
never write; a damaged image gets a Qcow2Error naming what is wrong.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Final

from .header import Header, Qcow2Error, parse_header
from .tables import Kind, Tables

__all__ = ["BackingRead", "Kind", "Qcow2Image"]

# How much of the file the header may take: a cluster of the largest size.
_HEADER_READ: Final = 2 << 20

# The backing file's bytes: (offset, length) -> bytes, or None for zeroes.
BackingRead = Callable[[int, int], "bytes | None"]


class Qcow2Image:
    """An open image: `read(offset, length)` of the guest's view."""

    def __init__(self, fd: int, backing: BackingRead | None = None) -> None:
        self.fd = fd
        self.file_size = os.fstat(fd).st_size
        self.header: Header = parse_header(os.pread(fd, _HEADER_READ, 0), self.file_size)
        self.tables = Tables(fd, self.header, self.file_size)
        self.backing = backing
        self.size = self.header.size

    def read(self, offset: int, length: int) -> bytes:
        """LENGTH bytes of the guest's view at OFFSET (zeroes beyond the virtual size)."""
        parts: list[bytes] = []
        cluster = self.header.cluster_size
        end = offset + length
        position = offset
        while position < end:
            within = position % cluster
            n = min(cluster - within, end - position)
            parts.append(self._read_in_cluster(position, within, n))
            position += n
        return b"".join(parts)

    def _read_in_cluster(self, position: int, within: int, n: int) -> bytes:
        if position >= self.size:
            return bytes(n)
        n_inside = min(n, self.size - position)
        mapping = self.tables.lookup(position)
        if mapping.kind is Kind.NORMAL:
            data = os.pread(self.fd, n_inside, mapping.host + within)
            data += bytes(n_inside - len(data))  # a last cluster cut short by the file's end
        elif mapping.kind is Kind.COMPRESSED:
            data = self._decompress(mapping.host, mapping.length)[within:within + n_inside]
        elif mapping.kind is Kind.ZERO or self.backing is None:
            data = bytes(n_inside)
        else:
            found = self.backing(position, n_inside)
            data = bytes(n_inside) if found is None else found
        return data + bytes(n - n_inside)

    def status(self, offset: int, length: int) -> tuple[int, Kind, int | None]:
        """The first run of [OFFSET, OFFSET+LENGTH) that this layer maps alike: (its length,
        its kind, the host offset of its start for normal clusters that follow each other in
        the file, else None)."""
        cluster = self.header.cluster_size
        end = min(offset + length, self.size)
        first = self.tables.lookup(offset)
        host = first.host + offset % cluster if first.kind is Kind.NORMAL else None
        position = offset - offset % cluster + cluster
        while position < end:
            mapping = self.tables.lookup(position)
            if mapping.kind is not first.kind:
                break
            if host is not None and mapping.host != host + (position - offset):
                break
            position += cluster
        return min(position, end) - offset, first.kind, host

    def _decompress(self, host: int, length: int) -> bytes:
        cluster = self.header.cluster_size
        compressed = os.pread(self.fd, length, host)
        try:
            # QEMU writes raw deflate streams (no zlib header).
            data = zlib.decompressobj(-15).decompress(compressed, cluster)
        except zlib.error as e:
            raise Qcow2Error(
                f"Compressed cluster at {host:#x} cannot be decompressed: {e}"
            ) from None
        if len(data) != cluster:
            raise Qcow2Error(f"Compressed cluster at {host:#x} holds {len(data)} bytes, not "
                             f"{cluster}")
        return data
