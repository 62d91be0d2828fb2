"""file: a node over a regular file (or block device) of the host.

Every system call that may wait on a disk runs in a worker thread, never on the event loop.
Holes are kept: a read of a range the file has no data in returns None, and a write of zeroes
punches a hole (or does nothing where there is one already), so a copy of a sparse image stays
sparse. QSD fills them; the bytes are the same (docs/compat.md). With cache.direct the file is
opened O_DIRECT and read and written through page-aligned buffers. Copies between two files do
not come through here but through os.copy_file_range (../datapath.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from typing import Any

import trio

from ..errors import BlockError
from . import file_create
from .base import (
    Driver,
    Extent,
    HostExtent,
    Node,
    Opener,
    discard_option,
    is_zero,
    kernel_copy,
    sectors_up,
)
from .file_create import (  # QEMU's lock bytes
    F_OFD_GETLK,
    F_OFD_SETLK,
    LOCK_PERM_BASE,
    LOCK_SHARED_BASE,
    PERM_WRITE_BIT,
)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

# The C library the interpreter already has loaded (dlopen(NULL)): ctypes.util.find_library
# would run ldconfig in a child process, a few milliseconds of every start.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing a range's dirty pages to the disk, without waiting for
    them: the sync that must come later then finds less to wait for. Best effort (a failure
    here is the sync's to report)."""
    _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def reserve_blocks(fd: int, offset: int, length: int) -> bool:
    """Have the file system allocate a range's blocks before it is written, the file's size
    kept (they read as zeroes until then): on ext4 and xfs a write into a reserved range
    costs markedly less than one into a hole, which must reserve its blocks page by page
    (a 512 MiB copy: 140 ms instead of 172). Best effort (a real failure, such as a full
    disk, is the write's to report); False where the file system cannot reserve at all."""
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    return ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS)


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range, keeping the file's size; False where the file system cannot."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return bool(_libc.fallocate(fd, mode, offset, length) == 0)


def _ofd_lock(fd: int, kind: int, start: int, cmd: int = F_OFD_SETLK) -> bytes:
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    # (l_pid must be 0 for OFD locks).
    arg = struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)
    return fcntl.fcntl(fd, cmd, arg)


_SEGMENT = 65536


# O_DIRECT wants buffers, offsets and lengths aligned to the device's logical block; a page
# (4 KiB) satisfies every device there is.
_DIRECT_ALIGN = 4096


