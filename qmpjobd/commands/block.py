"""Handlers for schema/block-core.json: nodes, the block jobs and the block-job-* verbs.

Arguments arrive as the schema declares them (qapi/visit.py): enums as str, structs as dicts,
boxed commands (blockdev-add, blockdev-backup) as one dict keyed by the schema's member names.
drive-backup and drive-mirror open their own target (raw or file, created or existing).
block-stream and block-commit act as QEMU's do on nodes without a backing file, the only kind
this milestone has.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from ..block.drivers.base import Node
from ..block.drivers.file import FileNode, open_file
from ..block.drivers.raw import RawNode
from ..block.graph import BlockError
from ..block.info import named_block_nodes
from ..block.jobs.backup import CLUSTER, BackupJob
from ..block.jobs.blockjob import BlockJob
from ..block.jobs.commit import check_commit
from ..block.jobs.create import CreateJob, create_file
from ..block.jobs.mirror import MirrorJob
from ..block.jobs.stream import StreamJob
from ..block.nodes import generated_name, open_node
from ..dispatch import Context, handler
from ..jobs.errors import JobError
from ..jobs.job import Job
from ..qmp.errors import QmpError

# -- nodes ---------------------------------------------------------------------------------


@handler("blockdev-add")
async def blockdev_add(ctx: Context, options: dict[str, Any]) -> None:
    node = await open_node(ctx.graph, options)
    try:
        ctx.graph.add(node)  # the name may have been taken while the node opened
    except BlockError:
        with trio.CancelScope(shield=True):
            await node.close()
        raise


@handler("blockdev-del")
async def blockdev_del(ctx: Context, *, node_name: str) -> None:
    node = ctx.graph.remove(node_name)
    # QEMU flushes a node before it lets go of it; an inline child goes with its parent. The
    # node has left the graph: close it whatever happens (a failed flush, a cancelled call).
    try:
        await node.flush()
    finally:
        with trio.CancelScope(shield=True):
            await node.close()
            if node.child is not None and not node.child.monitor_owned:
                await node.child.close()


# -- starting jobs ---------------------------------------------------------------------------


def _check_job_id(ctx: Context, job_id: str | None) -> str:
    # Without a job-id QEMU names the job after the device; QSD's nodes have no device name.
    job_id = job_id or ""
    ctx.jobs.check_new_id(job_id)
    return job_id


async def _launch(ctx: Context, job: Job, speed: int) -> None:
    """Register JOB (`created`), apply its speed, start it (`running`) and let it take its
    first step, as QEMU's job does before the command replies."""
    create_job(ctx, job, speed)
    job.start(ctx.job_nursery)
    await job.run_until_blocked()


# Errors QEMU meets only once the job is created (a drive-* target's image lock): the job
# goes away at once.
_late_errors: dict[Job, str] = {}


def _fail_when_created(job: Job, error: str | None) -> None:
    if error is not None:
        _late_errors[job] = error


def create_job(ctx: Context, job: Job, speed: int) -> None:
    ctx.jobs.add(job)
    job.transition("created")
    late = _late_errors.pop(job, None)
    if late is not None:
        job.transition("null")
        release(job)
        raise BlockError(late)
    if speed < 0:
        # QEMU has created the job when it checks the speed: it goes away at once.
        job.transition("null")
        release(job)
        raise JobError("Parameter 'speed' expects a non-negative value")
    job.speed = speed
    job.limit.set_speed(speed)


def release(job: Job) -> None:
    if isinstance(job, BlockJob):
        job.abort()


