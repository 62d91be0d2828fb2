"""Reference counts of a qcow2 image's host clusters: the refcount table, its blocks, entries of
1 to 64 bits (docs/interop/qcow2.txt, "Host cluster management"); and a consistency check
that counts what each host cluster is used for and compares it with its reference count, as
`qemu-img check` does (leaks: counted more than used; corruptions: used more than counted).

Blocking (pread): a worker thread's job. Nothing is written.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from .header import Header, Qcow2Error
from .tables import OFFSET_MASK, Kind, Tables


class Refcounts:
    """The reference counts of the host clusters of an open image."""

    def __init__(self, fd: int, header: Header, file_size: int) -> None:
        self.fd = fd
        self.header = header
        self.file_size = file_size
        self.cluster_size = header.cluster_size
        self.bits = header.refcount_bits
        # Entries in a refcount block (a cluster of BITS-bit entries).
        self.block_entries = self.cluster_size * 8 // self.bits
        size = header.refcount_table_clusters * self.cluster_size
        data = os.pread(fd, size, header.refcount_table_offset)
        if len(data) < size:
            raise Qcow2Error("Reference count table lies past the end of the image file")
        self.table = struct.unpack(f">{size // 8}Q", data)
        self._blocks: dict[int, bytes] = {}

    def _block(self, offset: int) -> bytes:
        block = self._blocks.get(offset)
        if block is None:
            if offset % self.cluster_size or offset + self.cluster_size > self.file_size:
                raise Qcow2Error(f"Reference count block at {offset:#x} is invalid")
            block = os.pread(self.fd, self.cluster_size, offset)
            self._blocks[offset] = block
        return block

    def get(self, cluster: int) -> int:
        """The reference count of host cluster number CLUSTER."""
        table_index, index = divmod(cluster, self.block_entries)
        if table_index >= len(self.table):
            return 0
        block_offset = self.table[table_index] & OFFSET_MASK
        if not block_offset:
            return 0
        block = self._block(block_offset)
        bits = self.bits
        if bits >= 8:
            width = bits // 8
            return int.from_bytes(block[index * width:(index + 1) * width], "big")
        byte = block[index * bits // 8]
        # Sub-byte entries: the first entry in the least significant bits.
        shift = index * bits % 8
        return byte >> shift & ((1 << bits) - 1)


@dataclass
class CheckResult:
    """What a check found: clusters counted but not used (leaks) and used more often than
    counted (corruptions), by host cluster number; the allocated clusters."""

    leaks: list[int] = field(default_factory=list)
    corruptions: list[int] = field(default_factory=list)
    allocated: int = 0


def check(fd: int, header: Header, file_size: int) -> CheckResult:
    """Count every use of each host cluster (the header, the L1 table, the L2 tables, data
    clusters, the refcount table and blocks) and compare with its reference count."""
    cluster = header.cluster_size
    uses: dict[int, int] = {}

    def use(offset: int, length: int) -> None:
        for n in range(offset // cluster, (offset + max(length, 1) - 1) // cluster + 1):
            uses[n] = uses.get(n, 0) + 1

    use(0, cluster)  # the header
    if header.l1_size:
        use(header.l1_table_offset, header.l1_size * 8)
    tables = Tables(fd, header, file_size)
    seen_l2: set[int] = set()
    for l1_index, l1_entry in enumerate(tables.l1):
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset:
            continue
        use(l2_offset, cluster)
        if l2_offset in seen_l2:
            continue
        seen_l2.add(l2_offset)
        base = l1_index * tables.l2_entries * cluster
        for l2_index in range(tables.l2_entries):
            guest = base + l2_index * cluster
            mapping = tables.lookup(guest)
            if mapping.kind is Kind.NORMAL or (mapping.kind is Kind.ZERO and mapping.host):
                use(mapping.host, cluster)
            elif mapping.kind is Kind.COMPRESSED:
                use(mapping.host, mapping.length)
    refcounts = Refcounts(fd, header, file_size)
    use(header.refcount_table_offset, header.refcount_table_clusters * cluster)
    for entry in refcounts.table:
        block = entry & OFFSET_MASK
        if block:
            use(block, cluster)
    result = CheckResult()
    last = max([*uses, (file_size - 1) // cluster]) if file_size else 0
    for n in range(last + 1):
        counted = refcounts.get(n)
        used = uses.get(n, 0)
        if counted:
            result.allocated += 1
        if counted > used:
            result.leaks.append(n)
        elif counted < used:
            result.corruptions.append(n)
    return result