def _pread(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def _direct_read(fd: int, offset: int, length: int) -> bytes:
    """Read through O_DIRECT: an aligned window into a page-aligned (mmap) buffer."""
    first = offset - offset % _DIRECT_ALIGN
    size = -(-(offset + length - first) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    with mmap.mmap(-1, size) as buf:
        got = os.preadv(fd, [buf], first)
        return buf[offset - first:min(got, offset - first + length)]


def _direct_write(fd: int, offset: int, view: memoryview) -> None:
    """Write aligned data through O_DIRECT from a page-aligned (mmap) copy of it."""
    with mmap.mmap(-1, len(view)) as buf, memoryview(buf) as aligned:
        aligned[:] = view
        done = 0
        while done < len(view):
            done += os.pwritev(fd, [aligned[done:]], offset + done)


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) holds no data (SEEK_DATA finds none before its end)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        # ENXIO: no data at or after OFFSET; anything else (no SEEK_DATA here): assume data.
        return e.errno == errno.ENXIO


class FileNode(Node):
    driver = "file"
    is_protocol = True

    def __init__(
        self, name: str, fd: int, filename: str, *, read_only: bool, no_flush: bool,
        discard: bool, locking: bool, direct: bool = False,
    ) -> None:
        st = os.fstat(fd)
        self.file_size = st.st_size
        # The block layer counts whole sectors: a 1000-byte file is a 1024-byte node.
        super().__init__(name, sectors_up(st.st_size), read_only)
        self.fd = fd
        self.filename = filename
        self.no_flush = no_flush
        self.direct = direct
        self.discard = discard
        self.locking = locking
        self._writer_locked = False
        self._shared_locked = False
        # Whether os.copy_file_range may serve copies from or to this file (datapath.py).
        self.copy_range_ok = True
        # An O_DIRECT file's second, buffered descriptor, opened when first needed.
        self._buffered = -1

    # -- locks (QEMU's byte-range protocol, so QEMU and qmpjobd see each other's writers) --

    def take_write(self) -> None:
        """Take the write permission and refuse it to others; fails if another process (QEMU
        or qmpjobd) already writes this image."""
        if self.direct and self.file_size % _DIRECT_ALIGN:
            # O_DIRECT writes whole blocks: one that ends the file would grow it.
            raise BlockError(
                "Cannot get 'write' permission without 'resize': Image size is not a multiple "
                "of request alignment"
            )
        if not self.locking or self._writer_locked:
            return
        # Hold "I write" and "I refuse others writing" (shared read locks), then check that no
        # other open file description holds either byte: that would be another writer.
        starts = (LOCK_PERM_BASE + PERM_WRITE_BIT, LOCK_SHARED_BASE + PERM_WRITE_BIT)
        try:
            for start in starts:
                _ofd_lock(self.fd, fcntl.F_RDLCK, start)
            for start in starts:
                probe = _ofd_lock(self.fd, fcntl.F_WRLCK, start, F_OFD_GETLK)
                if struct.unpack("hhqqi4x", probe)[0] != fcntl.F_UNLCK:
                    raise OSError(errno.EAGAIN, "locked")
        except OSError as e:
            for start in starts:
                _ofd_lock(self.fd, fcntl.F_UNLCK, start)
            # QEMU adds a hint ("Is another process using the image?") that QMP does not carry.
            raise BlockError('Failed to get "write" lock') from e
        self._writer_locked = True

    @property
    def writer_locked(self) -> bool:
        return self._writer_locked

    def refresh_size(self) -> None:
        """The file was written through another path (a format making an image in it): its
        size as the host has it now. Blocking."""
        self.file_size = os.fstat(self.fd).st_size
        self.size = sectors_up(self.file_size)

    def take_shared(self) -> None:
        """Refuse the write permission to others, as a read-only format node over the file
        does (its metadata must not change under it); fails if another holds it."""
        if not self.locking or self._shared_locked:
            return
        start = LOCK_SHARED_BASE + PERM_WRITE_BIT
        try:
            _ofd_lock(self.fd, fcntl.F_RDLCK, start)
            probe = _ofd_lock(self.fd, fcntl.F_WRLCK, LOCK_PERM_BASE + PERM_WRITE_BIT,
                              F_OFD_GETLK)
            if struct.unpack("hhqqi4x", probe)[0] != fcntl.F_UNLCK:
                raise OSError(errno.EAGAIN, "locked")
        except OSError as e:
            _ofd_lock(self.fd, fcntl.F_UNLCK, start)
            raise BlockError('Failed to get shared "write" lock') from e
        self._shared_locked = True

    def drop_shared(self) -> None:
        if self._shared_locked:
            if not self._writer_locked:  # the writer's lock refuses others' writes too
                _ofd_lock(self.fd, fcntl.F_UNLCK, LOCK_SHARED_BASE + PERM_WRITE_BIT)
            self._shared_locked = False

    def drop_write(self) -> None:
        if self._writer_locked:
            for start in (LOCK_PERM_BASE + PERM_WRITE_BIT, LOCK_SHARED_BASE + PERM_WRITE_BIT):
                _ofd_lock(self.fd, fcntl.F_UNLCK, start)
            self._writer_locked = False

    def reopen(self, read_only: bool) -> None:
        """A new descriptor of the same file (by /proc/self/fd: the same file even if renamed
        since) in the new mode, with the locks the old one held."""
        if read_only == self.read_only:
            return
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if self.direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", flags)
        except OSError as e:
            raise BlockError(f"Could not reopen file: {e.strerror}") from None
        shared, writer = self._shared_locked, self._writer_locked
        # The old description's locks go with it: one description's read lock would be a
        # conflict for the probe of the other's.
        old, self.fd = self.fd, fd
        self._shared_locked = self._writer_locked = False
        os.close(old)
        if self._buffered >= 0:
            os.close(self._buffered)
            self._buffered = -1
        self.read_only = read_only
        if shared:
            self.take_shared()
        if writer and not read_only:
            self.take_write()

    # -- I/O: the *_sync methods block and run in worker threads, one hop per request --

    def read_sync(self, offset: int, length: int) -> bytes | None:
        if offset >= self.file_size or _is_hole(self.fd, offset, length):
            return None
        read = _direct_read if self.direct else _pread
        parts = []
        got = 0
        while got < length:
            # A short read is the end of the file, or a failure further on: the next read
            # says which (b'' or an error).
            part = read(self.fd, offset + got, length - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        if got < length:  # the tail of the last sector, past the end of the file
            parts.append(bytes(length - got))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read(self, offset: int, length: int) -> bytes | None:
        return await trio.to_thread.run_sync(self.read_sync, offset, length)

    def write_sync(self, offset: int, data: bytes | None, length: int) -> None:
        if data is None:
            self.zero_sync(offset, length)
            return
        # Runs of zero segments become holes, so that a chunk read with some holes in it (a
        # partly sparse range reads as bytes) keeps them on this side.
        view = memoryview(data)
        start = 0
        while start < len(view):
            zero = is_zero(data, start, start + _SEGMENT)
            end = start + _SEGMENT
            while end < len(view) and is_zero(data, end, end + _SEGMENT) == zero:
                end += _SEGMENT
            end = min(end, len(view))
            if zero:
                self.zero_sync(offset + start, end - start)
            else:
                self._pwrite(offset + start, view[start:end])
            start = end

    def grow_sync(self, size: int) -> None:
        if size > self.file_size:
            os.ftruncate(self.fd, size)
            self.grew_to(size)

    def write_exact_sync(self, offset: int, data: bytes) -> None:
        self._pwrite(offset, memoryview(data))

    def can_zero_with_unmap(self) -> bool:
        return self.discard

    def zero_sync(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make [OFFSET, OFFSET+LENGTH) read as zeroes: a hole where there is data."""
        end = min(offset + length, self.file_size)
        if end <= offset or _is_hole(self.fd, offset, end - offset):
            return
        if not _punch_hole(self.fd, offset, end - offset):
            self._pwrite(offset, memoryview(bytes(end - offset)))

    def _pwrite(self, offset: int, view: memoryview) -> None:
        if self.direct and not (offset | len(view)) % _DIRECT_ALIGN:
            _direct_write(self.fd, offset, view)
        else:
            # Buffered (also the unaligned tail of an O_DIRECT file, through a second,
            # buffered description of it: O_DIRECT cannot write part of a block).
            fd = self._buffered_fd() if self.direct else self.fd
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        self.grew_to(offset + len(view))

    def grew_to(self, end: int) -> None:
        """Data was written up to END: the file is at least that long now."""
        if end > self.file_size:
            self.file_size = end
            self.size = sectors_up(end)

    def _buffered_fd(self) -> int:
        if self._buffered < 0:
            self._buffered = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        return self._buffered

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        await trio.to_thread.run_sync(self.write_sync, offset, data, length)

    async def flush(self) -> None:
        if not self.no_flush and not self.read_only and self.fd >= 0:
            await trio.to_thread.run_sync(os.fdatasync, self.fd)

    async def close(self) -> None:
        fd, self.fd = self.fd, -1
        if self._buffered >= 0:
            buffered, self._buffered = self._buffered, -1
            await trio.to_thread.run_sync(os.close, buffered)
        if fd >= 0:
            # Closing the descriptor drops its OFD locks.
            self._writer_locked = self._shared_locked = False
            await trio.to_thread.run_sync(os.close, fd)


    # -- status and place of a range, and what query-named-block-nodes reports ----------------

    def block_status(self, offset: int, length: int) -> Extent:
        """Data or hole, from SEEK_DATA/SEEK_HOLE; what lies past the end of the file (the rest
        of its last sector) reads as zeroes. Blocking: a worker's job."""
        data_end = min(offset + length, self.file_size)
        if offset >= data_end:
            return Extent(length, zero=True, allocated=True)
        try:
            start = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from here on
                return Extent(length, zero=True, allocated=True)
            return Extent(data_end - offset, zero=False, allocated=True)  # no SEEK_DATA here
        if start > offset:
            return Extent(min(start, offset + length) - offset, zero=True, allocated=True)
        try:
            stop = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            stop = data_end
        # At least one byte: the file may change under us between the two calls.
        return Extent(max(min(stop, data_end) - offset, 1), zero=False, allocated=True)

    def host_extent(self, offset: int, length: int) -> HostExtent | None:
        return HostExtent(self, offset, length)

    def write_from_sync(self, offset: int, source: HostExtent) -> None:
        if self.direct:
            super().write_from_sync(offset, source)
            return
        # What the kernel does not copy (past the source's end, after an error) goes by hand.
        copied, _ = kernel_copy(source.file.fd, source.offset, self.fd, offset, source.length)
        if copied:
            self.grew_to(offset + copied)
        if copied < source.length:
            rest = HostExtent(source.file, source.offset + copied, source.length - copied)
            super().write_from_sync(offset + copied, rest)

    def exact_filename(self) -> str:
        return self.filename

    def format_info(self) -> dict[str, object]:
        # The file driver answers QEMU's get-info: its image has a dirty flag (always clear).
        return {"dirty-flag": False}

    def allocated_size(self) -> int:
        try:
            return os.fstat(self.fd).st_blocks * 512 if self.fd >= 0 else 0
        except OSError:
            return 0  # closed meanwhile: it will not be listed again


async def open_file_node(
    opener: Opener, name: str, options: dict[str, Any], inherited: dict[str, Any]
) -> Node:
    """blockdev-add's `file` driver, with QEMU's checks and messages."""
    discard = discard_option(options, inherited) == "unmap"
    if options.get("detect-zeroes") == "unmap" and not discard:
        raise BlockError(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to "
            "unmap"
        )
    cache = {**inherited.get("cache", {}), **options.get("cache", {})}
    direct = cache.get("direct", False)
    if options.get("aio") == "native" and not direct:
        raise BlockError(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
        )
    filename = options["filename"]
    fd, read_only = await trio.to_thread.run_sync(
        lambda: open_file(
            filename, read_only=options.get("read-only", inherited.get("read-only", False)),
            auto_read_only=options.get("auto-read-only", False), direct=direct,
        )
    )
    try:
        # locking=auto: QEMU locks wherever the file system has OFD locks (every Linux one).
        return FileNode(
            name, fd, filename, read_only=read_only, no_flush=cache.get("no-flush", False),
            direct=direct, discard=discard, locking=options.get("locking", "auto") != "off",
        )
    except BaseException:
        os.close(fd)
        raise


DRIVER = Driver(FileNode, open_file_node, file_create.create, file_create.make_image)


def open_file(
    filename: str, *, read_only: bool, auto_read_only: bool, direct: bool,
) -> tuple[int, bool]:
    """Open FILENAME as QEMU's file driver does: (descriptor, read-only). With auto-read-only a
    file that cannot be opened for writing is opened read-only. Blocking: a worker's job."""
    flags = os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    if not filename:
        raise BlockError("The 'file' block driver requires a file name")

    def attempt(ro: bool) -> int:
        return os.open(filename, flags | (os.O_RDONLY if ro else os.O_RDWR))

    try:
        fd = attempt(read_only)
    except OSError as e:
        if not read_only and auto_read_only and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            try:
                return _check_kind(attempt(True), filename), True
            except OSError:
                pass
        raise BlockError(f"Could not open '{filename}': {os.strerror(e.errno or 0)}") from e
    return _check_kind(fd, filename), read_only


def _check_kind(fd: int, filename: str) -> int:
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        raise BlockError(f"'file' driver requires '{filename}' to be a regular file")
    return fd
