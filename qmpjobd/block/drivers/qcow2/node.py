"""qcow2: the driver's node, over an open image (image.py) in a `file` node, with a backing
node below it.

blockdev-add's `backing` decides the backing node: a node name, an inline definition, null
(none, whatever the header says), or absent: then the file the header names is opened as QEMU
opens it (relative to the image's directory, read-only, in the format the header names or,
without one, the format its first bytes show), and so on down the chain. A chain that comes
back to an image already in it, or that is longer than MAX_CHAIN, is refused.

As QEMU's, a writable qcow2 node holds its file's write lock from the moment it is open (it
may write metadata at any time), and a read-only one refuses writers to its file; either
fails against another process's (or node's) holding (`Failed to get "write" lock`).

Every image call blocks and runs in a worker thread; the chain below is read from the same
thread through the nodes' blocking `read_sync` and `block_status`.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Final

import trio

from ...errors import BlockError
from ..base import Driver, Extent, HostExtent, Node, Opener, discard_option, is_zero
from ..file import FileNode
from ..filenames import filename
from .create import check_options, format_image, make_image
from .header import MAGIC, Qcow2Error
from .hostfile import HostFile, WriteLog, open_write_log
from .image import Kind, Qcow2Image
from .tables import L2_CACHE_MAX

# The deepest backing chain opened from image headers.
MAX_CHAIN: Final = 256
# The options QEMU's qcow2 driver has and qmpjobd's refuses (docs/compat.md).
_UNSUPPORTED: Final = ("encrypt", "data-file")
_INT_MAX: Final = (1 << 31) - 1


class _BackingView:
    """The backing node as the image reads it: bytes past its end read as zeroes."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def read(self, offset: int, length: int) -> bytes | None:
        size = self.node.size
        if offset >= size:
            return None
        inside = min(length, size - offset)
        data = self.node.read_sync(offset, inside)
        if inside == length:
            return data
        return (data if data is not None else bytes(inside)) + bytes(length - inside)

    def reads_zero(self, offset: int, length: int) -> bool:
        end = min(offset + length, self.node.size)
        while offset < end:
            extent = self.node.block_status(offset, end - offset)
            if not extent.zero:
                return False
            offset += extent.length
        return True