def prepare_backup(
    ctx: Context, args: dict[str, Any], target: Node | None = None
) -> BackupJob:
    """A blockdev-backup's checks in QEMU's order, then the job (not yet created). TARGET: a
    drive-backup's own target node, in place of the node args['target'] names."""
    source = ctx.graph.lookup(args["device"])
    if target is None:
        target = ctx.graph.lookup(args["target"])
    if source is target:
        raise BlockError("Source and target cannot be the same")
    source.check_backup_source()
    target.check_target()
    perf = args.get("x-perf", {})
    workers = perf.get("max-workers", 64)
    if workers < 1 or workers > 2147483647:
        raise BlockError("max-workers must be between 1 and 2147483647")
    max_chunk = perf.get("max-chunk", 0)
    if max_chunk < 0:
        raise BlockError("max-chunk must be zero (which means no limit) or positive")
    sync = args["sync"]
    if sync in ("incremental", "bitmap") and "bitmap" not in args:
        raise BlockError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if source.size != target.size:
        raise BlockError("Source and target image have different sizes")
    if max_chunk and max_chunk < CLUSTER:
        raise BlockError(
            f"Required max-chunk ({max_chunk}) is less than backup cluster size ({CLUSTER})"
        )
    job_id = _check_job_id(ctx, args.get("job-id"))
    try:
        return BackupJob(
            job_id, ctx.events.emit, source, target, sync=sync, max_chunk=max_chunk,
            auto_finalize=args.get("auto-finalize", True),
            auto_dismiss=args.get("auto-dismiss", True),
            on_source_error=args.get("on-source-error", "report"),
            on_target_error=args.get("on-target-error", "report"),
        )
    except BlockError as e:
        # QEMU meets the target's image lock while inserting its copy-before-write node.
        raise BlockError(f"Could not create node: {e}") from None


@handler("blockdev-backup")
async def blockdev_backup(ctx: Context, args: dict[str, Any]) -> None:
    job = prepare_backup(ctx, args)
    await _launch(ctx, job, args.get("speed", 0))


@handler("blockdev-mirror")
async def blockdev_mirror(
    ctx: Context, *, device: str, target: str, sync: str, job_id: str | None = None,
    replaces: str | None = None, speed: int = 0, granularity: int = 0, buf_size: int = 0,
    on_source_error: str = "report", on_target_error: str = "report",
    filter_node_name: str | None = None, copy_mode: str = "background",
    auto_finalize: bool = True, auto_dismiss: bool = True,
) -> None:
    source = ctx.graph.lookup(device)
    target_node = ctx.graph.lookup(target)
    if source is target_node:
        raise BlockError("Can't mirror node into itself")
    source.check_mirror_source()
    target_node.check_target()
    if granularity and not 512 <= granularity <= 64 << 20:
        raise BlockError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise BlockError("Parameter 'granularity' expects a power of 2")
    if buf_size < 0:
        raise BlockError("Invalid parameter 'buf-size'")
    if sync in ("incremental", "bitmap"):
        raise BlockError(f"Sync mode '{sync}' not supported")
    job = MirrorJob(
        _check_job_id(ctx, job_id), ctx.events.emit, source, target_node, sync=sync,
        granularity=granularity, buf_size=buf_size, auto_finalize=auto_finalize,
        auto_dismiss=auto_dismiss, on_source_error=on_source_error,
        on_target_error=on_target_error,
    )
    await _launch(ctx, job, speed)


# -- the block-job-* verbs -----------------------------------------------------------------


def _block_job(ctx: Context, device: str) -> BlockJob:
    job = ctx.jobs.find_block(device)
    if not isinstance(job, BlockJob):  # blockdev-create's: QEMU's block_job_get() skips it
        raise QmpError("DeviceNotActive", f"Block job '{device}' not found")
    return job


@handler("block-job-set-speed")
async def block_job_set_speed(ctx: Context, *, device: str, speed: int) -> None:
    job = _block_job(ctx, device)
    if job.set_speed(speed):
        await job.run_until_blocked()  # a faster pace: the job's next step comes first


@handler("block-job-cancel")
async def block_job_cancel(ctx: Context, *, device: str, force: bool = False) -> None:
    job = _block_job(ctx, device)
    if job.user_paused and not force:
        raise JobError(f"The block job for device '{device}' is currently paused")
    job.cancel(force)
    await job.settle()


@handler("block-job-pause")
async def block_job_pause(ctx: Context, *, device: str) -> None:
    job = _block_job(ctx, device)
    job.user_pause()
    await job.settle()


