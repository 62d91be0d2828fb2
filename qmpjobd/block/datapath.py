"""Copying a range from one node to another: what backup and mirror do with every chunk.

Between two nodes backed by host files (file, or raw over file) a whole range is copied in one
worker-thread call: the source's data extents (SEEK_DATA/SEEK_HOLE) go through
os.copy_file_range, so the bytes never enter Python, and its holes stay holes on the target.
Other pairs (null-co on either side) go through the nodes' read and write.

A failure says which side failed and how far the copy got: the job's error policy
(on-source-error / on-target-error) depends on the side, and a retry starts where it stopped.
copy_file_range cannot tell a read error from a write error, so a range it fails on is redone
with pread and pwrite, which can.
"""

from __future__ import annotations

import errno
import os

import trio

from .drivers.base import Node
from .drivers.file import FileNode
from .drivers.raw import RawNode

# Per copy_file_range call: large enough that a call costs little, small enough that the
# progress of a failing copy is known to within one piece.
_PIECE = 8 << 20
# Copies by hand (pread/pwrite) go this much at a time.
_BY_HAND = 1 << 20
# copy_file_range cannot serve this pair of files at all (another file system, a kernel or
# file system without it): they copy with pread/pwrite from now on. (EINVAL, say for an
# O_DIRECT range out of alignment, falls back for that piece only.)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP})


class CopyFailed(Exception):
    """A copy stopped at source offset OFFSET: OPERATION ('read' or 'write') failed."""

    def __init__(self, operation: str, error: OSError, done: int) -> None:
        super().__init__(operation, error, done)
        self.operation = operation
        self.error = error
        self.done = done


def _host_file(node: Node) -> tuple[FileNode, int] | None:
    """The host file NODE's bytes live in, and where in it they start; None for null-co."""
    shift = 0
    while not isinstance(node, FileNode):
        if not isinstance(node, RawNode):
            return None
        shift += node.offset
        node = node.file
    return node, shift


def on_host_files(source: Node, target: Node) -> bool:
    """Whether both nodes keep their bytes in host files (copies between them are file I/O)."""
    return _host_file(source) is not None and _host_file(target) is not None


async def copy(source: Node, target: Node, offset: int, length: int) -> None:
    """Copy LENGTH bytes at OFFSET of SOURCE to the same place on TARGET (sizes are equal)."""
    src, dst = _host_file(source), _host_file(target)
    if src is not None and dst is not None:
        await trio.to_thread.run_sync(_copy_files, src[0], src[1], dst[0], dst[1], offset, length)
        return
    try:
        data = await source.read(offset, length)
    except OSError as e:
        raise CopyFailed("read", e, 0) from None
    try:
        await target.write(offset, data, length)
    except OSError as e:
        raise CopyFailed("write", e, 0) from None


def _copy_files(
    src: FileNode, src_shift: int, dst: FileNode, dst_shift: int, offset: int, length: int
) -> None:
    """In a worker thread: the source's extents in [OFFSET, OFFSET+LENGTH), data copied and
    holes kept. Past the end of the source file (the rest of its last sector) reads as zeroes."""
    end = offset + length
    data_end = min(end, src.file_size - src_shift)
    pos = offset
    while pos < end:
        if pos >= data_end:
            _zero(dst, dst_shift + pos, end - pos, pos - offset)
            return
        start, stop = _next_extent(src, src_shift + pos, src_shift + data_end)
        start, stop = start - src_shift, stop - src_shift
        if start > pos:  # a hole up to START
            _zero(dst, dst_shift + pos, start - pos, pos - offset)
            pos = start
            continue
        while pos < stop:
            n = min(_PIECE, stop - pos)
            _copy_piece(src, src_shift + pos, dst, dst_shift + pos, n, pos - offset)
            pos += n


def _next_extent(src: FileNode, pos: int, end: int) -> tuple[int, int]:
    """The next data extent at or after POS, clipped to END: (start, stop); (END, END) when
    there is none."""
    try:
        start = os.lseek(src.fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return end, end
        return pos, end  # no SEEK_DATA here: all data
    if start >= end:
        return end, end
    try:
        stop = os.lseek(src.fd, start, os.SEEK_HOLE)
    except OSError:
        stop = end
    return start, min(stop, end)


def _zero(dst: FileNode, at: int, length: int, done: int) -> None:
    try:
        dst.zero_sync(at, length)
    except OSError as e:
        raise CopyFailed("write", e, done) from None


def _copy_piece(src: FileNode, at: int, dst: FileNode, to: int, length: int, done: int) -> None:
    """Copy one piece of a data extent; on failure, find out which side failed."""
    if src.copy_range_ok and dst.copy_range_ok:
        copied = 0
        try:
            while copied < length:
                n = os.copy_file_range(src.fd, dst.fd, length - copied, at + copied, to + copied)
                if n == 0:  # the source ends before the piece does (it shrank): zeroes
                    break
                copied += n
            dst.grew_to(to + copied)
            if copied < length:
                _zero(dst, to + copied, length - copied, done + copied)
            return
        except OSError as e:
            if e.errno in _NO_COPY_RANGE:
                src.copy_range_ok = dst.copy_range_ok = False
            # Redo the rest by hand: that tells a read error from a write error.
            at, to, length, done = at + copied, to + copied, length - copied, done + copied
    while length > 0:
        # In steps of the jobs' usual chunk, so that a failure is placed to within one.
        n = min(length, _BY_HAND)
        try:
            data = src.read_sync(at, n)
        except OSError as e:
            raise CopyFailed("read", e, done) from None
        try:
            dst.write_sync(to, data, n)
        except OSError as e:
            raise CopyFailed("write", e, done) from None
        at, to, length, done = at + n, to + n, length - n, done + n