class Qcow2Node(Node):
    driver = "qcow2"
    takes_backing = True

    def __init__(self, name: str, file: FileNode, image: Qcow2Image, *, read_only: bool,
                 detect_zeroes: str, discard: bool) -> None:
        super().__init__(name, image.size, read_only)
        self.file = file
        self.child = file
        self.image = image
        self.detect_zeroes = detect_zeroes
        self.discard = discard
        # The backing file's name as QEMU keeps it to tell whether the backing node is the
        # one the image names: the header's name, the opened file's name once opened from
        # the header, the new name once a job rewrote the header.
        self.auto_backing_file = image.header.backing_file

    def attach_backing(self, backing: Node | None) -> None:
        self.backing = backing
        self.image.backing = _BackingView(backing) if backing is not None else None

    def set_backing_file(self, filename: str | None, fmt: str | None) -> None:
        try:
            self.image.set_backing(filename, fmt)
        except Qcow2Error as e:
            raise self._damaged(e) from None
        self.auto_backing_file = filename

    def reopen(self, read_only: bool) -> None:
        if read_only == self.read_only:
            return
        host = self.image.file
        if read_only:
            try:
                self.image.reopen(writable=False)
            except Qcow2Error as e:
                raise self._damaged(e) from None
            self.file.drop_write()
            self.file.reopen(True)
            self.file.take_shared()
            host.fd = self.file.fd
        else:
            self.file.reopen(False)
            host.fd = self.file.fd
            if host.log is None:
                host.log = open_write_log(self.file.filename)
            try:
                self.file.take_write()
                self.image.reopen(writable=True)
            except (BlockError, Qcow2Error) as e:
                self.file.drop_write()
                self.file.reopen(True)
                self.file.take_shared()
                host.fd = self.file.fd
                if isinstance(e, Qcow2Error):
                    raise BlockError(f"Image '{self.file.filename}' (node '{self.name}'): "
                                     f"{e}") from None
                raise
        self.read_only = read_only

    # -- I/O -------------------------------------------------------------------------------

    def _damaged(self, error: Qcow2Error) -> OSError:
        """Damage found while serving a request: an I/O error for the caller (a job's error
        policy decides), naming what is wrong. The image is left as it is."""
        return OSError(errno.EIO, f"Image '{self.file.filename}' (node '{self.name}'): {error}")

    def read_sync(self, offset: int, length: int) -> bytes | None:
        try:
            return self.image.read(offset, length)
        except Qcow2Error as e:
            raise self._damaged(e) from None

    async def read(self, offset: int, length: int) -> bytes | None:
        return await trio.to_thread.run_sync(self.read_sync, offset, length)

    def write_sync(self, offset: int, data: bytes | None, length: int) -> None:
        if data is not None and self.detect_zeroes != "off" and is_zero(data):
            data = None
        try:
            if data is None:
                unmap = self.detect_zeroes == "unmap" and self.discard
                self.image.zero(offset, length, may_unmap=unmap)
            else:
                self.image.write(offset, data, length)
        except Qcow2Error as e:
            raise self._damaged(e) from None

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        await trio.to_thread.run_sync(self.write_sync, offset, data, length)

    def write_behind(self, on: bool) -> None:
        self.image.file.write_behind = on

    def defer_copies_sync(self) -> None:
        self.image.defer_copies()

    def settle_copies_sync(self) -> tuple[int, OSError] | None:
        try:
            return self.image.settle_copies()
        except Qcow2Error as e:
            raise self._damaged(e) from None

    def can_zero_with_unmap(self) -> bool:
        # Version 2 images have no zero clusters: QEMU's qcow2 offers no unmapping zero writes.
        return self.discard and self.image.header.version >= 3

    def zero_sync(self, offset: int, length: int, may_unmap: bool = False) -> None:
        try:
            self.image.zero(offset, length, may_unmap=may_unmap and self.discard)
        except Qcow2Error as e:
            raise self._damaged(e) from None

    @property
    def cluster_size(self) -> int:
        return self.image.cluster_size

    def grow_sync(self, size: int) -> None:
        old = self.size
        try:
            self.image.grow(size)
            if self.backing is not None and self.backing.size > old:
                # What the backing file holds past the old end must not show through.
                self.image.zero(old, size - old)
        except Qcow2Error as e:
            raise self._damaged(e) from None
        self.size = size

    async def flush(self) -> None:
        if not self.read_only:
            await trio.to_thread.run_sync(self.image.flush)

    async def close(self) -> None:
        try:
            await trio.to_thread.run_sync(self.image.close)
        finally:
            self.file.drop_write()
            self.file.drop_shared()
            if self.file.fd >= 0 and self.image.file.log is not None:
                self.image.file.log.close()

    # -- what copies and chains need -----------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Extent:
        try:
            run, kind, _ = self.image.status(offset, length)
        except Qcow2Error as e:
            raise self._damaged(e) from None
        if kind is Kind.NORMAL or kind is Kind.COMPRESSED:
            return Extent(run, zero=False, allocated=True)
        if kind is Kind.ZERO:
            return Extent(run, zero=True, allocated=True)
        backing = self.backing
        if backing is None or offset >= backing.size:
            return Extent(run, zero=True, allocated=False)
        below = backing.block_status(offset, min(run, backing.size - offset))
        return Extent(below.length, zero=below.zero, allocated=False)

    def data_extent(self, offset: int, length: int) -> HostExtent | None:
        try:
            run, kind, host = self.image.status(offset, length)
        except Qcow2Error as e:
            raise self._damaged(e) from None
        if kind is Kind.NORMAL and host is not None:
            return HostExtent(self.file, host, run)
        backing = self.backing
        if kind is Kind.UNALLOCATED and backing is not None and offset < backing.size:
            return backing.data_extent(offset, min(run, backing.size - offset))
        return None

    def write_from_sync(self, offset: int, source: HostExtent) -> None:
        if self.detect_zeroes != "off":
            super().write_from_sync(offset, source)  # the data must be looked at
            return
        try:
            self.image.write(offset, (source.file.fd, source.offset), source.length)
        except Qcow2Error as e:
            raise self._damaged(e) from None

    def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        try:
            run, kind, _ = self.image.status(offset, length)
        except Qcow2Error as e:
            raise self._damaged(e) from None
        return kind is not Kind.UNALLOCATED, run

    # -- what query-named-block-nodes reports ---------------------------------------------------

    def backing_overridden(self) -> bool:
        """Whether the backing node is not the one the header names (QEMU then describes the
        node by a "json:" file name that says which). A backing node blockdev-add chose is
        compared with the name as the header writes it, one opened from the header with its
        own file name, as QEMU compares them."""
        if self.backing is None:
            return self.image.header.backing_file is not None
        return filename(self.backing) != self.auto_backing_file

    def full_backing_filename(self) -> str | None:
        name = self.image.header.backing_file
        if name is None:
            return None
        return backing_path(self.file.filename, name)

    @property
    def strong_options_given(self) -> bool:
        return self.backing_overridden()

    def describes_backing(self) -> bool:
        return self.backing_overridden()

    def format_info(self) -> dict[str, Any]:
        header = self.image.header
        info: dict[str, Any] = {
            "cluster-size": header.cluster_size,
            "dirty-flag": header.dirty,
            "format-specific": {"type": "qcow2", "data": self._specific()},
        }
        if header.backing_file is not None:
            info["backing-filename"] = header.backing_file
            info["full-backing-filename"] = self.full_backing_filename()
            if header.backing_format is not None:
                info["backing-filename-format"] = header.backing_format
        return info

    def _specific(self) -> dict[str, Any]:
        header = self.image.header
        if header.version == 2:
            return {"compat": "0.10", "refcount-bits": header.refcount_bits,
                    "compression-type": "zlib"}
        return {"compat": "1.1", "lazy-refcounts": header.lazy_refcounts,
                "corrupt": header.corrupt, "extended-l2": False,
                "refcount-bits": header.refcount_bits, "compression-type": "zlib"}