@handler("block-job-resume")
async def block_job_resume(ctx: Context, *, device: str) -> None:
    job = _block_job(ctx, device)
    job.user_resume()
    await job.settle()


@handler("block-job-complete")
async def block_job_complete(ctx: Context, *, device: str) -> None:
    _block_job(ctx, device).complete()


@handler("block-job-finalize")
async def block_job_finalize(ctx: Context, *, id: str) -> None:
    _block_job(ctx, id).finalize()


@handler("block-job-dismiss")
async def block_job_dismiss(ctx: Context, *, id: str) -> None:
    _block_job(ctx, id).dismiss()


@handler("query-block-jobs")
async def query_block_jobs(ctx: Context) -> list[dict[str, Any]]:
    return [job.block_info() for job in ctx.jobs.jobs() if isinstance(job, BlockJob)]


# -- stream, commit, and what is still to come ------------------------------------------


@handler("block-commit")
async def block_commit(
    ctx: Context,
    *,
    device: str,
    job_id: str | None = None,
    base_node: str | None = None,
    base: str | None = None,
    top_node: str | None = None,
    top: str | None = None,
    backing_file: str | None = None,
    speed: int | None = None,
    on_error: str | None = None,
    filter_node_name: str | None = None,
    auto_finalize: bool | None = None,
    auto_dismiss: bool | None = None,
) -> None:
    check_commit(ctx.graph, device, top=top, top_node=top_node, base=base, base_node=base_node)


@handler("drive-backup")
async def drive_backup(ctx: Context, arguments: dict[str, Any]) -> None:
    """Boxed: ARGUMENTS is a DriveBackup (BackupCommon plus target, format, mode)."""
    job = await prepare_drive_backup(ctx, arguments)
    await _launch(ctx, job, arguments.get("speed", 0))


@handler("drive-mirror")
async def drive_mirror(ctx: Context, arguments: dict[str, Any]) -> None:
    """Boxed: ARGUMENTS is a DriveMirror."""
    args = arguments
    source = ctx.graph.lookup(args["device"])
    source.check_mirror_source()
    sync = args["sync"]
    if "replaces" in args:
        if "node-name" not in args:
            raise BlockError(
                "a node-name must be provided when replacing a named node of the graph"
            )
        raise QmpError("GenericError", "not implemented yet")
    target = await _drive_target(ctx, source, args)
    try:
        granularity = args.get("granularity", 0)
        if granularity and not 512 <= granularity <= 64 << 20:
            raise BlockError("Parameter 'granularity' expects a value in range [512B, 64MB]")
        if granularity & (granularity - 1):
            raise BlockError("Parameter 'granularity' expects a power of 2")
        buf_size = args.get("buf-size", 0)
        if buf_size < 0:
            raise BlockError("Invalid parameter 'buf-size'")
        if sync in ("incremental", "bitmap"):
            raise BlockError(f"Sync mode '{sync}' not supported")
        job = MirrorJob(
            _check_job_id(ctx, args.get("job-id")), ctx.events.emit, source, target, sync=sync,
            granularity=granularity, buf_size=buf_size,
            auto_finalize=args.get("auto-finalize", True),
            auto_dismiss=args.get("auto-dismiss", True),
            on_source_error=args.get("on-source-error", "report"),
            on_target_error=args.get("on-target-error", "report"),
        )
        _fail_when_created(job, _lock_conflict(ctx, target, "consistent read"))
    except BaseException:
        with trio.CancelScope(shield=True):
            await _close_target(target)
        raise
    _close_when_ended(ctx, job, target)
    await _launch(ctx, job, args.get("speed", 0))


# -- drive-backup and drive-mirror's own target ------------------------------------------
#
# The target is opened by file name, as an internal node QSD names '#blockNNN': the monitor
# does not see it (no blockdev-del) and it is closed when its job ends. mode absolute-paths
# first creates the image (raw, the source's size; the file is left behind if a later check
# fails, as QEMU leaves it), mode existing opens the file there is.

