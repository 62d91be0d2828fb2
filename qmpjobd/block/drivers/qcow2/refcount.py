"""Reference counts of a qcow2 image's host clusters (docs/interop/qcow2.txt, "Host cluster
management"): the refcount table, its blocks, entries of 1 to 64 bits; allocating clusters;
and a consistency check that counts what each host cluster is used for and compares it with
its reference count, as `qemu-img check` does (leaks: counted more than used; corruptions: used
more than counted).

Allocation places clusters where QEMU places them, so that images made here and by QEMU have
the same layout: first fit from a free-cluster index that starts at 0 and moves back on a free;
a new refcount block goes into the first free cluster, describing itself if it lies in its own
range; a refcount table that has become too small is replaced by a larger one placed, with the
blocks that describe it, at the start of the first refcount range nothing uses yet.

Counts change in memory and blocks are marked dirty. Raising a count may be written whenever
(a crash leaks the cluster); lowering one only once nothing on disk points at the cluster: the
image hands frees in through `free_later` and applies them after its L2 tables are durable.
Blocking (pread, pwrite): a worker thread's job.
"""

from __future__ import annotations

import collections
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from .header import Header, Qcow2Error
from .hostfile import HostFile
from .tables import OFFSET_MASK, Kind, Tables, decode, encode

# Where the refcount table's offset and size are kept in the header.
_TABLE_FIELDS_AT: Final = 48
_TABLE_FIELDS: Final = struct.Struct(">QI")
# QEMU's limit on refcount table entries (8 MiB of table).
_MAX_TABLE_ENTRIES: Final = (8 << 20) // 8
# Blocks kept in memory: at least this many bytes of them.
_CACHE_BYTES: Final = 1 << 20


class _Again(Exception):
    """A refcount block was placed meanwhile, maybe where the caller meant to put its clusters:
    it must look for free clusters again."""