def backing_path(image_filename: str, backing: str) -> str:
    """The backing file's name as QEMU resolves it: relative to the image's directory (unless
    absolute, or a protocol's "proto:..." name)."""
    if os.path.isabs(backing) or ":" in backing.split("/", 1)[0]:
        return backing
    directory = os.path.dirname(image_filename)
    return os.path.join(directory, backing) if directory else backing


def probe_format(path: str) -> str:
    """The format an image opened without one named is opened in (a backing file, a drive-*
    target): its first bytes say. Blocking."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == MAGIC else "raw"
    except OSError:
        return "raw"  # the open that follows reports the file's error


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def open_qcow2(
    opener: Opener, name: str, options: dict[str, Any], inherited: dict[str, Any]
) -> Node:
    """blockdev-add's `qcow2` driver."""
    for option in _UNSUPPORTED:
        if option in options:
            raise BlockError(f"qcow2 option '{option}' is not supported by qmpjobd")
    read_only = options.get("read-only", inherited.get("read-only", False))
    cache = {**inherited.get("cache", {}), **options.get("cache", {})}
    ref = options["file"]
    inline = not isinstance(ref, str)
    if isinstance(ref, str):
        child = opener.lookup(ref)
    else:
        child = await opener.open_child(name, ref, {
            "read-only": read_only, "cache": cache,
            "discard": discard_option(options, inherited)})
    node: Qcow2Node | None = None
    log: WriteLog | None = None
    try:
        if not isinstance(child, FileNode):
            raise BlockError(f"qcow2 node '{name}': its file must be a 'file' node in qmpjobd")
        if child.read_only and not read_only:
            raise BlockError("Block node is read-only")
        if read_only:
            child.take_shared()
        else:
            child.take_write()
        log = open_write_log(child.filename) if not read_only else None
        host = HostFile(child.fd, log, no_flush=bool(cache.get("no-flush", False)),
                        grew=child.grew_to)
        # Opened for reading first: nothing is written (a dirty image's repair, the autoclear
        # bits) until the whole chain has opened, so that a node that fails to open leaves
        # its image as it was.
        try:
            image = await trio.to_thread.run_sync(lambda: Qcow2Image(host, writable=False))
            if not read_only:
                image.check_writable()
        except BlockError as e:
            raise BlockError(f"Image '{child.filename}' (node '{name}'): {e}") from None
        image.tables.cache_limit = _l2_cache_bytes(options, image.cluster_size, image.size)
        image.tables.resize_cache()
        node = Qcow2Node(name, child, image, read_only=read_only,
                         detect_zeroes=options.get("detect-zeroes", "off"),
                         discard=discard_option(options, inherited) == "unmap")
        child.monitor_owned = not inline
        if inline:
            child.owner = node
        await _open_backing(opener, node, options, inherited, cache)
        if not read_only:
            try:
                await trio.to_thread.run_sync(image.reopen, True)
            except BlockError as e:
                raise BlockError(f"Image '{child.filename}' (node '{name}'): {e}") from None
        return node
    except BaseException:
        with trio.CancelScope(shield=True):
            if node is not None:
                below = node.backing
                await node.close()
                if below is not None and below.owner is node:  # opened from the header
                    for gone in (below, *below.owned()):
                        await gone.close()
            elif isinstance(child, FileNode):
                child.drop_write()
                child.drop_shared()
                if log is not None:
                    log.close()
            if inline:
                await child.close()
        raise


