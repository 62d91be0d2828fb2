"""What every node is, and what every driver declares.

A node has a name, a size, its users (the jobs reading and writing it, its parents in the
graph) and the I/O every driver provides. Beyond read and write, the interface has what copies
and backing chains need, so that no caller has to know which driver a node is:

- `backing`: the node a format node falls through to for what it does not hold (None for the
  drivers so far, which have no backing files);
- `block_status`: for a range, how much of it from the start is data or reads as zeroes, and
  whether this layer holds it;
- `host_extent`: where a range's bytes live in a host file, so that a copy between two files
  can go through os.copy_file_range;
- and what query-named-block-nodes reports of it (`exact_filename`, `format_info`,
  `allocated_size`).

A driver is declared by a `Driver` (registry.py lists them): its name, how it opens a node from
blockdev-add's options; its node class says which of those options change the data.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, Protocol

from ..errors import BlockError

if TYPE_CHECKING:
    from .file import FileNode

_serials = itertools.count()
SECTOR = 512


def sectors_up(size: int) -> int:
    """SIZE rounded up to whole sectors, the block layer's unit of length."""
    return -(-size // SECTOR) * SECTOR


class Extent(NamedTuple):
    """The status of a range's first LENGTH bytes: all of them alike."""

    length: int
    # Reads as zeroes (a hole, a range past the data, a node that holds nothing).
    zero: bool
    # Held by this node's own layer (not by its backing chain, nor unallocated).
    allocated: bool


class HostExtent(NamedTuple):
    """Where a node's range lives on the host: OFFSET in the file node FILE, for LENGTH bytes."""

    file: FileNode
    offset: int
    length: int


class Node:
    # What the driver is: its name, the options that change the data (QEMU's strong runtime
    # options, besides driver and filename: a node opened with one is described by a "json:"
    # file name), and whether it is opened over the host itself rather than over another node
    # (QEMU's protocol drivers), and whether its images can name a backing file.
    driver: ClassVar[str] = ""
    strong_options: ClassVar[tuple[str, ...]] = ()
    is_protocol: ClassVar[bool] = False
    takes_backing: ClassVar[bool] = False

    def __init__(self, name: str, size: int, read_only: bool = False) -> None:
        self.name = name
        self.serial = next(_serials)  # creation order: query-named-block-nodes lists by it
        self.size = size
        self.read_only = read_only
        # The kind of the job writing this node ('backup', 'mirror'), and of those reading it.
        self.target_of: str | None = None
        self.source_of: list[str] = []
        # Nodes whose child this is (a raw node over it), and whether the monitor owns it (a
        # root given to blockdev-add) or a parent does (an inline child, deleted with it).
        self.parents: list[Node] = []
        # Opened with discard=unmap (its own or its parent's): QEMU's BDRV_O_UNMAP.
        self.discard = False
        self.monitor_owned = True
        # The node that opened this one as part of itself, and closes it (None: the monitor's
        # or a job's).
        self.owner: Node | None = None
        self.child: Node | None = None
        self.backing: Node | None = None
        # The checked blockdev-add options the node was opened with (for query-named-block-nodes).
        self.options: dict[str, Any] = {}

    # -- who may use the node ------------------------------------------------------------------

    def _busy(self, job: str) -> BlockError:
        return BlockError(f"Node '{self.name}' is busy: block device is in use by block job: {job}")

    def check_backup_source(self) -> None:
        """Several backups may read a node; nothing may while a job writes it or mirrors it."""
        if self.target_of is not None:
            raise self._busy(self.target_of)
        if "mirror" in self.source_of:
            raise self._busy("mirror")

    def check_mirror_source(self) -> None:
        # A node a job holds has a job's filter above it: it is no longer a root.
        if self.target_of is not None or self.source_of:
            raise BlockError("Need a root block node")

    def check_target(self) -> None:
        """A job's target: no other job may hold it."""
        if self.target_of is not None:
            raise self._busy(self.target_of)
        if self.source_of:
            raise self._busy(self.source_of[0])

    def check_removable(self) -> None:
        # QEMU asks the node's blockers first (a parent using it as its backing file, the
        # newest first: an overlay a commit moved onto it before the image it dropped), then
        # whether the monitor owns it, then whether anything else holds it.
        for parent in reversed(self.parents):
            if parent.backing is self:
                raise BlockError(
                    f"Node '{self.name}' is busy: node is used as backing hd of '{parent.name}'"
                )
        if not self.monitor_owned:
            raise BlockError(f"Node {self.name} is not owned by the monitor")
        # QSD words this differently for each role the node plays in a job.
        if self.target_of == "backup":
            raise self._busy("backup")
        if self.target_of is not None:
            raise BlockError(f"Node {self.name} is in use")
        if "mirror" in self.source_of:
            raise self._busy("mirror")
        if self.source_of or self.parents:
            raise BlockError(f"Block device {self.name} is in use")

    # -- I/O -------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | None:
        """LENGTH bytes at OFFSET; None for a range that reads as zeroes."""
        raise NotImplementedError

    def read_sync(self, offset: int, length: int) -> bytes | None:
        """`read`, blocking: what a format node calls from its worker thread to read the
        nodes below it."""
        raise NotImplementedError

    async def write(self, offset: int, data: bytes | None, length: int) -> None:
        """Write DATA at OFFSET (None: LENGTH zero bytes)."""
        raise NotImplementedError

    def write_sync(self, offset: int, data: bytes | None, length: int) -> None:
        """`write`, blocking (from a worker thread)."""
        raise NotImplementedError

    def write_exact_sync(self, offset: int, data: bytes) -> None:
        """DATA written as a guest writes it: zeroes among it are written too, not turned
        into holes (unless the node detects zeroes). Blocking."""
        self.write_sync(offset, data, len(data))

    def can_zero_with_unmap(self) -> bool:
        """Whether zero writes may free the space they cover (QEMU's
        bdrv_can_write_zeroes_with_unmap: opened with discard=unmap, and the driver can)."""
        return False

    def zero_sync(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """QEMU's write-zeroes: the range reads as zeroes; MAY_UNMAP lets the node free what
        held it, if it was opened to discard. Blocking."""
        self.write_sync(offset, None, length)

    def grow_sync(self, size: int) -> None:
        """Grow to SIZE bytes, the new part reading as zeroes (a commit's base smaller than
        what is committed into it). Blocking."""
        raise OSError(errno.ENOTSUP, "Image format driver does not support resize")

    @property
    def cluster_size(self) -> int:
        """The unit the node allocates in (a format's cluster), or 0 if it has none."""
        return 0

    async def flush(self) -> None:
        """Make written data durable."""

    def reopen(self, read_only: bool) -> None:
        """Become read-only or read-write, as QEMU reopens a node a job must write (a commit's
        base, opened read-only as a backing file) and once it is done. Raises BlockError if
        the node cannot be written. Blocking: a worker thread's."""
        self.read_only = read_only

    def write_behind(self, on: bool) -> None:
        """ON: the node will be flushed once a job has written it (a stream's top before its
        header is rewritten, a mirror's target before READY): write data out as it comes, so
        that the flush finds little left to wait for. Off again when the job is done."""

    def defer_copies_sync(self) -> None:
        """Until settle_copies_sync: write_from_sync may return once its copy is started,
        made by a process of the node's while the caller goes on to its next request (only
        the job that writes the node calls these, around a run of its requests). Blocking."""

    def settle_copies_sync(self) -> tuple[int, OSError] | None:
        """Every copy started done, its write finished; writes whole again. The failed write
        with the lowest offset, if any: (its offset, its error), its range as it was before.
        Blocking."""
        return None

    def take_write(self) -> None:
        """A job starts writing this node (file nodes take their image's write lock)."""

    def drop_write(self) -> None:
        """The job writing this node has ended."""

    async def close(self) -> None:
        """Release what the node holds (descriptors); after flush, on blockdev-del."""

    # -- what copies and chains need -----------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Extent:
        """The status of [OFFSET, OFFSET+LENGTH) from its start: a prefix of it that is all
        alike. May block (it asks the host file system): call it from a worker thread where the
        node has a host file."""
        raise NotImplementedError

    def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether this layer itself holds the first bytes of [OFFSET, OFFSET+LENGTH), and
        for how many bytes that holds (QEMU's bdrv_is_allocated: no look at which bytes are
        zeroes, nor below). A node that is not a format with a backing file holds all of
        it. May block: from a worker thread."""
        return True, length

    def host_extent(self, offset: int, length: int) -> HostExtent | None:
        """Where [OFFSET, OFFSET+LENGTH) lives in a host file, if all of it lives in one at one
        place; None otherwise (a node that keeps no bytes, a format that maps them)."""
        return None

    def data_extent(self, offset: int, length: int) -> HostExtent | None:
        """Where the first bytes of the range can be copied from as they read, in the kernel:
        a piece of a host file (its LENGTH may be shorter than asked), or None where they are
        not kept as they read (zeroes, compressed data). A format answers for the data of its
        own layer and of the chain below it. Blocking."""
        return self.host_extent(offset, length)

    def write_from_sync(self, offset: int, source: HostExtent) -> None:
        """SOURCE's bytes written at OFFSET as write_exact_sync writes them; a node over a
        host file has the kernel copy them (os.copy_file_range) where it can. Blocking."""
        data = os.pread(source.file.fd, source.length, source.offset)
        self.write_exact_sync(offset, data + bytes(source.length - len(data)))

    # -- what query-named-block-nodes reports ---------------------------------------------------

    @property
    def strong_options_given(self) -> bool:
        """Whether the node was opened with an option that changes its data."""
        return any(key in self.options for key in self.strong_options)

    def exact_filename(self) -> str:
        """The plain file name that opens the node again, or "" if it takes a "json:"
        description. A format node without data-changing options takes its protocol child's."""
        child = self.child
        if child is not None and child.is_protocol and not self.strong_options_given:
            return child.exact_filename()
        return ""

    def format_info(self) -> dict[str, Any]:
        """The driver's own members of the node's ImageInfo (QEMU's get-info)."""
        return {}

    def attach_backing(self, backing: Node | None) -> None:
        """BACKING is the node this one falls through to from now on (graph.py keeps the
        parents and owners in step)."""
        if backing is not None:
            raise BlockError(f"Node '{self.name}' cannot have a backing file")
        self.backing = None

    def set_backing_file(self, filename: str | None, fmt: str | None) -> None:
        """Name FILENAME (in format FMT) as the backing file in the image's header. Blocking."""
        raise BlockError(f"Node '{self.name}' has no backing file to change")

    def describes_backing(self) -> bool:
        """Whether the node's "json:" description names its backing node (QEMU does when it
        is not the one the image's header names)."""
        return False

    def children(self) -> list[Node]:
        """The nodes this one uses: its file, its backing node."""
        return [node for node in (self.child, self.backing) if node is not None]

    def owned(self) -> list[Node]:
        """The nodes opened with this one and closed with it (inline children, backing files
        opened from a header), depth first."""
        found: list[Node] = []
        for node in self.children():
            if node.owner is self:
                found.append(node)
                found.extend(node.owned())
        return found

    def allocated_size(self) -> int:
        """Bytes the node takes on the host (a format node: its file's). May block: from a
        worker thread."""
        return self.child.allocated_size() if self.child is not None else 0


class Opener(Protocol):
    """What a driver needs of the graph to open a node (nodes.py provides it)."""

    def lookup(self, name: str) -> Node:
        """A node the options refer to by name."""
        ...

    async def open_child(
        self, parent: str, options: dict[str, Any], inherited: dict[str, Any]
    ) -> Node:
        """A child given inline (a dict of options), opened with INHERITED settings."""
        ...


# Compared against, a piece at a time (bytes.startswith compares memory; iterating the bytes,
# as any() does, takes a thousand times as long on a run of zeroes).
_ZERO_VIEW: Final = memoryview(bytes(1 << 20))


def is_zero(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether DATA[START:END] holds nothing but zero bytes."""
    end = len(data) if end is None else min(end, len(data))
    piece = len(_ZERO_VIEW)
    return all(data.startswith(_ZERO_VIEW[:min(piece, end - at)], at)
               for at in range(start, end, piece))


def kernel_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
                length: int) -> tuple[int, OSError | None]:
    """os.copy_file_range until LENGTH bytes are copied or the source ends: (the bytes copied,
    the error that stopped it or None). The rest is the caller's: zeroes past the source's
    end, a copy by hand after an error. Blocking."""
    copied = 0
    try:
        while copied < length:
            n = os.copy_file_range(src_fd, dst_fd, length - copied, src_offset + copied,
                                   dst_offset + copied)
            if n == 0:
                break
            copied += n
    except OSError as e:
        return copied, e
    return copied, None


def discard_option(options: dict[str, Any], inherited: dict[str, Any]) -> str:
    """A node's discard setting: its own, else its parent's (QEMU's children inherit it)."""
    value: str = options.get("discard", inherited.get("discard", "ignore"))
    return value


OpenNode = Callable[[Opener, str, dict[str, Any], dict[str, Any]], Awaitable[Node]]
# blockdev-create's options for the driver -> the image made, with the graph's view for the
# nodes the options name (a format's `file`).
CreateImage = Callable[[Opener, dict[str, Any]], Awaitable[None]]
# What QEMU's bdrv_img_create does for one format (drive-backup's and drive-mirror's new
# targets): FILENAME made a new image of SIZE bytes with the format's defaults, naming BACKING
# (a file name and its format) as its backing file. Blocking: a worker thread's.
MakeImage = Callable[[str, int, "tuple[str, str] | None"], None]


class Driver(NamedTuple):
    """A driver as the registry knows it: the class of its nodes (which says what the driver
    is and reports), how it opens one and, if it can, how it creates an image.
    `open(opener, name, options, inherited)` makes a node from blockdev-add's checked options;
    INHERITED holds the settings an inline child takes from its parent (read-only, cache)."""

    node_type: type[Node]
    open: OpenNode
    create: CreateImage | None = None
    make_image: MakeImage | None = None

    @property
    def name(self) -> str:
        return self.node_type.driver
