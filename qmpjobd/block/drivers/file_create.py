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


def create_file(filename: str, size: int, preallocation: str, nocow: bool) -> None:
    """Create (or truncate) FILENAME to SIZE bytes; BlockError with QEMU's words."""
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BlockError(f"Could not create '{filename}': {_strerror(e)}") from None
    try:
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
