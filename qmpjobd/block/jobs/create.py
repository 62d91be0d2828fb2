"""blockdev-create for the `file` driver: a `create` job (not a block job) making an image file.

As in qemu-storage-daemon 7.2: progress is 0/1 while it runs and 1/1 once it has ended (however
it ended); no BLOCK_JOB_* events; the job is never dismissed by itself (job-dismiss), and it
has no pause point (a pause is accepted and has no effect). The file is made in a worker thread.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Any

import trio

from ...jobs.errors import JobError
from ...jobs.job import Emit, Job

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
    """Create (or truncate) FILENAME to SIZE bytes; JobError with QEMU's words."""
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise JobError(f"Could not create '{filename}': {_strerror(e)}") from None
    try:
        if preallocation not in ("off", "falloc", "full"):
            raise JobError(f"Unsupported preallocation mode: {preallocation}")
        if nocow:
            _set_nocow(fd)
        try:
            os.ftruncate(fd, 0)
        except OSError as e:
            raise JobError(f"Could not clear the new file: {_strerror(e)}") from None
        if size >= 1 << 63:
            size -= 1 << 64  # QEMU takes the size (a uint64) as an int64
        if size < 0:
            raise JobError(f"Could not resize file: {os.strerror(22)}")
        if preallocation == "falloc":
            try:
                os.posix_fallocate(fd, 0, size) if size else None
            except OSError as e:
                raise JobError(f"Could not preallocate new data: {_strerror(e)}") from None
        elif preallocation == "full":
            _write_zeroes(fd, size)
        else:
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                raise JobError(f"Could not resize file: {_strerror(e)}") from None
            if size:
                # QEMU allocates the first block of a new image, so that probing finds it.
                os.pwrite(fd, bytes(min(FIRST_BLOCK, size)), 0)
    finally:
        os.close(fd)


def _write_zeroes(fd: int, size: int) -> None:
    zeroes = bytes(CHUNK)
    offset = 0
    try:
        while offset < size:
            n = min(CHUNK, size - offset)
            offset += os.pwrite(fd, zeroes[:n], offset)
    except OSError as e:
        raise JobError(f"Could not write zeros for preallocation: {_strerror(e)}") from None


class CreateJob(Job):
    job_type = "create"

    def __init__(self, job_id: str, emit: Emit, options: dict[str, Any]) -> None:
        super().__init__(job_id, emit, auto_finalize=True, auto_dismiss=False)
        self.options = options
        self.progress_total = 1

    async def run(self) -> None:
        opts = self.options
        self.io_begin()
        try:
            await trio.to_thread.run_sync(
                create_file, opts["filename"], opts["size"], opts.get("preallocation", "off"),
                opts.get("nocow", False),
            )
        finally:
            self.io_end()
            self.progress_current = 1
