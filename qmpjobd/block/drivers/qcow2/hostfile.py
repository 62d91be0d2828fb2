"""The image file as the qcow2 driver uses it: positioned reads and writes, syncs, and copies
into it from another host file; every write and sync can be recorded in a write log.

Blocking throughout: the driver calls it from worker threads. The write log exists for one
purpose, testing the order of writes: a crash keeps some prefix of what was written since
the last sync, so replaying cut-off prefixes of the log onto a copy of the starting image shows
what a crash at any moment would leave (tests/test_qcow2_crash.py). It is switched on by
QMPJOBD_QCOW2_WRITE_LOG (docs/design.md, "qcow2 and crashes") and never in normal use.
"""

from __future__ import annotations

import collections
import itertools
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO, Final

from ..base import kernel_copy
from ..file import reserve_blocks, start_writeback
from .copier import Copier, CopierDied

# A log record: its kind, the offset and the length of the data that follows (a write), or
# nothing more (a sync); and its place among the records of every log of the process (a
# crash cuts all files at one moment).
_RECORD: Final = struct.Struct(">cQQQ")
_sequence = itertools.count()
WRITE: Final = b"W"
SYNC: Final = b"S"
EXTEND: Final = b"E"
# Written bytes gathered before the kernel is asked to start writing them out (write_behind):
# the sync a job must make (before a header names a new backing file, before a mirror is
# ready) then waits for little more than the last of them, not for everything the job wrote.
WRITEBACK_BATCH: Final = 16 << 20
# The shortest write past the file's end whose blocks are reserved first (reserve_blocks):
# for shorter ones the extra call costs about what it saves (64 KiB writes: 7% slower,
# 256 KiB: 12% faster). Data runs are this long; metadata, a cluster at a time, is not.
RESERVE_MIN: Final = 256 << 10
# Environment variable: a directory to write a log per image into (named after the image).
WRITE_LOG_ENV: Final = "QMPJOBD_QCOW2_WRITE_LOG"


class WriteLog:
    """An append-only record of the writes and syncs issued to one image file."""

    def __init__(self, path: str) -> None:
        # Unbuffered: each record is in the file once the call that made it returns, so a
        # reader (a test) sees every write and sync issued so far, in order.
        self._file: BinaryIO = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        with self._lock:
            self._file.write(_RECORD.pack(WRITE, offset, len(data), next(_sequence)))
            self._file.write(data)

    def sync(self) -> None:
        with self._lock:
            self._file.write(_RECORD.pack(SYNC, 0, 0, next(_sequence)))
            self._file.flush()

    def extend(self, size: int) -> None:
        with self._lock:
            self._file.write(_RECORD.pack(EXTEND, size, 0, next(_sequence)))

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_log(path: str) -> list[tuple[bytes, int, bytes, int]]:
    """The records of a write log: (WRITE, offset, data, sequence), (SYNC, 0, b"", sequence)
    or (EXTEND, new size, b"", sequence)."""
    records: list[tuple[bytes, int, bytes, int]] = []
    with open(path, "rb") as f:
        while head := f.read(_RECORD.size):
            kind, offset, length, sequence = _RECORD.unpack(head)
            records.append((kind, offset, f.read(length), sequence))
    return records


def copy_data(source_fd: int, source_offset: int, fd: int, offset: int, length: int,
              log: WriteLog | None, by_hand: bool = False) -> None:
    """The bytes of a copy into an image file (HostFile.copy_from) and nothing of its
    bookkeeping: in the kernel where it can (not BY_HAND), by hand from where the kernel
    stopped (the source's end, no support), zeroes past the source's end. With a write log,
    all by hand, each write recorded."""
    if log is None and not by_hand:
        copied, _ = kernel_copy(source_fd, source_offset, fd, offset, length)
        source_offset, offset, length = source_offset + copied, offset + copied, length - copied
    for at in range(0, length, 1 << 20):
        n = min(1 << 20, length - at)
        data = os.pread(source_fd, n, source_offset + at)
        data += bytes(n - len(data))
        if log is not None:
            log.write(offset + at, data)
        view = memoryview(data)
        done = 0
        while done < n:
            done += os.pwrite(fd, view[done:], offset + at + done)


