"""Handlers for schema/block-core.json: nodes, the block jobs and the block-job-* verbs.

Arguments arrive as the schema declares them (qapi/visit.py): enums as str, structs as dicts,
boxed commands (blockdev-add, blockdev-backup) as one dict keyed by the schema's member names.
drive-backup, drive-mirror and query-named-block-nodes answer "not implemented yet" until they
land (docs/compat.md). block-stream and block-commit act as QEMU's do on nodes without a backing
file, the only kind this milestone has.
"""

from __future__ import annotations

from typing import Any

import trio

from ..block.drivers.base import Node
from ..block.graph import BlockError
from ..block.jobs.backup import CLUSTER, BackupJob
from ..block.jobs.blockjob import BlockJob
from ..block.jobs.commit import check_commit
from ..block.jobs.create import CreateJob
from ..block.jobs.mirror import MirrorJob
from ..block.jobs.stream import StreamJob
from ..block.nodes import open_node
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


def create_job(ctx: Context, job: Job, speed: int) -> None:
    ctx.jobs.add(job)
    job.transition("created")
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


def prepare_backup(ctx: Context, args: dict[str, Any]) -> BackupJob:
    """A blockdev-backup's checks in QEMU's order, then the job (not yet created)."""
    source = ctx.graph.lookup(args["device"])
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
        auto_dismiss=auto_dismiss,
    )
    await _launch(ctx, job, speed)


# -- the block-job-* verbs -----------------------------------------------------------------


def _block_job(ctx: Context, device: str) -> BlockJob:
    job = ctx.jobs.find_block(device)
    assert isinstance(job, BlockJob)
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
    raise QmpError("GenericError", "not implemented yet")


@handler("drive-mirror")
async def drive_mirror(ctx: Context, arguments: dict[str, Any]) -> None:
    """Boxed: ARGUMENTS is a DriveMirror."""
    raise QmpError("GenericError", "not implemented yet")


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
    raise QmpError("GenericError", "not implemented yet")


@handler("blockdev-create")
async def blockdev_create(ctx: Context, *, job_id: str, options: dict[str, Any]) -> None:
    driver = options["driver"]
    if driver in ("raw", "null-co", "null-aio"):
        raise BlockError("Driver does not support blockdev-create")
    if driver != "file":
        raise QmpError("GenericError", "not implemented yet")
    ctx.jobs.check_new_id(job_id)
    await _launch(ctx, CreateJob(job_id, ctx.events.emit, options), 0)
