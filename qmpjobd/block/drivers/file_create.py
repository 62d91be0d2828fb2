"""Creating an image file for the `file` driver (blockdev-create, drive-* targets), as QEMU's
file-posix driver makes one. Blocking: a worker thread's job."""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Any

import trio

from ..errors import BlockError

CHUNK = 1 << 20
FIRST_BLOCK = 4096
# Linux's FS_IOC_SETFLAGS / FS_IOC_GETFLAGS and FS_NOCOW_FL (only btrfs honours it).
_GETFLAGS = 0x80086601
_SETFLAGS = 0x40086602
_NOCOW = 0x00800000
# F_OFD_* are in Linux's fcntl.h; Python's fcntl module has them only on some builds.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# QEMU's lock bytes: 100 + permission bit for each permission a node holds, 200 + bit for each
# permission it refuses to share. WRITE is permission bit 1.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_WRITE_BIT = 1


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _set_nocow(fd: int) -> None:
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _GETFLAGS, buf)
        flags = struct.unpack("l", bytes(buf))[0] | _NOCOW
        fcntl.ioctl(fd, _SETFLAGS, struct.pack("l", flags))
    except OSError:
        pass  # best effort, as QEMU


def _write_refused(fd: int) -> bool:
    """Whether another open description of the file refuses to share the write permission
    (holds QEMU's lock byte for it: a format node over the file, reading or writing)."""
    probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET,
                        LOCK_SHARED_BASE + PERM_WRITE_BIT, 1, 0)
    try:
        found = fcntl.fcntl(fd, F_OFD_GETLK, probe)
    except OSError:
        return False  # no OFD locks here: nothing to ask
    kind: int = struct.unpack("hhqqi4x", found)[0]
    return kind != fcntl.F_UNLCK


def create_file(filename: str, size: int, preallocation: str, nocow: bool) -> None:
    """Create (or truncate) FILENAME to SIZE bytes; BlockError with QEMU's words. An image
    another node uses (it holds the lock that refuses writers) is left alone, as QEMU's
    file-posix leaves it."""
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BlockError(f"Could not create '{filename}': {_strerror(e)}") from None
    try:
        if _write_refused(fd):
            raise BlockError('Failed to get "write" lock')
        if preallocation not in ("off", "falloc", "full"):
            raise BlockError(f"Unsupported preallocation mode: {preallocation}")
        if nocow:
            _set_nocow(fd)
        try:
            os.ftruncate(fd, 0)
        except OSError as e:
            raise BlockError(f"Could not clear the new file: {_strerror(e)}") from None
        if size >= 1 << 63:
            size -= 1 << 64  # QEMU takes the size (a uint64) as an int64
        if size < 0:
            raise BlockError(f"Could not resize file: {os.strerror(22)}")
        if preallocation == "falloc":
            try:
                os.posix_fallocate(fd, 0, size) if size else None
            except OSError as e:
                raise BlockError(f"Could not preallocate new data: {_strerror(e)}") from None
        elif preallocation == "full":
            _write_zeroes(fd, size)
        else:
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                raise BlockError(f"Could not resize file: {_strerror(e)}") from None
            if size:
                # QEMU allocates the first block of a new image, so that probing finds it.
                os.pwrite(fd, bytes(min(FIRST_BLOCK, size)), 0)
    finally:
        os.close(fd)


def make_image(filename: str, size: int, backing: tuple[str, str] | None) -> None:
    """A drive-* target in a format without backing files (`file`, `raw`): a new file of SIZE
    bytes. (The caller refuses BACKING with QEMU's words first.)"""
    assert backing is None
    create_file(filename, size, "off", False)


def _write_zeroes(fd: int, size: int) -> None:
    zeroes = bytes(CHUNK)
    offset = 0
    try:
        while offset < size:
            n = min(CHUNK, size - offset)
            offset += os.pwrite(fd, zeroes[:n], offset)
    except OSError as e:
        raise BlockError(f"Could not write zeros for preallocation: {_strerror(e)}") from None


async def create(opener: object, options: dict[str, Any]) -> None:
    """blockdev-create's BlockdevCreateOptionsFile (in a worker thread)."""
    await trio.to_thread.run_sync(
        create_file, options["filename"], options["size"], options.get("preallocation", "off"),
        options.get("nocow", False),
    )
