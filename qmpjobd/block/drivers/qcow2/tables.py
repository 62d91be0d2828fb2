"""Where a guest cluster of a qcow2 image lives: the L1 table, the L2 tables (cached), and what
each entry means (docs/interop/qcow2.txt, "Cluster mapping").

Tables are changed in memory and marked dirty; writing them out, in the order that keeps the
image consistent, is the image's business (image.py's flush). Everything here that reads the
file blocks: a worker thread's job. An entry that points where it cannot (unaligned, past the
end of the file) is reported as damage, naming what is wrong; the file is left as it is.
"""

from __future__ import annotations

import collections
import itertools
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from .header import Header, Qcow2Error
from .hostfile import HostFile

# The bits of an L1 or standard L2 entry that hold a host offset.
OFFSET_MASK: Final = 0x00FFFFFFFFFFFE00
COPIED: Final = 1 << 63
COMPRESSED: Final = 1 << 62
ZERO: Final = 1 << 0
# QEMU's default: the L2 cache covers the whole image, up to this many bytes of tables.
L2_CACHE_MAX: Final = 32 << 20
_SWAP: Final = sys.byteorder == "little"  # tables are big-endian on disk
# New tables written out together when one of them must leave the cache (tables.py's
# _write_unlinked): fewer, larger writes while a sparse image is zeroed.
UNLINKED_BATCH: Final = 64
# Bits 56 and up of an entry are flags or reserved; the offset lies below.
_RESERVED: Final = 1 << 56
_BELOW_RESERVED: Final = _RESERVED - 1
_ONE: Final = (1).to_bytes(8, "little")


def decode(data: bytes) -> array[int]:
    """A table's big-endian entries as native integers."""
    table = array("Q")
    table.frombytes(data)
    if _SWAP:
        table.byteswap()
    return table


def encode(table: array[int]) -> bytes:
    if not _SWAP:
        return table.tobytes()
    swapped = array("Q", table)
    swapped.byteswap()
    return swapped.tobytes()