_SUPPORTED_FORMATS = ("raw", "file")
_CANNOT_CREATE = ("null-co", "null-aio")
# Other format drivers QEMU 7.2 has: known, but not implemented here.
_OTHER_FORMATS = frozenset({
    "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "parallels", "luks", "bochs",
    "cloop", "dmg", "blkdebug", "blkverify", "blklogwrites", "quorum", "throttle",
    "copy-on-read", "compress", "preallocate", "replication", "host_device", "host_cdrom",
    "nbd", "nfs", "ssh", "iscsi", "rbd", "gluster", "http", "https", "ftp", "ftps", "vvfat",
    "snapshot-access", "copy-before-write",
})
# The image files drive-* targets hold open, which the monitor does not see, and their jobs
# (None until made). A job that has concluded holds its target no more, whether or not the
# node has been closed yet.
_internal_files: dict[FileNode, Job | None] = {}
_ENDED = ("concluded", "null")


async def prepare_drive_backup(ctx: Context, args: dict[str, Any]) -> BackupJob:
    """A drive-backup's checks in QEMU's order: its target made or opened, then the job (not
    yet created), which closes that target when it ends."""
    source = ctx.graph.lookup(args["device"])
    target = await _drive_target(ctx, source, args)
    try:
        if args["sync"] == "none":
            # The target would get the source as its backing file; raw and file have none.
            raise BlockError(
                f"Driver '{target.driver}' of node '{target.name}' does not support backing "
                "files"
            )
        job = prepare_backup(ctx, args, target)
        _fail_when_created(job, _lock_conflict(ctx, target, "write"))
    except BaseException:
        with trio.CancelScope(shield=True):
            await _close_target(target)
        raise
    _close_when_ended(ctx, job, target)
    return job


async def _drive_target(ctx: Context, source: Node, args: dict[str, Any]) -> Node:
    mode = args.get("mode", "absolute-paths")
    filename = args["target"]
    fmt = args.get("format")
    if fmt is None and mode != "existing":
        fmt = source.driver
    if fmt is not None and fmt not in _SUPPORTED_FORMATS:
        if fmt in _CANNOT_CREATE:
            if mode != "existing":
                raise BlockError(f"Format driver '{fmt}' does not support image creation")
        elif fmt not in _OTHER_FORMATS:
            raise BlockError(f"Unknown file format '{fmt}'")
        raise QmpError("GenericError", "not implemented yet")
    if mode != "existing":
        if args["sync"] == "none":
            # The new image would have the source as its backing file.
            raise BlockError(f"Backing file not supported for file format '{fmt}'")
        await trio.to_thread.run_sync(create_file, filename, source.size, "off", False)
    fd, _ = await trio.to_thread.run_sync(
        lambda: open_file(
            generated_name(), filename, read_only=False, auto_read_only=False, direct=False
        )
    )
    try:
        file = FileNode(
            generated_name(), fd, filename, read_only=False, no_flush=False, discard=False,
            locking=True,
        )
    except BaseException:
        os.close(fd)
        raise
    _internal_files[file] = None
    if fmt == "file":
        file.monitor_owned = False
        return file
    node = RawNode(generated_name(), file, 0, file.size, False)
    file.monitor_owned = False
    file.parents.append(node)
    return node


def _lock_conflict(ctx: Context, target: Node, lock: str) -> str | None:
    """QEMU's image locks keep a job off a target whose file is under a writable format node
    (such a node takes its file's write permission and shares it with no one); a bare file
    node does not hold it until a job writes it. QEMU finds out once the job is created."""
    file = target.child if target.child is not None else target
    if not isinstance(file, FileNode):
        return None
    st = os.fstat(file.fd)
    ended = [f for f, job in _internal_files.items() if job is not None and job.status in _ENDED]
    for node in [*ctx.graph.nodes(), *_internal_files]:
        if node is file or not isinstance(node, FileNode) or node.fd < 0 or node in ended:
            continue
        if any(not parent.read_only for parent in node.parents) or node.target_of:
            other = os.fstat(node.fd)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return f'Failed to get shared "{lock}" lock'
    return None


