"""Copying a range from one node to another: what backup and mirror do with every chunk.

Between two nodes whose bytes live in host files (their `host_extent`: file, or raw over file) a
whole range is copied in one worker-thread call: the source's data extents (its `block_status`)
go through os.copy_file_range, so the bytes never enter Python, and its holes stay holes on the
target. Other pairs (null-co on either side) go through the nodes' read and write.

A failure says which side failed and how far the copy got: the job's error policy
(on-source-error / on-target-error) depends on the side, and a retry starts where it stopped.
copy_file_range cannot tell a read error from a write error, so a range it fails on is redone
with pread and pwrite, which can.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import trio

from .drivers.base import Extent, Node, kernel_copy
from .errors import CopyFailed

if TYPE_CHECKING:
    from .drivers.file import FileNode

# Per copy_file_range call: large enough that a call costs little, small enough that the
# progress of a failing copy is known to within one piece.
_PIECE = 8 << 20
# Copies by hand (pread/pwrite) go this much at a time.
_BY_HAND = 1 << 20
# copy_file_range cannot serve this pair of files at all (another file system, a kernel or
# file system without it): they copy with pread/pwrite from now on. (EINVAL, say for an
# O_DIRECT range out of alignment, falls back for that piece only.)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP})


def on_host_files(source: Node, target: Node) -> bool:
    """Whether both nodes keep their bytes in host files (copies between them are file I/O)."""
    return (
        source.host_extent(0, source.size) is not None
        and target.host_extent(0, target.size) is not None
    )


async def copy(source: Node, target: Node, offset: int, length: int) -> None:
    """Copy LENGTH bytes at OFFSET of SOURCE to the same place on TARGET (sizes are equal)."""
    if (
        source.host_extent(offset, length) is not None
        and target.host_extent(offset, length) is not None
    ):
        await trio.to_thread.run_sync(_copy_files, source, target, offset, length)
        return
    try:
        data = await source.read(offset, length)
    except OSError as e:
        raise CopyFailed("read", e, 0) from None
    try:
        await target.write(offset, data, length)
    except OSError as e:
        raise CopyFailed("write", e, 0) from None


def _copy_files(source: Node, target: Node, offset: int, length: int) -> None:
    """In a worker thread: the source's extents in [OFFSET, OFFSET+LENGTH), data copied and
    holes kept (the source's block status says which is which)."""
    end = offset + length
    pos = offset
    while pos < end:
        extent = source.block_status(pos, end - pos)
        src = source.host_extent(pos, extent.length)
        dst = target.host_extent(pos, extent.length)
        assert src is not None and dst is not None  # both nodes live in host files (copy())
        if extent.zero:
            _zero(dst.file, dst.offset, extent.length, pos - offset)
        else:
            for at in range(0, extent.length, _PIECE):
                n = min(_PIECE, extent.length - at)
                _copy_piece(src.file, src.offset + at, dst.file, dst.offset + at, n,
                            pos + at - offset)
        pos += extent.length


def _zero(dst: FileNode, at: int, length: int, done: int) -> None:
    try:
        dst.zero_sync(at, length)
    except OSError as e:
        raise CopyFailed("write", e, done) from None


def _copy_piece(src: FileNode, at: int, dst: FileNode, to: int, length: int, done: int) -> None:
    """Copy one piece of a data extent; on failure, find out which side failed."""
    if src.copy_range_ok and dst.copy_range_ok:
        copied, error = kernel_copy(src.fd, at, dst.fd, to, length)
        if error is None:
            dst.grew_to(to + copied)
            if copied < length:  # the source ends before the piece does (it shrank): zeroes
                _zero(dst, to + copied, length - copied, done + copied)
            return
        if error.errno in _NO_COPY_RANGE:
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


async def copy_by_status(
    source: Node, target: Node, offset: int, length: int, *, granularity: int, unmap: bool
) -> None:
    """Copy a range as QEMU's mirror does when the nodes are not plain host files (a format
    maps the bytes): by the source's block status, through the whole chain below it, a run
    that reads as zeroes, at least GRANULARITY long and in whole target clusters, becomes a
    zero write on the target (freeing what held it if UNMAP and the target discards); every
    other piece, at least GRANULARITY long, is read and written as it is, zeroes included."""
    await trio.to_thread.run_sync(
        copy_by_status_sync, source, target, offset, length, granularity, unmap
    )


def copy_by_status_sync(
    source: Node, target: Node, offset: int, length: int, granularity: int, unmap: bool,
    first: Extent | None = None,
) -> int:
    """copy_by_status, in the worker thread the caller is in: the bytes written as data (not
    as zeroes). FIRST: the source's status at OFFSET, if the caller has asked already (over
    this range or a longer one)."""
    end = offset + length
    written = 0
    cluster = target.cluster_size or granularity
    pos = offset
    while pos < end:
        try:
            if first is not None and pos == offset:
                extent = Extent(min(first.length, length), first.zero, first.allocated)
            else:
                extent = source.block_status(pos, end - pos)
        except OSError as e:
            raise CopyFailed("read", e, pos - offset) from None
        n = extent.length - extent.length % granularity
        if (extent.zero and n and not pos % cluster
                and not (n % cluster and pos + n < target.size)):
            try:
                target.zero_sync(pos, n, unmap)
            except OSError as e:
                raise CopyFailed("write", e, pos - offset) from None
            pos += n
            continue
        n = min(max(n, granularity), end - pos)
        # Data kept as it reads, in one piece of a host file: the kernel copies it. (Only
        # whole: the write must be the one QEMU makes, for a target that detects zeroes.)
        try:
            piece = None if extent.zero else source.data_extent(pos, n)
        except OSError as e:
            raise CopyFailed("read", e, pos - offset) from None
        if piece is not None and piece.length == n:
            try:
                target.write_from_sync(pos, piece)
            except OSError as e:
                raise CopyFailed("write", e, pos - offset) from None
            pos += n
            written += n
            continue
        try:
            data = source.read_sync(pos, n)
        except OSError as e:
            raise CopyFailed("read", e, pos - offset) from None
        try:
            target.write_exact_sync(pos, data if data is not None else bytes(n))
        except OSError as e:
            raise CopyFailed("write", e, pos - offset) from None
        pos += n
        written += n
    return written


def copy_as_read_sync(source: Node, target: Node, offset: int, length: int) -> None:
    """What SOURCE reads over the range, written into TARGET as a guest writes it (zeroes as
    data: QEMU's commit writes the buffer it read); the pieces kept as they read in host
    files are copied in the kernel (by the target's copier, if it defers copies). A failure
    is CopyFailed, with the bytes done before it. Blocking."""
    done = 0
    while done < length:
        pos = offset + done
        try:
            piece = source.data_extent(pos, length - done)
            if piece is None:
                n = min(source.block_status(pos, length - done).length, length - done)
                data = source.read_sync(pos, n)
        except OSError as e:
            raise CopyFailed("read", e, done) from None
        try:
            if piece is not None:
                target.write_from_sync(pos, piece)
                n = piece.length
            else:
                target.write_exact_sync(pos, data if data is not None else bytes(n))
        except OSError as e:
            raise CopyFailed("write", e, done) from None
        done += n