def metadata_clusters(clusters: int, cluster_size: int, refcount_order: int,
                      generous: bool) -> tuple[int, int]:
    """How many refcount blocks and table clusters count CLUSTERS clusters and themselves
    (with GENEROUS, room for half as many table clusters again): (blocks, table clusters)."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    total = -1
    while True:
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == total:
            if not generous:
                return blocks, table
            clusters += -(-table // 2)
            generous = False
            total = -1
            continue
        total = n


class Refcounts:
    """The reference counts of the host clusters of an open image."""

    def __init__(self, file: HostFile, header: Header) -> None:
        self.file = file
        self.header = header
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.bits = header.refcount_bits
        self.max = (1 << self.bits) - 1
        # Entries in a refcount block (a cluster of BITS-bit entries).
        self.block_entries = self.cluster_size * 8 // self.bits
        size = header.refcount_table_clusters * self.cluster_size
        if header.refcount_table_offset + size > file.size:
            raise Qcow2Error("Reference count table lies past the end of the image file")
        self.table = decode(file.pread(header.refcount_table_offset, size))
        self.table_dirty: set[int] = set()
        self._blocks: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self._cache_blocks = max(4, _CACHE_BYTES // self.cluster_size)
        self.dirty: set[int] = set()
        self.free_index = 0
        # Clusters to free once nothing on disk points at them: (offset, length).
        self.pending_frees: list[tuple[int, int]] = []

    def drop_cache(self) -> None:
        """Forget the cached refcount blocks, once all are written out."""
        if not self.dirty:
            self._blocks.clear()

    # -- entries -----------------------------------------------------------------------------

    def _block(self, offset: int) -> bytearray:
        block = self._blocks.get(offset)
        if block is not None:
            self._blocks.move_to_end(offset)
            return block
        if offset % self.cluster_size or offset + self.cluster_size > self.file.size:
            raise Qcow2Error(f"Reference count block at {offset:#x} is invalid")
        block = bytearray(self.file.pread(offset, self.cluster_size))
        self._insert(offset, block)
        return block

    def _insert(self, offset: int, block: bytearray) -> None:
        if len(self._blocks) >= self._cache_blocks:
            victim, data = self._blocks.popitem(last=False)
            if victim in self.dirty:
                # A raised count may reach the disk at any time, and a lowered one was
                # applied only once nothing pointed at the cluster: no order to keep.
                self.file.pwrite(victim, data)
                self.dirty.discard(victim)
        self._blocks[offset] = block

    def _get(self, block: bytearray, index: int) -> int:
        bits = self.bits
        if bits >= 8:
            width = bits >> 3
            return int.from_bytes(block[index * width:(index + 1) * width], "big")
        # Sub-byte entries: the first entry in the least significant bits.
        byte = block[index * bits >> 3]
        return byte >> (index * bits & 7) & self.max

    def _set(self, block: bytearray, index: int, value: int) -> None:
        bits = self.bits
        if bits >= 8:
            width = bits >> 3
            block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
            return
        at = index * bits >> 3
        shift = index * bits & 7
        block[at] = block[at] & ~(self.max << shift) & 0xFF | value << shift

    def block_offset(self, table_index: int) -> int:
        if table_index >= len(self.table):
            return 0
        return self.table[table_index] & OFFSET_MASK

    def get(self, cluster: int) -> int:
        """The reference count of host cluster number CLUSTER."""
        table_index, index = divmod(cluster, self.block_entries)
        offset = self.block_offset(table_index)
        if not offset:
            return 0
        return self._get(self._block(offset), index)

    def counted(self) -> Iterator[int]:
        """The host clusters whose count is above zero, in order: a walk over the refcount
        blocks there are (skipping runs of zeroes), whatever offsets the file's tables name."""
        bits = self.bits
        run = 64  # bytes looked at together
        zeroes = bytes(run)
        for table_index, entry in enumerate(self.table):
            offset = entry & OFFSET_MASK
            if not offset:
                continue
            block = self._block(offset)
            first = table_index * self.block_entries
            for at in range(0, len(block), run):
                if block[at:at + run] == zeroes:
                    continue
                for index in range(at * 8 // bits, min((at + run) * 8 // bits,
                                                       self.block_entries)):
                    if self._get(block, index):
                        yield first + index

    # -- allocation --------------------------------------------------------------------------

    def alloc(self, length: int) -> int:
        """Allocate clusters for LENGTH bytes, one after another: the offset of the first."""
        n = -(-length // self.cluster_size)
        while True:
            first = self._find_free(n)
            try:
                self.change(first, n, 1)
            except _Again:
                continue
            return first * self.cluster_size

    def _find_free(self, n: int) -> int:
        """N free clusters in a row from the free index on (QEMU's first fit); the index moves
        past them, their counts stay 0."""
        found = 0
        entries = self.block_entries
        while found < n:
            table_index, index = divmod(self.free_index, entries)
            offset = self.block_offset(table_index)
            if not offset:
                # No block: the whole rest of its range is free.
                take = min(n - found, entries - index)
                found += take
                self.free_index += take
                continue
            block = self._block(offset)
            if self.bits >= 8:
                # Whole-byte entries are looked at a stretch at a time: a half-full image's
                # first allocation walks past thousands of counted clusters (per entry: 3 ms
                # for 8,000, while a job waits for its first copy).
                found, index = self._free_run(block, index, n, found)
                self.free_index = table_index * entries + index
                continue
            while index < entries and found < n:
                found = found + 1 if self._get(block, index) == 0 else 0
                index += 1
                self.free_index += 1
        return self.free_index - n

    def _free_run(self, block: bytearray, index: int, n: int, found: int) -> tuple[int, int]:
        """_find_free over one block of whole-byte entries from INDEX, FOUND free entries
        in a row just before it: where it stopped (N free in a row, or the block's end), as
        (free entries in a row up to there, the entry it stopped before)."""
        width = self.bits >> 3
        zero = bytes(width)
        entries = self.block_entries
        while index < entries and found < n:
            if not found:
                # On to the entry where the next zero entry's worth of bytes starts (inside
                # a counted entry, maybe: the look at the run below then moves past it).
                at = block.find(zero, index * width, entries * width)
                if at < 0:
                    index = entries
                    break
                index = at // width
            take = min(n - found, entries - index)
            segment = block[index * width:(index + take) * width]
            free = (len(segment) - len(segment.lstrip(b"\0"))) // width
            if free == take:
                found += take
                index += take
            else:
                found = 0
                index += free + 1  # past the counted entry that ends the run
        return found, index

    def change(self, first: int, n: int, delta: int) -> None:
        """Add DELTA to the counts of clusters FIRST..FIRST+N-1. Raises _Again (all of it
        undone) when a refcount block had to be placed first."""
        if self._change_free_run(first, n, delta):
            return
        done = 0
        try:
            for cluster in range(first, first + n):
                table_index, index = divmod(cluster, self.block_entries)
                block = self._block_for_change(table_index, cluster, delta, first, n)
                value = self._get(block, index) + delta
                if value < 0 or value > self.max:
                    raise Qcow2Error(
                        f"Reference count of cluster {cluster:#x} "
                        f"{'overflows' if value > 0 else 'underflows'} (change {delta:+d})"
                    )
                self._set(block, index, value)
                self.dirty.add(self.table[table_index] & OFFSET_MASK)
                if value == 0 and cluster < self.free_index:
                    self.free_index = cluster
                done += 1
        except _Again:
            # Try the same clusters first when the caller looks again.
            self.free_index = min(self.free_index, first)
            if done:
                self.change(first, done, -delta)
            raise

    def _change_free_run(self, first: int, n: int, delta: int) -> bool:
        """Counts of free clusters FIRST..FIRST+N-1 of one existing block set to DELTA in one
        slice, where the entries are whole bytes (what allocating in a new image does);
        False, changing nothing, where this does not apply."""
        table_index, index = divmod(first, self.block_entries)
        offset = self.block_offset(table_index)
        if (self.bits < 8 or delta < 1 or delta > self.max or not offset
                or index + n > self.block_entries):
            return False
        block = self._block(offset)
        width = self.bits >> 3
        span = slice(index * width, (index + n) * width)
        if block[span] != bytes(n * width):
            return False
        block[span] = delta.to_bytes(width, "big") * n
        self.dirty.add(offset)
        return True

    def _block_for_change(self, table_index: int, cluster: int, delta: int, first: int,
                          n: int) -> bytearray:
        offset = self.block_offset(table_index)
        if offset:
            return self._block(offset)
        if delta < 0:
            raise Qcow2Error(f"Reference count of cluster {cluster:#x} underflows")
        new = self._find_free(1)
        if new == 0:
            raise Qcow2Error("Preventing invalid allocation of refcount block at offset 0")
        new_offset = new * self.cluster_size
        block = bytearray(self.cluster_size)
        if new // self.block_entries == table_index:
            self._set(block, new % self.block_entries, 1)  # the block describes itself
        else:
            self.change(new, 1, 1)  # described by another block (placed first if need be)
        self._insert(new_offset, block)
        self.dirty.add(new_offset)
        if table_index < len(self.table):
            self.table[table_index] = new_offset
            self.table_dirty.add(table_index)
            if first <= new < first + n:
                raise _Again
            # QEMU looks again, and finds the same clusters free: go on instead.
            return block
        used = max(cluster + 1, new + 1)
        blocks_used = -(-used // self.block_entries)
        self._grow_table(blocks_used * self.block_entries, table_index, new_offset)
        raise _Again

    def _grow_table(self, start: int, new_index: int, new_block: int) -> None:
        """A larger refcount table, placed with the new blocks that describe it from cluster
        START on (where nothing is yet), holding NEW_BLOCK at NEW_INDEX. Written and switched
        to at once (blocks, table, header, each synced), then the old table is freed."""
        cs = self.cluster_size
        total, _ = metadata_clusters(start, cs, self.header.refcount_order, True)
        area_index = start // self.block_entries
        size = total + -(-total // 2)
        per_cluster = cs // 8
        size = -(-size // per_cluster) * per_cluster
        if size > _MAX_TABLE_ENTRIES:
            raise Qcow2Error("Image is too big: its reference count table would exceed 8 MiB")
        table = array("Q", bytes(8 * size))
        keep = min(size, len(self.table))
        table[:keep] = self.table[:keep]
        table[new_index] = new_block
        missing = sum(1 for i in range(area_index, total) if not table[i])
        table_offset = (start + missing) * cs
        end = table_offset + size * 8
        block_offset = start * cs
        for i in range(area_index, total):
            if table[i]:
                block = self._block(table[i] & OFFSET_MASK)
            else:
                block = bytearray(cs)
                table[i] = block_offset
                self._insert(block_offset, block)
                block_offset += cs
            self.dirty.add(table[i] & OFFSET_MASK)
            covered = i * self.block_entries * cs
            if covered < end:
                first = (start * cs - covered) // cs if covered < start * cs else 0
                for index in range(first, min((end - covered) // cs, self.block_entries)):
                    self._set(block, index, 1)
        self.write_blocks()
        self.file.sync()
        self.file.pwrite(table_offset, encode(table))
        self.file.sync()
        self.file.pwrite(_TABLE_FIELDS_AT, _TABLE_FIELDS.pack(table_offset, size * 8 // cs))
        self.file.sync()
        old_offset, old_bytes = self.header.refcount_table_offset, len(self.table) * 8
        self.table = table
        self.table_dirty.clear()
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = size * 8 // cs
        self.change(old_offset // cs, -(-old_bytes // cs), -1)

    def free_later(self, offset: int, length: int) -> None:
        """Free the clusters of [OFFSET, OFFSET+LENGTH) once nothing on disk points at them."""
        self.pending_frees.append((offset, length))

    def apply_frees(self) -> None:
        frees, self.pending_frees = self.pending_frees, []
        cs = self.cluster_size
        for offset, length in frees:
            first = offset // cs
            self.change(first, (offset + length - 1) // cs - first + 1, -1)

    # -- writing out -------------------------------------------------------------------------

    def write_blocks(self) -> bool:
        """Write the dirty blocks; whether there were any."""
        if not self.dirty:
            return False
        for offset in sorted(self.dirty):
            self.file.pwrite(offset, self._blocks[offset])
        self.dirty.clear()
        return True

    def write_table(self) -> bool:
        """Write the changed table entries (blocks they point at are on disk); whether any."""
        if not self.table_dirty:
            return False
        for index in sorted(self.table_dirty):
            self.file.pwrite(self.header.refcount_table_offset + index * 8,
                             self.table[index].to_bytes(8, "big"))
        self.table_dirty.clear()
        return True


@dataclass
class CheckResult:
    """What a check found: clusters counted but not used (leaks) and used more often than
    counted (corruptions), by host cluster number; the allocated clusters."""

    leaks: list[int] = field(default_factory=list)
    corruptions: list[int] = field(default_factory=list)
    allocated: int = 0


def count_uses(file: HostFile, header: Header, tables: Tables,
               refcounts: Refcounts) -> dict[int, int]:
    """How often each host cluster is used: by the header, the L1 table, the L2 tables, data
    clusters, the refcount table and blocks."""
    cluster = header.cluster_size
    uses: dict[int, int] = {}

    def use(offset: int, length: int) -> None:
        for n in range(offset // cluster, (offset + max(length, 1) - 1) // cluster + 1):
            uses[n] = uses.get(n, 0) + 1

    use(0, cluster)  # the header
    if header.l1_size:
        use(header.l1_table_offset, header.l1_size * 8)
    seen_l2: set[int] = set()
    for l1_entry in tables.l1:
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset:
            continue
        use(l2_offset, cluster)
        if l2_offset in seen_l2:
            continue
        seen_l2.add(l2_offset)
        table = tables.l2(l2_offset)
        for l2_index, entry in enumerate(table):
            if not entry:
                continue
            mapping = tables.meaning(entry, l2_offset, l2_index)
            if mapping.kind is Kind.NORMAL or (mapping.kind is Kind.ZERO and mapping.host):
                use(mapping.host, cluster)
            elif mapping.kind is Kind.COMPRESSED:
                use(mapping.host, mapping.length)
    use(header.refcount_table_offset, header.refcount_table_clusters * cluster)
    for entry in refcounts.table:
        block = entry & OFFSET_MASK
        if block:
            use(block, cluster)
    return uses


def compare(uses: dict[int, int], refcounts: Refcounts) -> CheckResult:
    result = CheckResult()
    # Only clusters used or counted can be off: a damaged table may name offsets far past
    # the file, and the check must not take time in proportion to them.
    for n in sorted({*uses, *refcounts.counted()}):
        counted = refcounts.get(n)
        used = uses.get(n, 0)
        if counted:
            result.allocated += 1
        if counted > used:
            result.leaks.append(n)
        elif counted < used:
            result.corruptions.append(n)
    return result


def check(file: HostFile, header: Header) -> CheckResult:
    """Compare every host cluster's uses with its reference count."""
    tables = Tables(file, header)
    refcounts = Refcounts(file, header)
    return compare(count_uses(file, header, tables, refcounts), refcounts)


def repair(file: HostFile, header: Header, tables: Tables, refcounts: Refcounts,
           sync: Callable[[], None]) -> None:
    """Make every count equal the cluster's uses (an image left dirty with lazy refcounts),
    then write the blocks out with SYNC's ordering. Placing a new block changes the uses:
    counted again until nothing is off.

    What lazy refcounts can leave behind (counts too high or too low) is repaired; damage
    they cannot explain (a refcount block that is not a cluster of its own, a count beyond
    the width) is refused before anything is written. New blocks go past every cluster in
    use, so that none lands on a cluster whose count was still wrong."""
    uses = count_uses(file, header, tables, refcounts)
    cluster_size = header.cluster_size
    for index, entry in enumerate(refcounts.table):
        offset = entry & OFFSET_MASK
        if not offset:
            continue
        if entry & 0x1FF or offset % cluster_size:
            raise Qcow2Error(f"Refcount block {index} is not cluster aligned; refcount table "
                             "entry corrupted")
        if uses.get(offset // cluster_size, 0) > 1:
            raise Qcow2Error(f"Refcount block {index} at {offset:#x} overlaps other metadata; "
                             "the image needs 'qemu-img check -r all'")
    crowded = [n for n, count in uses.items() if count > refcounts.max]
    if crowded:
        raise Qcow2Error(f"Cluster {crowded[0] * cluster_size:#x} is used more often than a "
                         f"{refcounts.bits}-bit count holds")
    end = -(-file.size // cluster_size)
    beyond = [n for n in uses if n >= end]
    if beyond:
        raise Qcow2Error(f"Cluster {min(beyond) * cluster_size:#x} is used but lies past the end "
                         "of the image file")
    refcounts.free_index = max(refcounts.free_index, end)
    for round_ in range(8):
        if round_:
            uses = count_uses(file, header, tables, refcounts)
        result = compare(uses, refcounts)
        if not result.leaks and not result.corruptions:
            return
        for cluster in sorted({*result.leaks, *result.corruptions}):
            while True:
                delta = uses.get(cluster, 0) - refcounts.get(cluster)
                if not delta:
                    break
                try:
                    refcounts.change(cluster, 1, delta)
                except _Again:
                    continue
                break
        sync()
    raise Qcow2Error("Reference counts could not be repaired")