async def _close_target(node: Node) -> None:
    """Flush and close a drive-* target (and its file node)."""
    file = node.child if node.child is not None else node
    try:
        await node.flush()
    except OSError:
        pass  # QEMU closes the image whatever its flush says
    finally:
        await node.close()
        if file is not node:
            await file.close()
        if isinstance(file, FileNode):
            _internal_files.pop(file, None)


def _close_when_ended(ctx: Context, job: Job, target: Node) -> None:
    file = target.child if target.child is not None else target
    if isinstance(file, FileNode):
        _internal_files[file] = job

    async def watch() -> None:
        while job.status not in _ENDED:
            await job.changed()
        with trio.CancelScope(shield=True):
            await _close_target(target)

    ctx.job_nursery.start_soon(watch)


@handler("block-stream")
async def block_stream(
    ctx: Context,
    *,
    device: str,
    job_id: str | None = None,
    base: str | None = None,
    base_node: str | None = None,
    backing_file: str | None = None,
    bottom: str | None = None,
    speed: int | None = None,
    on_error: str | None = None,
    filter_node_name: str | None = None,
    auto_finalize: bool | None = None,
    auto_dismiss: bool | None = None,
) -> None:
    node = ctx.graph.lookup(device)
    if base is not None and base_node is not None:
        raise BlockError("'base' and 'base-node' cannot be specified at the same time")
    if base is not None and bottom is not None:
        raise BlockError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise BlockError("'bottom' and 'base-node' cannot be specified at the same time")
    if base is not None:
        # No node of this milestone has a backing file: no base can be found below DEVICE.
        raise BlockError(f"Can't find '{base}' in the backing chain")
    if base_node is not None:
        _node_or_error(ctx, base_node)
        raise BlockError(f"Node '{base_node}' is not a backing image of '{device}'")
    if bottom is not None and _node_or_error(ctx, bottom) is not node:
        raise BlockError(f"Node '{bottom}' is not in a chain starting from '{device}'")
    if backing_file is not None:
        raise BlockError("backing file specified, but streaming the entire chain")
    node.check_backup_source()  # a backup's source may be streamed, not what a job writes
    job = StreamJob(
        _check_job_id(ctx, job_id), ctx.events.emit, node,
        auto_finalize=True if auto_finalize is None else auto_finalize,
        auto_dismiss=True if auto_dismiss is None else auto_dismiss,
    )
    await _launch(ctx, job, speed or 0)


def _node_or_error(ctx: Context, name: str) -> Node:
    try:
        return ctx.graph.find(name)
    except BlockError:
        raise BlockError(f"Cannot find device='' nor node-name='{name}'") from None


@handler("query-named-block-nodes")
async def query_named_block_nodes(
    ctx: Context, *, flat: bool | None = None
) -> list[dict[str, Any]]:
    # `flat` only leaves out the images' backing chains, and no node here has a backing file.
    # QEMU lists nodes newest first (a parent is made after the inline child it opened), the
    # drive-* targets too (their raw node over their file) until their job concludes.
    internal: list[Node] = []
    detect_zeroes: dict[Node, str] = {}
    for file, job in reversed(_internal_files.items()):
        if file.fd < 0 or (job is not None and job.status in _ENDED):
            continue
        top = file.parents[0] if file.parents else file
        internal += [top, file] if top is not file else [file]
        if job is not None and job.job_type == "backup":
            detect_zeroes[top] = "unmap"  # drive-backup opens its target so
    nodes = sorted(internal + ctx.graph.nodes(), key=lambda node: node.serial, reverse=True)
    return await named_block_nodes(nodes, ctx.jobs.jobs(), detect_zeroes)


@handler("blockdev-create")
async def blockdev_create(ctx: Context, *, job_id: str, options: dict[str, Any]) -> None:
    driver = options["driver"]
    if driver in ("raw", "null-co", "null-aio"):
        raise BlockError("Driver does not support blockdev-create")
    if driver != "file":
        raise QmpError("GenericError", "not implemented yet")
    ctx.jobs.check_new_id(job_id)
    await _launch(ctx, CreateJob(job_id, ctx.events.emit, options), 0)
