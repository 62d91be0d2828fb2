"""A qcow2 image, open: the guest's view read and written, falling through to the backing
file where this layer holds nothing; and its metadata written out in an order that keeps the
file consistent whatever moment a crash picks.

The order (every step synced before the next starts, each skipped when there is nothing):
new data and raised reference counts first, then refcount table entries that point at new
refcount blocks, then L2 tables, then L1 entries that point at new L2 tables; clusters that
left the map are freed only after that, so no cluster is used again while the disk still
points at it. (An L2 table allocated since the last flush may be written at any time before
that: nothing on disk points at it until its L1 entry is written, after a sync.) A crash
leaks clusters at worst (`qemu-img check` reports leaks, never corruption), and everything a
flush covered reads back.

What a write does with each cluster is QEMU's (so that `qemu-img map` of an image written here
and one written by QEMU agree): a cluster this layer owns alone is written in place; any other
gets a new cluster, the L2 table first if its range has none, and the part of it not written
is copied from what the guest read there before (the backing file, zeroes, a compressed or
shared cluster). Zero writes set the zero flag where the image has one (version 3), and
discards drop clusters; both as QEMU's driver and the generic block layer above it do.

Blocking throughout, and thread-safe: the node calls it from worker threads, one request at a
time per image (a lock). A job may have its copies from another file made by a copier process
while it goes on (defer_copies): a write into new clusters has its entries set only once its
data is in place, and every such write is finished before anything else reads or writes its
range, or flushes.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from . import copier
from . import header as hdr
from .copier import Copier
from .header import Header, Qcow2Error, parse_header
from .hostfile import HostFile, PendingCopy
from .refcount import Refcounts, repair
from .tables import COMPRESSED, COPIED, OFFSET_MASK, ZERO, Kind, Mapping, Tables, encode

__all__ = ["Backing", "Kind", "Qcow2Image"]

# How much of the file the header may take: a cluster of the largest size.
_HEADER_READ: Final = 2 << 20
# Where the feature bit fields are in a version 3 header.
_INCOMPATIBLE_AT: Final = 72
_AUTOCLEAR_AT: Final = 88
# And the virtual size, and the L1 table's size and offset, in every version.
_SIZE_AT: Final = 24
_L1_FIELDS_AT: Final = 36
# The least range of an L2 table (4 KiB clusters) whose unallocated runs may go on past it
# (_status): a multiple of every job's granularity (64 KiB up to a 2 MiB target cluster), so
# no piece a job asks about ends inside a table, and no job splits its work differently.
_LONG_SPAN: Final = 2 << 20
_LONG_RUN_TABLES: Final = 1024



class Backing(Protocol):
    """What the image needs of its backing file (blocking calls, like the image's own)."""

    def read(self, offset: int, length: int) -> bytes | None:
        """LENGTH bytes at OFFSET (zeroes past its end); None for zeroes."""
        ...

    def reads_zero(self, offset: int, length: int) -> bool:
        """Whether the range reads as zeroes, by its metadata (block status)."""
        ...

# Where a write's data comes from: bytes, or (descriptor, offset) of another host file.
Source = bytes | memoryview | tuple[int, int]


def _part(source: Source, start: int, length: int) -> Source:
    if isinstance(source, tuple):
        return (source[0], source[1] + start)
    return memoryview(source)[start:start + length]


@dataclass(frozen=True, slots=True)
class _PendingWrite:
    """A write whose data a copier process is putting in place. Into new clusters (NEW): the
    entries that link them wait for it, so that nothing, in the cache or on disk, points at
    clusters before their data is there, and a failed copy leaves the range as it was. Over
    the image's own clusters: nothing to link, but it is waited for all the same, and a failed
    one leaves the range undefined, as any failed write does."""

    start: int  # the guest range (whole clusters when NEW)
    stop: int
    host: int
    copied: PendingCopy
    new: bool = False
    l2_offset: int = 0  # where NEW clusters are linked, and the entries they replace
    index: int = 0
    old: tuple[int, ...] = ()


class Qcow2Image:
    """An open image: `read`, `write`, `zero`, `discard`, `status`, `flush`, `close`."""

    def __init__(self, file: HostFile, *, writable: bool = False,
                 backing: Backing | None = None) -> None:
        self.file = file
        self._header_bytes = file.pread(0, min(_HEADER_READ, max(file.size, hdr.V2_LENGTH)))
        self.header: Header = parse_header(self._header_bytes, file.size)
        self.tables = Tables(file, self.header)
        self.refcounts = Refcounts(file, self.header)
        self.backing = backing
        self.size = self.header.size
        self.cluster_size = self.header.cluster_size
        self.writable = writable
        self.lock = threading.RLock()
        self._marked_dirty = False
        # defer_copies: the copier process, the writes waiting for it in the order made, and
        # those whose copy failed (guest offset, error), for settle_copies to report.
        self._deferring = False
        self._copier: Copier | None = None  # leased from defer_copies to settle_copies
        self._pending: list[_PendingWrite] = []
        self._failed_writes: list[tuple[int, OSError]] = []
        # (A table flushed to make room holds no pending entry: nothing waits for the copies.)
        self.tables.write_back = self._flush_locked
        if writable:
            self._open_for_writing()

    # -- opening and closing -------------------------------------------------------------

    def check_writable(self) -> None:
        """Qcow2Error if the image may not be written (before anything is written)."""
        if self.header.corrupt:
            raise Qcow2Error("qcow2: Image is corrupt; cannot be opened read/write")
        if self.header.nb_snapshots:
            raise Qcow2Error("qcow2 images with internal snapshots can only be opened "
                             "read-only by qmpjobd")

    def _open_for_writing(self) -> None:
        header = self.header
        self.check_writable()
        if header.dirty:
            # Left dirty (lazy refcounts, not closed): the counts may be behind.
            repair(self.file, header, self.tables, self.refcounts, self._flush_locked)
            self._flush_locked()
            self._set_incompatible(header.incompatible_features & ~hdr.DIRTY)
        if header.version >= 3 and header.autoclear_features:
            # Autoclear features describe data a writer unaware of them would not keep up to
            # date (persistent bitmaps): clearing the bits tells the next reader so.
            header.autoclear_features = 0
            self.file.pwrite(_AUTOCLEAR_AT, bytes(8))
            self.file.sync()

    def reopen(self, writable: bool) -> None:
        """Start or stop writing (a reopen of the node: the file's descriptor has changed to
        the new mode, `self.file.fd`). Stopping writes everything out first."""
        with self.lock:
            self._settle_all()
            if writable == self.writable:
                return
            if writable:
                self._open_for_writing()
                self.writable = True
            else:
                self.close()
                self.writable = False

    def _set_incompatible(self, features: int) -> None:
        self.header.incompatible_features = features
        self.file.pwrite(_INCOMPATIBLE_AT, features.to_bytes(8, "big"))
        self.file.sync()

    def _before_change(self) -> None:
        """An image with lazy refcounts is marked dirty before its first change (QEMU does;
        a reader that finds it dirty recounts)."""
        if not self.writable:
            raise Qcow2Error("Image is read-only")
        if self.header.lazy_refcounts and not self._marked_dirty:
            self._set_incompatible(self.header.incompatible_features | hdr.DIRTY)
            self._marked_dirty = True

    def close(self) -> None:
        """Write everything out; an image marked dirty for lazy refcounts is clean again. The
        caches are let go of (up to 32 MiB of tables: a closed node someone still refers to
        must not keep them)."""
        with self.lock:
            self._settle_all()
            if self.writable:
                self._flush_locked()
                if self._marked_dirty:
                    self._set_incompatible(self.header.incompatible_features & ~hdr.DIRTY)
                    self._marked_dirty = False
            self.tables.drop_cache()
            self.refcounts.drop_cache()
            if self._copier is not None:
                copier.give_back(self._copier)
                self._copier = None

    # -- reading ---------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """LENGTH bytes of the guest's view at OFFSET (zeroes beyond the virtual size)."""
        with self.lock:
            self._settle(offset, offset + length)
            return self._read(offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        end = offset + length
        position = offset
        while position < end:
            if position >= self.size:
                parts.append(bytes(end - position))
                break
            run, kind, host = self._status(position, min(end, self.size) - position)
            if kind is Kind.NORMAL:
                assert host is not None
                parts.append(self.file.pread(host, run))
            elif kind is Kind.COMPRESSED:
                parts.append(self._read_compressed(position, run))
            elif kind is Kind.ZERO or self.backing is None:
                parts.append(bytes(run))
            else:
                found = self.backing.read(position, run)
                parts.append(bytes(run) if found is None else found)
            position += run
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_compressed(self, position: int, length: int) -> bytes:
        cluster = self.cluster_size
        parts = []
        end = position + length
        while position < end:
            within = position % cluster
            n = min(cluster - within, end - position)
            mapping = self.tables.lookup(position)
            parts.append(self._decompress(mapping.host, mapping.length)[within:within + n])
            position += n
        return b"".join(parts)

    def _decompress(self, host: int, length: int) -> bytes:
        cluster = self.cluster_size
        compressed = self.file.pread(host, length)
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

    def status(self, offset: int, length: int) -> tuple[int, Kind, int | None]:
        """The first run of [OFFSET, OFFSET+LENGTH) that this layer maps alike: (its length,
        its kind, the host offset of its start for normal clusters that follow each other in
        the file, else None)."""
        with self.lock:
            self._settle(offset, offset + length)
            return self._status(offset, length)

    def _status(self, offset: int, length: int) -> tuple[int, Kind, int | None]:
        cluster = self.cluster_size
        tables = self.tables
        # As QEMU's: one answer never goes past the range of the L2 table it starts in (with
        # 512-byte clusters, 32 KiB; jobs then copy such short runs as data, as QEMU's do);
        # but for an unallocated run that reaches the table's end and goes on through tables
        # that do not exist, where the tables cover _LONG_SPAN or more (a job asking again
        # at each table's end would get the same answer: only the questions are fewer).
        span = tables.l2_entries * cluster
        end = min(offset + length, self.size, offset - offset % span + span)
        first = tables.lookup(offset)
        # Data, and zero clusters that keep a host cluster, report where they lie (QEMU's
        # map does), and a run of them ends where the file's order breaks.
        placed = first.kind is Kind.NORMAL or (first.kind is Kind.ZERO and first.host != 0)
        host = first.host + offset % cluster if placed else None
        position = offset - offset % cluster + cluster
        if not placed and first.kind is not Kind.COMPRESSED:
            # Runs of one entry (nothing, or a zero flag alone) are measured in one go.
            start = offset - offset % cluster
            position = start + cluster * tables.same_entries(start, -(-(end - start) // cluster))
        elif placed:
            # Clusters that follow each other in the file, measured in one go; the loop
            # below goes on from the first that does not (or lies past the file's end).
            start = offset - offset % cluster
            run = tables.progression(start, -(-(end - start) // cluster))
            run = min(run, max(1, -(-(self.file.size - first.host) // cluster)))
            position = start + cluster * run
        while position < end:
            if first.kind is Kind.UNALLOCATED:
                # A range with no L2 table is unallocated all through.
                l1_index = position // span
                if tables.no_table(l1_index):
                    position = end
                    break
            mapping = tables.lookup(position)
            if mapping.kind is not first.kind:
                break
            if host is not None and mapping.host != host + (position - offset):
                break
            if host is None and first.kind is Kind.ZERO and mapping.host:
                break  # a zero cluster that keeps a host cluster, after ones that do not
            position += cluster
        run_end = min(position, end)
        if (first.kind is Kind.UNALLOCATED and span >= _LONG_SPAN
                and run_end == offset - offset % span + span):
            # Unallocated to the table's end: on through the tables never allocated after it
            # (a step per table: at most _LONG_RUN_TABLES of them in one answer).
            limit = min(offset + length, self.size, run_end + _LONG_RUN_TABLES * span)
            l1_index = run_end // span
            while run_end < limit and tables.no_table(l1_index):
                run_end = min(run_end + span, limit)
                l1_index += 1
        return run_end - offset, first.kind, host

    # -- writing ---------------------------------------------------------------------------

    def write(self, offset: int, source: Source, length: int) -> None:
        """Write LENGTH bytes at OFFSET from SOURCE (bytes, or a place in another file)."""
        with self.lock:
            self._before_change()
            self._settle(offset, offset + length)
            self._write(offset, source, length)

    def _write(self, offset: int, source: Source, length: int) -> None:
        cluster = self.cluster_size
        end = offset + length
        position = offset
        while position < end:
            _, index, entry = self._entry(position)
            span_end = min(end, position - position % cluster
                           + (self.tables.l2_entries - index) * cluster)
            if entry & COPIED and not entry & (ZERO | COMPRESSED) and entry & OFFSET_MASK:
                # Ours alone: in place, as far as the clusters follow each other on the host.
                host = entry & OFFSET_MASK
                stop = position - position % cluster + cluster
                while stop < span_end and self._entry(stop)[2] == entry + (stop - (
                        position - position % cluster)):
                    stop += cluster
                stop = min(stop, span_end)
                part = _part(source, position - offset, stop - position)
                if self._deferring and isinstance(part, tuple):
                    # The copier makes this one too. The kernel lets one writer into a file
                    # at a time: two (the copier, and this thread copying in place) spun on
                    # its lock for each other, and an active commit, half of whose copies are
                    # in place, took 3-4 times as long in one run out of three.
                    copied = self.file.copy_later(self._copier, part[0], part[1],
                                                  host + position % cluster, stop - position)
                    self._pending.append(_PendingWrite(position, stop, host, copied))
                else:
                    self._put(host + position % cluster, part, stop - position)
                position = stop
                continue
            # A run of clusters that need new ones (or their kept zero cluster).
            stop = position - position % cluster + cluster
            if not entry and stop < span_end and not self._entry(stop)[2]:
                # A run of unallocated clusters after it, measured in one go.
                stop += cluster * self.tables.same_entries(stop, -(-(span_end - stop) // cluster))
            if not (entry & ZERO and entry & COPIED and entry & OFFSET_MASK):
                while stop < span_end:
                    later = self._entry(stop)[2]
                    if later & COPIED and later & OFFSET_MASK and not later & COMPRESSED:
                        break  # in place, or a kept zero cluster: a run of its own
                    stop += cluster
            stop = min(stop, span_end)
            self._write_allocating(position, stop, _part(source, position - offset,
                                                         stop - position))
            position = stop

    def _entry(self, guest: int) -> tuple[int, int, int]:
        """(L2 table offset or 0, index in it, the entry) of GUEST's cluster."""
        l1_index, index = divmod(guest >> self.header.cluster_bits, self.tables.l2_entries)
        l2_offset = self.tables.l1[l1_index] & OFFSET_MASK
        if not l2_offset:
            return 0, index, 0
        return l2_offset, index, self.tables.l2(l2_offset)[index]

    def _put(self, host: int, source: Source, length: int) -> None:
        if isinstance(source, tuple):
            self.file.copy_from(source[0], source[1], host, length)
        else:
            self.file.pwrite(host, source[:length])

    def _table_for_write(self, guest: int, fill: int = 0) -> int:
        """The L2 table of GUEST's range, allocated if it has none (every entry FILL: empty,
        or a zero cluster for a table zeroed whole)."""
        l1_index = (guest >> self.header.cluster_bits) // self.tables.l2_entries
        entry = self.tables.l1[l1_index]
        if entry & OFFSET_MASK:
            if not entry & COPIED:
                raise Qcow2Error(f"L2 table at {entry & OFFSET_MASK:#x} is shared (L1 index "
                                 f"{l1_index:#x}): repair the image with qemu-img check -r all")
            return entry & OFFSET_MASK
        offset = self.refcounts.alloc(self.cluster_size)
        self.tables.new_l2(offset, self.tables.filled(fill))
        self.tables.set_l1(l1_index, offset | COPIED)
        # QEMU writes a new table out at once: the file is that long from now on (what the
        # file node reports while the image is open), though the table itself waits for the
        # next flush here, and the file on disk for the next write (HostFile.extend).
        self.file.extend(offset + self.cluster_size)
        return offset

    def _write_allocating(self, start: int, stop: int, source: Source) -> None:
        """Write [START, STOP) (one L2 table's range) into new clusters, or into the cluster a
        zero entry kept; the rest of the first and last cluster comes from what was there."""
        cluster = self.cluster_size
        first = start - start % cluster
        last = -(-stop // cluster) * cluster
        count = (last - first) // cluster
        l2_offset = self._table_for_write(start)
        index = (first // cluster) % self.tables.l2_entries
        old = self.tables.l2(l2_offset)[index:index + count].tolist()
        # Copy-on-write: what the guest read before in the parts not written.
        head = self._read(first, start - first) if start > first else b""
        tail = self._read(stop, last - stop) if stop < last else b""
        kept = old[0] & OFFSET_MASK if count == 1 and old[0] & ZERO and old[0] & COPIED else 0
        host = kept or self.refcounts.alloc(count * cluster)
        if self._deferring and isinstance(source, tuple) and not (head or tail or kept):
            copied = self.file.copy_later(self._copier, source[0], source[1], host, stop - start)
            self._pending.append(_PendingWrite(first, last, host, copied, True, l2_offset,
                                               index, tuple(old)))
            return
        if head:
            self._put(host, head, len(head))
        self._put(host + start - first, source, stop - start)
        if tail:
            self._put(host + stop - first, tail, len(tail))
        self._link(l2_offset, index, host, count)
        if not kept:
            self._free_entries(old)

    def _link(self, l2_offset: int, index: int, host: int, count: int) -> None:
        """Entries INDEX.. of the table at L2_OFFSET point at COUNT clusters from HOST (their
        data in place)."""
        cluster = self.cluster_size
        self.tables.set_entries(l2_offset, index, [(host + i * cluster) | COPIED
                                                   for i in range(count)])

    def _free_entries(self, entries: Iterable[int]) -> None:
        """The clusters ENTRIES held (those that held any), freed once their replacements
        are on disk."""
        for entry in entries:
            if entry:
                self._free_entry(entry)

    # -- copies made by a copier process ---------------------------------------------------

    def defer_copies(self) -> None:
        """From now on, until settle_copies, a write from another file into new clusters
        (whole ones) or in place returns once the copy is started: a copier process makes it
        while the caller goes on (a job, to its next request: the kernel's copy and the job's
        own work overlap)."""
        with self.lock:
            if not self.writable:
                return
            self._deferring = True
            if self._copier is None and self.file.log is None:
                # No process to be had: the copies are made here, when settled. (So they are
                # with a write log, which records each write as it is made here.)
                with contextlib.suppress(OSError):
                    self._copier = copier.lease()

    def settle_copies(self) -> tuple[int, OSError] | None:
        """Every copy started done and its write finished; writes made whole again. The
        failed write with the lowest offset, if any: (its offset, the error); the range of
        each failed one into new clusters is as it was before (of one in place: undefined, as
        after any failed write)."""
        with self.lock:
            try:
                self._settle_all()
            except OSError as e:
                # The first write not linked fails (the job copies it again, as its policy
                # says); it stays queued, to be linked before anything touches its range.
                self._failed_writes.append((self._pending[0].start, e))
            finally:
                self._deferring = False
                if self._copier is not None and not self._pending:
                    copier.give_back(self._copier)
                    self._copier = None
            failed, self._failed_writes = self._failed_writes, []
        return min(failed, key=lambda failure: failure[0]) if failed else None

    def _settle(self, start: int, end: int) -> None:
        """Before a request on [START, END): the writes waiting for a copy there finished
        (and those started before them)."""
        last = 0
        for n, write in enumerate(self._pending, 1):
            if write.start < end and start < write.stop:
                last = n
        if last:
            self._finish_writes(last)

    def _settle_all(self) -> None:
        if self._pending:
            self._finish_writes(len(self._pending))

    def _finish_writes(self, count: int) -> None:
        """The first COUNT waiting writes finished, in order: once its copy is done, each
        into new clusters links them and frees what it replaces; one whose copy failed gives
        its new clusters back (nothing points at them) and is remembered for settle_copies. A
        write leaves the queue only once finished: if linking fails (a table that cannot be
        read back, a flush to make room that fails), it and those after it wait for the next
        try, and the error goes to the caller."""
        for _ in range(count):
            write = self._pending[0]
            try:
                write.copied.done()
            except OSError as e:
                del self._pending[0]
                if write.new:
                    self.refcounts.free_later(write.host, write.stop - write.start)
                self._failed_writes.append((write.start, e))
                continue
            if write.new:
                self._link(write.l2_offset, write.index, write.host,
                           (write.stop - write.start) // self.cluster_size)
            del self._pending[0]
            self._free_entries(write.old)

    def _free_entry(self, entry: int) -> None:
        """The clusters ENTRY held, freed once its replacement is on disk."""
        mapping = self._meaning(entry)
        if mapping.kind is Kind.COMPRESSED:
            self.refcounts.free_later(mapping.host, mapping.length)
        elif mapping.host:
            self.refcounts.free_later(mapping.host, self.cluster_size)

    def _meaning(self, entry: int) -> Mapping:
        if not entry:
            return Mapping(Kind.UNALLOCATED)
        return self.tables.meaning(entry, 0, 0)

    # -- zeroes and discards ----------------------------------------------------------------

    def zero(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make [OFFSET, OFFSET+LENGTH) read as zeroes, as QEMU's write-zeroes does: whole
        clusters by the zero flag (or, version 2 without a backing file, by dropping them);
        a part of a cluster too where the rest of it reads as zeroes already; else by writing
        zeroes."""
        with self.lock:
            self._before_change()
            self._settle(offset, offset + length)
            cluster = self.cluster_size
            end = offset + length
            aligned_start = min(end, -(-offset // cluster) * cluster)
            aligned_end = max(aligned_start, end - end % cluster)
            if end == self.size and end % cluster:
                aligned_end = end  # the image's last cluster, cut short: as if whole
            if offset < aligned_start:
                self._zero_part(offset, aligned_start - offset, may_unmap)
            if aligned_start < aligned_end:
                if self.header.version < 3 and self.backing is not None:
                    self._write(aligned_start, bytes(aligned_end - aligned_start),
                                aligned_end - aligned_start)
                else:
                    self._zero_clusters(aligned_start, aligned_end, may_unmap)
            if aligned_end < end:
                self._zero_part(aligned_end, end - aligned_end, may_unmap)

    def _zero_part(self, offset: int, length: int, may_unmap: bool) -> None:
        """Zero part of one cluster: the whole cluster by its entry if the rest of it reads as
        zeroes already and it holds no data; else by writing zeroes."""
        first = offset - offset % self.cluster_size
        end = offset + length
        rest_end = min(first + self.cluster_size, self.size)
        kind = self.tables.lookup(first).kind
        if (kind in (Kind.UNALLOCATED, Kind.ZERO)
                and not (self.header.version < 3 and self.backing is not None)
                and self._reads_zero(first, offset - first)
                and self._reads_zero(end, rest_end - end)):
            self._zero_clusters(first, first + self.cluster_size, may_unmap)
        else:
            self._write(offset, bytes(length), length)

    def _reads_zero(self, offset: int, length: int) -> bool:
        """Whether the guest reads zeroes in [OFFSET, OFFSET+LENGTH), by the metadata of the
        chain alone (QEMU asks the block status, not the data)."""
        end = min(offset + length, self.size)
        while offset < end:
            run, kind, _ = self._status(offset, end - offset)
            if kind is Kind.NORMAL or kind is Kind.COMPRESSED:
                return False
            if (kind is Kind.UNALLOCATED and self.backing is not None
                    and not self.backing.reads_zero(offset, run)):
                return False
            offset += run
        return True

    def _zero_clusters(self, start: int, end: int, may_unmap: bool) -> None:
        if self.header.version < 3:
            self._discard_clusters(start, end)
            return
        # A stretch of a table with nothing allocated in it (a fresh image, a sparse one)
        # takes the zero flag in one slice: zeroing a TiB must not cost a step per cluster.
        cluster = self.cluster_size
        span = self.tables.l2_entries * cluster
        position = start
        while position < end:
            stop = min(end, position - position % span + span)
            first = (position // cluster) % self.tables.l2_entries
            last = first + -(-(stop - position) // cluster)
            if stop - position == span and not self.tables.l1[position // span] & OFFSET_MASK:
                self._table_for_write(position, ZERO)  # a new table, zeroed whole
                position = stop
                continue
            l2_offset = self._table_for_write(position)
            if self.tables.clear(l2_offset, first, last):
                self.tables.fill_entries(l2_offset, first, last, ZERO)
            else:
                self._zero_entries(position, stop, may_unmap)
            position = stop

    def _zero_entries(self, start: int, end: int, may_unmap: bool) -> None:
        for l2_offset, index, entry in self._entries_for_write(start, end):
            mapping = self._meaning(entry)
            unmap = mapping.kind is Kind.COMPRESSED or (
                may_unmap and mapping.kind in (Kind.NORMAL, Kind.ZERO) and bool(mapping.host))
            new = (0 if unmap else entry) | ZERO
            if new != entry:
                self.tables.set_entry(l2_offset, index, new)
                if unmap:
                    self._free_entry(entry)

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters (a part of one is ignored, as QEMU does): they read as zeroes
        (version 3) or as the backing file (version 2, which QEMU refuses with one)."""
        with self.lock:
            self._before_change()
            self._settle(offset, offset + length)
            if self.header.version < 3 and self.backing is not None:
                return
            cluster = self.cluster_size
            start = -(-offset // cluster) * cluster
            end = offset + length
            if end != self.size:
                end -= end % cluster
            if start < end:
                self._discard_clusters(start, end)

    def _discard_clusters(self, start: int, end: int) -> None:
        for l2_offset, index, entry in self._entries_for_write(start, end):
            mapping = self._meaning(entry)
            new = entry
            if self.backing is not None or mapping.kind is not Kind.UNALLOCATED:
                new = ZERO if self.header.version >= 3 else 0
            if new != entry:
                self.tables.set_entry(l2_offset, index, new)
                self._free_entry(entry)

    def _entries_for_write(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(L2 table offset, index, entry) of each cluster of [START, END), its table
        allocated if it had none; read as each is reached, after the changes to those before."""
        cluster = self.cluster_size
        for position in range(start, end, cluster):
            l2_offset = self._table_for_write(position)
            index = (position // cluster) % self.tables.l2_entries
            yield l2_offset, index, self.tables.l2(l2_offset)[index]

    # -- making it durable -----------------------------------------------------------------

    def flush(self) -> None:
        with self.lock:
            self._settle_all()
            if self.writable:
                self._flush_locked()

    def _flush_locked(self) -> None:
        file = self.file
        refcounts = self.refcounts
        if refcounts.write_blocks() or file.unsynced:
            file.sync()
        if refcounts.write_table():
            file.sync()
        tables = self.tables.dirty_tables()
        for offset, data in tables:
            file.pwrite(offset, data)
        if tables:
            file.sync()
        runs = self.tables.dirty_l1_runs()
        for offset, data in runs:
            file.pwrite(offset, data)
        if runs:
            file.sync()
        if refcounts.pending_frees:
            refcounts.apply_frees()
            refcounts.write_blocks()
            file.sync()

    # -- the header and the tables' sizes ---------------------------------------------------

    def rewrite_header(self) -> None:
        """Write the whole header cluster from what is known of it."""
        with self.lock:
            self._settle_all()
            self.file.pwrite(0, self._header_cluster())
            self.file.sync()
            self._header_bytes = self.file.pread(0, self.cluster_size)

    def set_size(self, size: int) -> None:
        """The virtual size in the header (the L1 table covers it already)."""
        with self.lock:
            self._settle_all()
            self.header.size = self.size = size
            self.file.pwrite(_SIZE_AT, size.to_bytes(8, "big"))
            self.file.sync()

    def grow(self, size: int) -> None:
        """A larger virtual size: the L1 table grown to cover it (exactly), then the header."""
        with self.lock:
            self._settle_all()
            self._before_change()
            span = self.tables.l2_entries * self.cluster_size
            self.grow_l1(-(-size // span))
            self.set_size(size)

    def grow_l1(self, entries: int) -> None:
        """An L1 table of ENTRIES entries, in new clusters: the tables are written out, then
        the new L1 table, then the header points at it; the old one is freed."""
        with self.lock:
            self._settle_all()
            header = self.header
            if entries <= header.l1_size:
                return
            if entries > hdr.MAX_L1_BYTES // 8:
                raise Qcow2Error("Could not resize image: Failed to grow the L1 table: File too "
                                 "large")
            self._flush_locked()
            offset = self.refcounts.alloc(entries * 8)
            table = array("Q", bytes(entries * 8))
            table[:header.l1_size] = self.tables.l1
            self.refcounts.write_blocks()
            self.file.pwrite(offset, encode(table))
            self.file.sync()
            self.file.pwrite(_L1_FIELDS_AT, struct.pack(">IQ", entries, offset))
            self.file.sync()
            old_offset, old_entries = header.l1_table_offset, header.l1_size
            header.l1_size, header.l1_table_offset = entries, offset
            self.tables.l1 = table
            self.tables.resize_cache()
            if old_entries:
                self.refcounts.change(old_offset // self.cluster_size,
                                      -(-old_entries * 8 // self.cluster_size), -1)

    def preallocate(self, size: int) -> None:
        """preallocation=metadata: every L2 table and data cluster of [0, SIZE) allocated and
        mapped (the data not written: the file is made long enough, sparse)."""
        with self.lock:
            self._settle_all()
            cluster = self.cluster_size
            span = self.tables.l2_entries * cluster
            position = 0
            end = 0
            while position < size:
                stop = min(size, position - position % span + span)
                l2_offset = self._table_for_write(position)
                count = -(-(stop - position) // cluster)
                host = self.refcounts.alloc(count * cluster)
                index = (position // cluster) % self.tables.l2_entries
                for i in range(count):
                    self.tables.set_entry(l2_offset, index + i, (host + i * cluster) | COPIED)
                end = host + count * cluster
                position = stop
            self._flush_locked()
            self.file.extend(end)

    # -- the header ------------------------------------------------------------------------

    def set_backing(self, filename: str | None, fmt: str | None) -> None:
        """Name another backing file (or none) in the header, as QEMU rewrites it: the fields,
        the backing format extension, the feature table, the other extensions kept, the end
        marker, then the name. Everything else is written out first."""
        with self.lock:
            self._settle_all()
            self._before_change()
            self._flush_locked()
            header = self.header
            header.backing_file = filename
            header.backing_format = fmt if filename is not None else None
            self.file.pwrite(0, self._header_cluster())
            self.file.sync()
            self._header_bytes = self.file.pread(0, self.cluster_size)

    def _header_cluster(self) -> bytes:
        header = self.header
        v3 = header.version >= 3
        fields = [hdr.MAGIC, header.version, 0, 0, header.cluster_bits, header.size,
                  header.crypt_method, header.l1_size, header.l1_table_offset,
                  header.refcount_table_offset, header.refcount_table_clusters,
                  header.nb_snapshots, header.snapshots_offset]
        out = bytearray(struct.pack(">4sIQIIQIIQQIIQ", *fields))
        if v3:
            length = max(header.header_length, hdr.V3_LENGTH + 8)
            out += struct.pack(">QQQII", header.incompatible_features,
                               header.compatible_features, header.autoclear_features,
                               header.refcount_order, length)
            out += bytes([header.compression_type]) + bytes(7)
            # Header fields newer than ours are kept as they were.
            out += self._header_bytes[len(out):length]
        extensions: list[tuple[int, bytes]] = []
        if header.backing_format is not None:
            extensions.append((hdr.EXT_BACKING_FORMAT, header.backing_format.encode()))
        if v3 and self.cluster_size > 4096:
            extensions.append((hdr.EXT_FEATURE_TABLE, hdr.FEATURE_TABLE))
        extensions += [(kind, data) for kind, data in header.extensions
                       if kind not in (hdr.EXT_BACKING_FORMAT, hdr.EXT_FEATURE_TABLE)]
        for kind, data in extensions:
            out += struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)
        out += bytes(8)
        if header.backing_file is not None:
            name = header.backing_file.encode("utf-8", "surrogateescape")
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        if len(out) > self.cluster_size:
            raise Qcow2Error("Backing file name too long for the header")
        header.extensions = [e for e in extensions if e[0] != hdr.EXT_END]
        return bytes(out) + bytes(self.cluster_size - len(out))