class PendingCopy:
    """A copy into FILE started by HostFile.copy_later. `done` waits for the copier process to
    make it and makes by hand what the kernel left (after an error, or past the source's end:
    zeroes); all of it if there is no copier, or it died. OSError if that fails. Once done,
    `done` returns at once. The file counts the bytes as written (for its write-behind) once
    they are: a writeback started on pages the child is filling would wait for it. The source
    is held by a descriptor of its own until then (its node may be reopened meanwhile)."""

    def __init__(self, file: HostFile, copier: Copier | None, ticket: int, source_fd: int,
                 source_offset: int, offset: int, length: int) -> None:
        self._file = file
        self._copier = copier
        self._ticket = ticket
        self._source = os.dup(source_fd)
        self._at = (source_offset, offset, length)
        self._done = False

    def done(self) -> None:
        if self._done:
            return
        source_offset, offset, length = self._at
        file = self._file
        copied = 0
        try:
            if self._copier is not None:
                copied = self._copier.result(self._ticket)
        except CopierDied:
            pass  # whatever it made of this copy, made again here
        try:
            if copied < length:
                copy_data(self._source, source_offset + copied, file.fd, offset + copied,
                          length - copied, file.log, by_hand=bool(copied))
        finally:
            self._done = True
            os.close(self._source)
            file._wrote(offset, length)


def open_write_log(image_name: str) -> WriteLog | None:
    """The write log for IMAGE_NAME if logging is switched on, else None."""
    directory = os.environ.get(WRITE_LOG_ENV)
    if not directory:
        return None
    return WriteLog(os.path.join(directory, os.path.basename(image_name) + ".log"))