def _same_prefix(data: bytes, pattern: bytes) -> int:
    """How many leading bytes, in whole 8-byte entries, DATA has in common with PATTERN (of
    the same length): by memory comparisons of growing, then halving, prefixes, so that a
    table's worth costs microseconds, not a step per entry."""
    if data == pattern:
        return len(data)
    view = memoryview(pattern)
    agree, differ = 0, 8  # the first AGREE bytes are equal; the first DIFFER are not
    while differ < len(data) and data.startswith(view[:differ]):
        agree, differ = differ, min(2 * differ, len(data))
    while differ - agree > 8:
        middle = agree + (differ - agree) // 16 * 8
        if data.startswith(view[:middle]):
            agree = middle
        else:
            differ = middle
    return agree


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
    """The cluster map of an open image: `lookup(guest offset)`, and the entries writers
    change."""

    def __init__(self, file: HostFile, header: Header) -> None:
        self.file = file
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = header.l2_entries
        # Compressed cluster descriptors: where the offset ends and the sector count begins.
        self._csize_shift = 62 - (header.cluster_bits - 8)
        self._csize_mask = (1 << (header.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self.l1 = self._read_l1()
        self.l1_dirty: set[int] = set()
        # The most bytes of L2 tables kept (blockdev-add's l2-cache-size; QEMU's default).
        self.cache_limit = L2_CACHE_MAX
        self.resize_cache()
        self._cache: collections.OrderedDict[int, array[int]] = collections.OrderedDict()
        self.l2_dirty: set[int] = set()
        # Tables allocated since the L1 table on disk last changed: nothing on disk points at
        # them yet, so they may be written out at any time (the flush syncs them before the
        # L1 entries that link them).
        self._unlinked: set[int] = set()
        # Tables of one repeated entry (filled), and their encodings (_encode).
        self._templates: dict[int, array[int]] = {}
        self._encoded_templates: dict[int, bytes] = {}
        # Called before a dirty table that the disk links would leave the cache: write the
        # dirty tables out, in order.
        self.write_back: Callable[[], None] = lambda: None

    def resize_cache(self) -> None:
        """Room for the tables of the whole image, up to the limit (two tables at least, as
        QEMU keeps)."""
        covered = min(self.cache_limit, len(self.l1) * self.cluster_size)
        self._cache_tables = max(2, covered // self.cluster_size)

    def _read_l1(self) -> array[int]:
        header = self.header
        size = header.l1_size
        if not size:
            return array("Q")
        if header.l1_table_offset + size * 8 > self.file.size:
            raise Qcow2Error("Active L1 table lies past the end of the image file")
        return decode(self.file.pread(header.l1_table_offset, size * 8))

    def l2(self, offset: int) -> array[int]:
        """The L2 table at host OFFSET, from the cache or the file."""
        table = self._cache.get(offset)
        if table is not None:
            self._cache.move_to_end(offset)
            return table
        if offset % self.cluster_size:
            raise Qcow2Error(f"L2 table offset {offset:#x} unaligned")
        if offset + self.cluster_size > self.file.size:
            raise Qcow2Error(f"L2 table at {offset:#x} lies past the end of the image file")
        table = decode(self.file.pread(offset, self.cluster_size))
        self._insert(offset, table)
        return table

    def _insert(self, offset: int, table: array[int]) -> None:
        if len(self._cache) >= self._cache_tables:
            victim = next(iter(self._cache))
            if victim in self._unlinked and victim in self.l2_dirty:
                # (A sparse image's zeroing fills many new tables: no sync for each.)
                self._write_unlinked()
            elif victim in self.l2_dirty:
                self.write_back()
            self._cache.pop(victim)
        self._cache[offset] = table

    def _write_unlinked(self) -> None:
        """The dirty tables nothing on disk links yet, among the UNLINKED_BATCH that would
        leave the cache next, written out (and kept, clean): those next to each other in the
        file in one write."""
        batch = sorted(offset for offset in itertools.islice(self._cache, UNLINKED_BATCH)
                       if offset in self._unlinked and offset in self.l2_dirty)
        start = 0
        while start < len(batch):
            end = start + 1
            while end < len(batch) and batch[end] == batch[end - 1] + self.cluster_size:
                end += 1
            self.file.pwritev(batch[start], [self._encode(self._cache[offset])
                                             for offset in batch[start:end]])
            start = end
        self.l2_dirty.difference_update(batch)

    def _encode(self, table: array[int]) -> bytes:
        """TABLE as written: one encoding shared by every table that is or still equals a
        template (a sparse image's zeroing writes thousands alike)."""
        for value, template in self._templates.items():
            if table is template or table == template:
                encoded = self._encoded_templates.get(value)
                if encoded is None:
                    encoded = self._encoded_templates[value] = encode(template)
                return encoded
        return encode(table)

    def filled(self, value: int) -> array[int]:
        """A new table whose every entry is VALUE: one kept for the purpose, shared by every
        table made so until it changes (_writable copies it then)."""
        template = self._templates.get(value)
        if template is None:
            template = self._templates[value] = array("Q", [value]) * self.l2_entries
        return template

    def _writable(self, offset: int) -> array[int]:
        """The table at OFFSET, to be changed: its own copy if it shares a template."""
        table = self.l2(offset)
        if table is self._templates.get(table[0]):
            table = self._cache[offset] = array("Q", table)
        return table

    def new_l2(self, offset: int, table: array[int]) -> None:
        """A table just allocated at OFFSET (to be written out)."""
        self._insert(offset, table)
        self.l2_dirty.add(offset)
        self._unlinked.add(offset)

    def set_entry(self, l2_offset: int, index: int, value: int) -> None:
        """Change one entry of the table at L2_OFFSET. Always through here, never through a
        table held from before: the cache may have let it go meanwhile, or a shared template
        may stand in for it (filled)."""
        self._writable(l2_offset)[index] = value
        self.l2_dirty.add(l2_offset)

    def set_entries(self, l2_offset: int, first: int, values: list[int]) -> None:
        """Entries FIRST.. of the table at L2_OFFSET become VALUES (one slice)."""
        self._writable(l2_offset)[first:first + len(values)] = array("Q", values)
        self.l2_dirty.add(l2_offset)

    def fill_entries(self, l2_offset: int, first: int, last: int, value: int) -> None:
        """Entries FIRST..LAST-1 of the table at L2_OFFSET all become VALUE (one slice)."""
        self._writable(l2_offset)[first:last] = array("Q", [value]) * (last - first)
        self.l2_dirty.add(l2_offset)

    def set_l1(self, index: int, value: int) -> None:
        self.l1[index] = value
        self.l1_dirty.add(index)

    def drop_cache(self) -> None:
        """Forget the cached tables, once all are written out."""
        if not self.l2_dirty:
            self._cache.clear()

    def drop(self, offset: int) -> None:
        """Forget the table at OFFSET (its cluster is freed)."""
        self._cache.pop(offset, None)
        self.l2_dirty.discard(offset)
        self._unlinked.discard(offset)

    def dirty_tables(self) -> list[tuple[int, bytes]]:
        """The dirty L2 tables as they go to disk, in file order; they are clean afterwards."""
        out = [(offset, self._encode(self._cache[offset])) for offset in sorted(self.l2_dirty)]
        self.l2_dirty.clear()
        return out

    def dirty_l1_runs(self) -> list[tuple[int, bytes]]:
        """The changed L1 entries, as runs of adjacent entries: (file offset, bytes)."""
        runs: list[tuple[int, bytes]] = []
        indexes = sorted(self.l1_dirty)
        self.l1_dirty.clear()
        self._unlinked.clear()
        start = 0
        while start < len(indexes):
            end = start + 1
            while end < len(indexes) and indexes[end] == indexes[end - 1] + 1:
                end += 1
            first, last = indexes[start], indexes[end - 1]
            runs.append((self.header.l1_table_offset + first * 8,
                         encode(self.l1[first:last + 1])))
            start = end
        return runs

    def no_table(self, l1_index: int) -> bool:
        """Whether the range of L1_INDEX has no L2 table (all of it unallocated)."""
        return l1_index >= len(self.l1) or not self.l1[l1_index] & OFFSET_MASK

    def same_entries(self, guest: int, limit: int) -> int:
        """How many clusters from GUEST's on (at most LIMIT, within its L2 table) have the
        very entry GUEST's has: a run of unallocated or zero clusters, measured on the
        table's bytes (a sparse image's status must not cost a step per cluster)."""
        index = guest >> self.cluster_bits
        l1_index, l2_index = divmod(index, self.l2_entries)
        if self.no_table(l1_index):
            return limit
        table = self.l2(self.l1[l1_index] & OFFSET_MASK)
        stop = min(l2_index + limit, len(table))
        entries = memoryview(table)[l2_index:stop].tobytes()
        return _same_prefix(entries, entries[:8] * (stop - l2_index)) // 8 or 1

    def progression(self, guest: int, limit: int) -> int:
        """How many clusters from GUEST's on (at most LIMIT, within its L2 table; GUEST's has
        a host cluster) have entries that go up by one cluster from GUEST's: clusters that lie
        in the file in the guest's order, with the same flags (1 at least)."""
        l1_index, l2_index = divmod(guest >> self.cluster_bits, self.l2_entries)
        table = self.l2(self.l1[l1_index] & OFFSET_MASK)
        stop = min(l2_index + limit, len(table))
        count = stop - l2_index
        if count < 2 or not _SWAP or (
                (table[l2_index] & _BELOW_RESERVED) + count * self.cluster_size > _RESERVED):
            return 1
        # The table's entries read as two numbers of 64-bit digits, one a digit ahead of the
        # other: their difference holds a cluster in each digit exactly as far as the entries
        # go up by a cluster (no digit can carry: the offsets stay below the reserved bits),
        # so its lowest digit that differs is where the run ends. In windows that grow
        # eightfold, so that a short run costs little.
        window = 64
        with memoryview(table) as view:
            while True:
                last = min(l2_index + window, stop)
                later = int.from_bytes(view[l2_index + 1:last], "little")
                earlier = int.from_bytes(view[l2_index:last - 1], "little")
                steps = self.cluster_size * int.from_bytes(_ONE * (last - 1 - l2_index),
                                                           "little")
                differ = (later - earlier) ^ steps
                if differ:
                    return ((differ & -differ).bit_length() - 1) // 64 + 1
                if last == stop:
                    return count
                window *= 8

    def clear(self, l2_offset: int, first: int, last: int) -> bool:
        """Whether entries FIRST..LAST-1 of the table at L2_OFFSET are all 0 (unallocated)."""
        entries = memoryview(self.l2(l2_offset))[first:last].tobytes()
        return entries == bytes(len(entries))

    # -- what an entry means -----------------------------------------------------------------

    def lookup(self, guest: int) -> Mapping:
        """The mapping of the guest cluster that holds GUEST."""
        index = guest >> self.cluster_bits
        l1_index, l2_index = divmod(index, self.l2_entries)
        if l1_index >= len(self.l1):
            return UNALLOCATED
        l2_offset = self.l1[l1_index] & OFFSET_MASK
        if not l2_offset:
            return UNALLOCATED
        return self.meaning(self.l2(l2_offset)[l2_index], l2_offset, l2_index)

    def meaning(self, entry: int, l2_offset: int, l2_index: int) -> Mapping:
        """What an L2 ENTRY (at L2_INDEX of the table at L2_OFFSET) maps its cluster to."""
        if entry & COMPRESSED:
            host = entry & self._coffset_mask
            sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
            length = sectors * 512 - (host & 511)
            if host + length > self.file.size:
                raise Qcow2Error(
                    f"Compressed cluster at {host:#x} lies past the end of the image file"
                )
            return Mapping(Kind.COMPRESSED, host, length)
        host = entry & OFFSET_MASK
        if entry & ZERO:
            if self.header.version < 3:
                raise Qcow2Error(f"Zero cluster entry in a version 2 image (L2 at "
                                 f"{l2_offset:#x}, index {l2_index:#x})")
            if host % self.cluster_size:
                raise Qcow2Error(
                    f"Cluster allocation offset {host:#x} unaligned (L2 offset: "
                    f"{l2_offset:#x}, L2 index: {l2_index:#x})"
                )
            return Mapping(Kind.ZERO, host)
        if not host:
            return UNALLOCATED
        if host % self.cluster_size:
            raise Qcow2Error(
                f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_offset:#x}, "
                f"L2 index: {l2_index:#x})"
            )
        # (The last cluster of a file may be cut short; it must begin inside it.)
        if host >= self.file.size:
            raise Qcow2Error(f"Data cluster at {host:#x} lies past the end of the image file")
        return Mapping(Kind.NORMAL, host)
