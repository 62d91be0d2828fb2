"""drive-backup's and drive-mirror's own targets: image files opened by name.

The target is opened as QEMU opens it, through the driver registry like any node, as internal
nodes QSD names '#blockNNN': the monitor does not see them (no blockdev-del), the graph lists
them while their job lasts, and they are closed when the job ends. Mode absolute-paths first
creates the image (the source's size, in `format` or the source's; the file is left behind if a
later check fails, as QEMU leaves it), mode existing opens the file there is (its format
probed if not given).

A new image names a backing file as QEMU's would: drive-backup's the source's backing file for
sync=top and the source itself for sync=none (attached as the target's backing node);
drive-mirror's the same, except for sync=full, and opens the target without its backing file.

QEMU's image locks keep a job off a target whose file is under a writable format node (such a
node takes its file's write permission and shares it with no one); a bare file node does not
hold it until a job writes it. QEMU finds out once the job is created: the job goes away at
once (BlockJob.late_error).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import trio

from ..jobs.manager import JobManager
from .drivers.base import Node
from .drivers.file import FileNode
from .drivers.filenames import filename as file_name
from .drivers.registry import DRIVERS, probe_format
from .errors import BlockError
from .graph import BlockGraph
from .jobs.backup import BackupJob, backup_job
from .jobs.blockjob import BlockJob
from .jobs.mirror import MirrorJob, mirror_job
from .nodes import close_with_owned, open_internal

# No image to make or open by name: null nodes are defined by their options.
_NULL_FORMATS = ("null-co", "null-aio")
# Other format drivers QEMU 7.2 has: known, but not implemented here.
_OTHER_FORMATS = frozenset({
    "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "parallels", "luks", "bochs",
    "cloop", "dmg", "blkdebug", "blkverify", "blklogwrites", "quorum", "throttle",
    "copy-on-read", "compress", "preallocate", "replication", "host_device", "host_cdrom",
    "nbd", "nfs", "ssh", "iscsi", "rbd", "gluster", "http", "https", "ftp", "ftps", "vvfat",
    "snapshot-access", "copy-before-write",
})


async def drive_backup_job(graph: BlockGraph, jobs: JobManager, args: dict[str, Any]) -> BackupJob:
    """A drive-backup's checks in QEMU's order: its target made or opened, then the job (not
    yet created), which closes that target when it ends."""
    source = graph.lookup(args["device"])
    sync = args["sync"]
    # The new image's backing file: the source's own for sync=top (a source without one is
    # copied whole), the source itself for sync=none (then the target's backing node too).
    backing = None
    if sync == "top":
        backing = source.backing
        if backing is None:
            sync = "full"
    elif sync == "none":
        backing = source
    args = {**args, "sync": sync}

    def make(target: Node) -> BackupJob:
        if sync == "none":
            if not target.takes_backing:
                raise BlockError(f"Driver '{target.driver}' of node '{target.name}' does not "
                                 "support backing files")
            graph.replace_backing(target, source)
        return backup_job(graph, jobs, args, target)

    # QEMU opens a drive-backup target with discard and detect-zeroes on; with sync=none, not
    # its backing file (the source is attached instead).
    extra = {"discard": "unmap", "detect-zeroes": "unmap"}
    return await _job_on_own_target(graph, jobs, source, args, extra, make, "write",
                                    backing, open_backing=sync != "none")


async def drive_mirror_job(graph: BlockGraph, jobs: JobManager, args: dict[str, Any]) -> MirrorJob:
    """A drive-mirror's checks in QEMU's order, its target opened, then the job (not yet
    created), which closes that target when it ends."""
    source = graph.lookup(args["device"])
    source.check_mirror_source()
    if "replaces" in args:
        if "node-name" not in args:
            raise BlockError(
                "a node-name must be provided when replacing a named node of the graph"
            )
        raise BlockError("not implemented yet")
    sync = args["sync"]
    backing = source.backing
    if backing is None and sync == "top":
        sync = "full"
    elif sync == "none":
        backing = source
    mode = args.get("mode", "absolute-paths")

    def make(target: Node) -> MirrorJob:
        return mirror_job(
            jobs, source, target, sync=sync, job_id=args.get("job-id"),
            granularity=args.get("granularity", 0), buf_size=args.get("buf-size", 0),
            auto_finalize=args.get("auto-finalize", True),
            auto_dismiss=args.get("auto-dismiss", True),
            on_source_error=args.get("on-source-error", "report"),
            on_target_error=args.get("on-target-error", "report"),
            # A new image reads as zeroes (every format here); an existing one may not.
            zero_target=sync == "full" and mode == "existing",
        )

    # The target takes the source's open flags: discard among them. Its backing file is not
    # opened: the mirror copies what the target must hold, and the target is closed when the
    # job ends (QEMU attaches the chain below for the moment between).
    extra = {"discard": "unmap"} if source.discard else {}
    return await _job_on_own_target(
        graph, jobs, source, args, extra, make, "consistent read",
        None if sync == "full" else backing, open_backing=False)


_Job = TypeVar("_Job", bound=BlockJob)


async def _job_on_own_target(
    graph: BlockGraph, jobs: JobManager, source: Node, args: dict[str, Any],
    extra: dict[str, str], make: Callable[[Node], _Job], lock: str, backing: Node | None,
    *, open_backing: bool,
) -> _Job:
    """Open the command's target (EXTRA: options QEMU adds; a new image names BACKING's file as
    its backing file, opened with it if OPEN_BACKING), MAKE the job on it, and have the
    target closed when the job ends (at once if the job is not made). LOCK: the permission
    QEMU's image locks refuse the job if another node holds the target's file."""
    target = await _open_target(graph, source, args, extra, backing, open_backing)
    try:
        job = make(target)
        job.late_error = _lock_conflict(graph, target, lock)
    except BaseException:
        with trio.CancelScope(shield=True):
            await close_target(graph, target)
        raise
    _close_when_ended(graph, jobs, job, target)
    return job


async def _open_target(
    graph: BlockGraph, source: Node, args: dict[str, Any], extra: dict[str, str],
    backing: Node | None, open_backing: bool,
) -> Node:
    mode = args.get("mode", "absolute-paths")
    filename = args["target"]
    fmt = args.get("format")
    if fmt is None and mode != "existing":
        fmt = source.driver
    if fmt is not None and fmt not in DRIVERS and fmt not in _NULL_FORMATS:
        if fmt not in _OTHER_FORMATS:
            raise BlockError(f"Unknown file format '{fmt}'")
        raise BlockError("not implemented yet")
    if mode != "existing":
        assert fmt is not None
        make_image = DRIVERS[fmt].make_image if fmt in DRIVERS else None
        if make_image is None:
            raise BlockError(f"Format driver '{fmt}' does not support image creation")
        named = None
        if backing is not None:
            if not DRIVERS[fmt].node_type.takes_backing:
                raise BlockError(f"Backing file not supported for file format '{fmt}'")
            named = (file_name(backing), backing.driver)
            if named[0] == filename:
                raise BlockError("Error: Trying to create an image with the same filename as "
                                 "the backing file")
        await trio.to_thread.run_sync(_refuse_open_file, graph, filename)
        await trio.to_thread.run_sync(make_image, filename, source.size, named)
    elif fmt is None:
        fmt = await trio.to_thread.run_sync(probe_format, filename)
    elif fmt in _NULL_FORMATS:
        raise BlockError("not implemented yet")
    assert fmt is not None
    file = {"driver": "file", "filename": filename}
    if fmt == "file":
        options: dict[str, Any] = {**file, **extra}
    else:
        options = {"driver": fmt, **extra, "file": file}
        if not open_backing and DRIVERS[fmt].node_type.takes_backing:
            options["backing"] = None
    node = await open_internal(graph, options)
    graph.add_internal(node)
    return node


def _refuse_open_file(graph: BlockGraph, filename: str) -> None:
    """A new image is not made over a file a node has open (QSD empties one whose nodes hold
    no image lock, the source's own raw file among them: docs/compat.md). Blocking."""
    try:
        st = os.stat(filename)
    except OSError:
        return  # nothing there yet (or nothing reachable: the creation says why)
    if next(_file_nodes_over(graph, st), None) is not None:
        raise BlockError('Failed to get "write" lock')


def _file_nodes_over(graph: BlockGraph, st: os.stat_result) -> Iterator[FileNode]:
    """The open file nodes (the monitor's and the daemon's own) over the file ST describes.
    Blocking (fstat)."""
    for node in [*graph.nodes(), *graph.internal_nodes()]:
        if isinstance(node, FileNode) and node.fd >= 0:
            other = os.fstat(node.fd)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                yield node


def _lock_conflict(graph: BlockGraph, target: Node, lock: str) -> str | None:
    """The error QEMU's image locks give a job writing TARGET, if another node holds its
    file: one under a writable format node, or one a job writes."""
    file = target.child if target.child is not None else target
    if not isinstance(file, FileNode):
        return None
    for node in _file_nodes_over(graph, os.fstat(file.fd)):
        if node is not file and (
                any(not parent.read_only for parent in node.parents) or node.target_of):
            return f'Failed to get shared "{lock}" lock'
    return None


async def close_target(graph: BlockGraph, node: Node) -> None:
    """Flush and close a drive-* target (and its file node); then the graph lets go of it, so
    that once the node is no longer listed its image is free (its locks dropped)."""
    try:
        await node.flush()
    except OSError:
        pass  # QEMU closes the image whatever its flush says
    finally:
        try:
            await close_with_owned(node)
        finally:
            graph.remove_internal(node)


def _close_when_ended(graph: BlockGraph, jobs: JobManager, job: BlockJob, target: Node) -> None:
    """The target is listed and held until the job has concluded, then closed (QEMU closes it
    as the job finalizes, just before `concluded`: docs/compat.md)."""
    graph.hold(target, job)

    async def watch() -> None:
        while not job.finished:
            await job.changed()
        with trio.CancelScope(shield=True):
            await close_target(graph, target)

    jobs.start_soon(watch)