class HostFile:
    """An open image file: FD, whose length the driver tracks as it writes."""

    def __init__(
        self, fd: int, log: WriteLog | None = None, *, no_flush: bool = False,
        grew: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.log = log
        # Told each new length of the file (the file node keeps its size in step).
        self._grew = grew
        # cache.no-flush: the file's owner asked that syncs be skipped (QEMU's meaning).
        self.no_flush = no_flush
        # Whether anything was written since the last sync: a write that must reach the disk
        # after those needs one first.
        self.unsynced = False
        # Whether writeback starts as data is written (Node.write_behind); the span written
        # since it last started, and how many bytes.
        self.write_behind = False
        self._written_from = self._written_to = self._written = 0
        # Whether the file itself is shorter than `size` (extend): it catches up before the
        # next write or sync, unless that write reaches as far.
        self._short = False
        # How far the file's blocks are known to be allocated or reserved (a write past it
        # reserves its blocks first), and whether the file system can reserve them.
        self._reserved_to = self.size
        self._reserving = True

    def pread(self, offset: int, length: int) -> bytes:
        """LENGTH bytes at OFFSET; what lies past the end of the file reads as zeroes."""
        parts = []
        got = 0
        while got < length:
            part = os.pread(self.fd, length - got, offset + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        if got < length:
            parts.append(bytes(length - got))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.pwritev(offset, [data])

    def pwritev(self, offset: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """PARTS written one after the other from OFFSET, from where they are (several
        tables in one write without first joining them: no copy, no fresh memory)."""
        views = collections.deque(memoryview(part) for part in parts)
        length = sum(len(view) for view in views)
        self._catch_up(offset + length)
        self._reserve(offset, length)
        if self.log is not None:
            self.log.write(offset, b"".join(views) if len(views) > 1 else views[0])
        done = 0
        while views:
            n = os.pwritev(self.fd, views, offset + done)
            done += n
            while views and n >= len(views[0]):
                n -= len(views.popleft())
            if n:
                views[0] = views[0][n:]
        self._wrote(offset, length)
        self._grown_to(offset + length)

    def _reserve(self, offset: int, length: int) -> None:
        """Before a write of LENGTH bytes at OFFSET: its blocks reserved where it is long
        enough and goes past what was reserved (new clusters at the file's end)."""
        if self._to_reserve(offset, length):
            self._reserving = reserve_blocks(self.fd, offset, length)

    def _to_reserve(self, offset: int, length: int) -> bool:
        end = offset + length
        if length < RESERVE_MIN or end <= self._reserved_to or not self._reserving:
            return False
        self._reserved_to = end
        return True

    def _wrote(self, offset: int, length: int) -> None:
        self.unsynced = True
        if not self.write_behind:
            return
        if not self._written:
            self._written_from, self._written_to = offset, offset + length
        else:
            self._written_from = min(self._written_from, offset)
            self._written_to = max(self._written_to, offset + length)
        self._written += length
        if self._written >= WRITEBACK_BATCH and not self.no_flush:
            start_writeback(self.fd, self._written_from, self._written_to - self._written_from)
            self._written = 0

    def _grown_to(self, end: int) -> None:
        """A write that ended at END succeeded."""
        if end > self.size:
            self.size = end
            self._grew(end)
        if end == self.size:
            self._short = False  # the file on disk reaches as far as it must

    def copy_from(self, source_fd: int, source_offset: int, offset: int, length: int) -> None:
        """Copy LENGTH bytes at SOURCE_OFFSET of another file to OFFSET of this one, in the
        kernel where it can (what lies past the source's end becomes zeroes)."""
        self._catch_up(offset + length)
        self._reserve(offset, length)
        try:
            copy_data(source_fd, source_offset, self.fd, offset, length, self.log)
        finally:
            self._wrote(offset, length)
        self._grown_to(offset + length)

    def copy_later(self, copier: Copier | None, source_fd: int, source_offset: int,
                   offset: int, length: int) -> PendingCopy:
        """copy_from, made by COPIER's process while the caller goes on (without one: here,
        once the caller waits for it). The file is as long at once, and not synced; the
        caller waits for the copy (`PendingCopy.done`) before anything reads, writes or points
        at the range, and before the next sync (Qcow2Image's pending writes)."""
        self._catch_up(offset + length)
        ticket = -1
        if copier is None:
            self._reserve(offset, length)
        else:
            # Reserved by the copier: a call on the file here would wait for its copy first.
            ticket = copier.send(source_fd, source_offset, self.fd, offset, length,
                                 self._to_reserve(offset, length))
        # As long at once; on disk by the copy itself or, if the caller writes or syncs
        # first, by the catch-up (never shortened below the copy's end meanwhile).
        self.extend(offset + length)
        return PendingCopy(self, copier, ticket, source_fd, source_offset, offset, length)

    def extend(self, size: int) -> None:
        """Make the file at least SIZE bytes long (sparse): at once as far as anyone asks
        (`size`), on disk before the next write or sync. (A new L2 table makes the file
        longer; the data written next mostly lies past it, and lengthens the file itself.)"""
        if size <= self.size:
            return
        self.size = size
        self._grew(size)
        self._short = True
        self.unsynced = True  # (the next flush syncs, and so catches up)

    def _catch_up(self, end: int) -> None:
        """Before a write that ends at END (a sync: 0): the file as long as `size` says, so
        that nothing written refers to a cluster past its end; unless the write itself
        reaches that far (once it has, `_grown_to` says so)."""
        if not self._short or end >= self.size:
            return
        if self.log is not None:
            self.log.extend(self.size)
        os.ftruncate(self.fd, self.size)
        self._short = False
        self.unsynced = True

    def sync(self) -> None:
        self._catch_up(0)
        if self.log is not None:
            self.log.sync()
        if not self.no_flush:
            os.fdatasync(self.fd)
        self.unsynced = False
        self._written = 0
