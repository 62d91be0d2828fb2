"""Where a guest cluster of a qcow2 image lives: the L1 table, L2 tables (cached), and what each
entry means (docs/interop/qcow2.txt, "Cluster mapping").

Everything here blocks (it reads the image file): a worker thread's job. Nothing is written.
An entry that points where it cannot (unaligned, past the end of the file) is reported as
damage, naming what is wrong; the file is left as it is.
"""

from __future__ import annotations

import collections
import os
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Final

from .header import Header, Qcow2Error

# The bits of an L1 or standard L2 entry that hold a host offset.
OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
COPIED: Final = 1 << 63
COMPRESSED: Final = 1 << 62
ZERO: Final = 1 << 0
# QEMU's default: the L2 cache covers the whole image, up to this many bytes of tables.
L2_CACHE_MAX: Final = 32 << 20


class Kind(Enum):
    UNALLOCATED = "unallocated"  # read from the backing file (or zeroes without one)
    ZERO = "zero"  # reads as zeroes (a host cluster may be kept for it)
    NORMAL = "normal"  # data in the host cluster at `host`
    COMPRESSED = "compressed"  # `length` compressed bytes at `host`


@dataclass(frozen=True, slots=True)
class Mapping:
    kind: Kind
    host: int = 0
    length: int = 0


UNALLOCATED: Final = Mapping(Kind.UNALLOCATED)


class Tables:
    """The cluster map of an open image: `lookup(guest offset)`."""

    def __init__(self, fd: int, header: Header, file_size: int) -> None:
        self.fd = fd
        self.header = header
        self.file_size = file_size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = header.l2_entries
        # Compressed cluster descriptors: where the offset ends and the sector count begins.
        self._csize_shift = 62 - (header.cluster_bits - 8)
        self._csize_mask = (1 << (header.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self.l1 = self._read_l1()
        tables = max(1, min(L2_CACHE_MAX, len(self.l1) * self.cluster_size) // self.cluster_size)
        self._cache_tables = tables
        self._cache: collections.OrderedDict[int, tuple[int, ...]] = collections.OrderedDict()

    def _read_l1(self) -> tuple[int, ...]:
        header = self.header
        size = header.l1_size
        if not size:
            return ()
        data = os.pread(self.fd, size * 8, header.l1_table_offset)
        if len(data) < size * 8:
            raise Qcow2Error("Active L1 table lies past the end of the image file")
        return struct.unpack(f">{size}Q", data)

    def _l2(self, offset: int) -> tuple[int, ...]:
        table = self._cache.get(offset)
        if table is not None:
            self._cache.move_to_end(offset)
            return table
        if offset % self.cluster_size:
            raise Qcow2Error(f"L2 table offset {offset:#x} unaligned")
        if offset + self.cluster_size > self.file_size:
            raise Qcow2Error(f"L2 table at {offset:#x} lies past the end of the image file")
        data = os.pread(self.fd, self.cluster_size, offset)
        if len(data) < self.cluster_size:
            raise Qcow2Error(f"L2 table at {offset:#x} lies past the end of the image file")
        table = struct.unpack(f">{self.l2_entries}Q", data)
        self._cache[offset] = table
        if len(self._cache) > self._cache_tables:
            self._cache.popitem(last=False)
        return table

    def lookup(self, guest: int) -> Mapping:
        """The mapping of the guest cluster that holds GUEST."""
        index = guest >> self.cluster_bits
        l1_index, l2_index = divmod(index, self.l2_entries)
        if l1_index >= len(self.l1):
            return UNALLOCATED
        l2_offset = self.l1[l1_index] & OFFSET_MASK
        if not l2_offset:
            return UNALLOCATED
        entry = self._l2(l2_offset)[l2_index]
        if entry & COMPRESSED:
            host = entry & self._coffset_mask
            sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
            length = sectors * 512 - (host & 511)
            if host + length > self.file_size:
                raise Qcow2Error(
                    f"Compressed cluster at {host:#x} lies past the end of the image file"
                )
            return Mapping(Kind.COMPRESSED, host, length)
        host = entry & OFFSET_MASK
        if entry & ZERO:
            if self.header.version < 3:
                raise Qcow2Error(f"Zero cluster entry in a version 2 image (L2 at "
                                 f"{l2_offset:#x}, index {l2_index:#x})")
            return Mapping(Kind.ZERO, host)
        if not host:
            return UNALLOCATED
        if host % self.cluster_size:
            raise Qcow2Error(
                f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_offset:#x}, "
                f"L2 index: {l2_index:#x})"
            )
        # (The last cluster of a file may be cut short; it must begin inside it.)
        if host >= self.file_size:
            raise Qcow2Error(f"Data cluster at {host:#x} lies past the end of the image file")
        return Mapping(Kind.NORMAL, host)