def _l2_cache_bytes(options: dict[str, Any], cluster_size: int, size: int) -> int:
    """The bytes of L2 tables the node keeps: blockdev-add's cache options, checked and shared
    out as QEMU does (the refcount cache's share is not needed here: refcount blocks are
    written at each flush)."""
    combined = options.get("cache-size")
    l2 = options.get("l2-cache-size")
    refcount = options.get("refcount-cache-size")
    for key in ("cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size"):
        if options.get(key, 0) < 0:
            raise BlockError(f"Parameter '{key}' expects a non-negative number below 2^64")
    whole = -(-(-(-size // cluster_size) * 8) // cluster_size) * cluster_size
    result = min(whole, L2_CACHE_MAX if l2 is None else l2)
    refcount_share = refcount or 0
    if combined is not None:
        if l2 is not None and refcount is not None:
            raise BlockError("cache-size, l2-cache-size and refcount-cache-size may not be set "
                             "at the same time")
        if l2 is not None and l2 > combined:
            raise BlockError("l2-cache-size may not exceed cache-size")
        if refcount_share > combined:
            raise BlockError("refcount-cache-size may not exceed cache-size")
        min_refcount = 4 * cluster_size
        if l2 is not None:
            refcount_share = combined - result
        elif refcount is not None:
            result = combined - refcount
        elif combined >= whole + min_refcount:
            result, refcount_share = whole, combined - whole
        else:
            refcount_share = min(combined, min_refcount)
            result = combined - refcount_share
    entry = options.get("l2-cache-entry-size")
    if entry is None:
        # QEMU loads 4 KiB pieces of tables when the cache does not cover the image.
        entry = cluster_size if result >= whole else min(cluster_size, 4096)
    if not 512 <= entry <= cluster_size or entry & (entry - 1):
        raise BlockError("L2 cache entry size must be a power of two between 512 and the "
                         f"cluster size ({cluster_size})")
    if result // entry > _INT_MAX:
        raise BlockError("L2 cache size too big")
    if refcount_share // cluster_size > _INT_MAX:
        raise BlockError("Refcount cache size too big")
    return result


async def _open_backing(opener: Opener, node: Qcow2Node, options: dict[str, Any],
                        inherited: dict[str, Any], cache: dict[str, Any]) -> None:
    if "backing" in options:
        ref = options["backing"]
        if ref is None:
            node.attach_backing(None)
        elif isinstance(ref, str):
            node.attach_backing(opener.lookup(ref))
        else:
            below = await opener.open_child(node.name, ref, _backing_inherits(cache, {}))
            below.monitor_owned = False
            below.owner = node
            node.attach_backing(below)
        return
    named = node.full_backing_filename()
    if named is None:
        return
    chain: tuple[tuple[int, int], ...] = inherited.get("qcow2-chain", ())
    me = _identity(node.file.filename)
    if me is not None:
        chain = (*chain, me)
    if len(chain) > MAX_CHAIN:
        raise BlockError(f"Backing chain deeper than {MAX_CHAIN} images")
    if _identity(named) in chain:
        raise BlockError(f"Could not open backing file: backing chain of '{node.name}' loops "
                         f"back to '{named}'")
    fmt = node.image.header.backing_format or await trio.to_thread.run_sync(probe_format, named)
    below_options = {"driver": fmt, "file": {"driver": "file", "filename": named}}
    try:
        below = await opener.open_child(
            node.name, below_options, _backing_inherits(cache, {"qcow2-chain": chain}))
    except BlockError as e:
        # QEMU's words, after the image and node whose header named the file (which QEMU's
        # do not say: a chain may be deep).
        raise BlockError(f"Image '{node.file.filename}' (node '{node.name}'): Could not open "
                         f"backing file: {e}") from None
    below.monitor_owned = False
    below.owner = node
    node.attach_backing(below)
    node.auto_backing_file = filename(below)


def _backing_inherits(cache: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """What a backing node opened by its overlay inherits: read-only, the cache mode, and
    discard=unmap (QEMU lets lower layers free clusters, the top deciding when to ask)."""
    return {"read-only": True, "cache": cache, "discard": "unmap", **extra}


async def create_qcow2(opener: Opener, options: dict[str, Any]) -> None:
    """blockdev-create's `qcow2`: the image made in the `file` node the options name (or
    define inline, opened for the while), its options checked as QEMU checks them."""
    ref = options["file"]
    if isinstance(ref, str):
        node = opener.lookup(ref)
        temporary = False
    else:
        node = await opener.open_child("", ref, {})
        temporary = True
    try:
        if not isinstance(node, FileNode):
            raise BlockError("qcow2 images are made in 'file' nodes in qmpjobd")
        if node.read_only:
            raise BlockError("Block node is read-only")
        new = check_options(options)
        had_lock = node.writer_locked
        node.take_write()
        try:
            log = open_write_log(node.filename)
            try:
                await trio.to_thread.run_sync(
                    format_image, HostFile(node.fd, log, grew=node.grew_to), new)
            finally:
                if log is not None:
                    log.close()
        finally:
            if not had_lock:
                node.drop_write()
        await trio.to_thread.run_sync(node.refresh_size)
    finally:
        if temporary:
            with trio.CancelScope(shield=True):
                await node.close()


DRIVER = Driver(Qcow2Node, open_qcow2, create_qcow2, make_image)
