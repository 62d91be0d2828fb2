"""Handlers for schema/block-core.json's block jobs: backup, mirror, stream, commit, the
drive-* variants, the block-job-* verbs and query-block-jobs.

Each command's checks, in QEMU's order, are the block layer's (block/jobs/, block/drive.py);
the job is then created, started and given its first step before the command replies
(JobManager.launch), as QEMU does.
"""

from __future__ import annotations

from typing import Any

from ..block.drive import drive_backup_job, drive_mirror_job
from ..block.jobs.backup import backup_job
from ..block.jobs.blockjob import BlockJob, find_block_job
from ..block.jobs.commit import commit_job
from ..block.jobs.mirror import blockdev_mirror_job
from ..block.jobs.stream import stream_job
from ..context import Context, handler
from ..jobs.errors import JobError

# -- starting jobs ---------------------------------------------------------------------------


@handler("blockdev-backup")
async def blockdev_backup(ctx: Context, args: dict[str, Any]) -> None:
    """Boxed: ARGS is a BlockdevBackup (BackupCommon plus target)."""
    await ctx.jobs.launch(backup_job(ctx.graph, ctx.jobs, args), args.get("speed", 0))


@handler("drive-backup")
async def drive_backup(ctx: Context, args: dict[str, Any]) -> None:
    """Boxed: ARGS is a DriveBackup (BackupCommon plus target, format, mode)."""
    job = await drive_backup_job(ctx.graph, ctx.jobs, args)
    await ctx.jobs.launch(job, args.get("speed", 0))


@handler("blockdev-mirror")
async def blockdev_mirror(
    ctx: Context, *, device: str, target: str, sync: str, job_id: str | None = None,
    speed: int = 0, replaces: str | None = None, filter_node_name: str | None = None,
    copy_mode: str = "background", **options: Any,
) -> None:
    job = blockdev_mirror_job(
        ctx.graph, ctx.jobs, device=device, target=target, sync=sync, job_id=job_id, **options
    )
    await ctx.jobs.launch(job, speed)


@handler("drive-mirror")
async def drive_mirror(ctx: Context, args: dict[str, Any]) -> None:
    """Boxed: ARGS is a DriveMirror."""
    job = await drive_mirror_job(ctx.graph, ctx.jobs, args)
    await ctx.jobs.launch(job, args.get("speed", 0))


@handler("block-stream")
async def block_stream(
    ctx: Context, *, device: str, job_id: str | None = None, base: str | None = None,
    base_node: str | None = None, backing_file: str | None = None, bottom: str | None = None,
    speed: int | None = None, on_error: str | None = None,
    filter_node_name: str | None = None, auto_finalize: bool | None = None,
    auto_dismiss: bool | None = None,
) -> None:
    job = stream_job(
        ctx.graph, ctx.jobs, device=device, job_id=job_id, base=base, base_node=base_node,
        bottom=bottom, backing_file=backing_file,
        auto_finalize=True if auto_finalize is None else auto_finalize,
        auto_dismiss=True if auto_dismiss is None else auto_dismiss,
        on_error=on_error or "report",
    )
    await ctx.jobs.launch(job, speed or 0)


@handler("block-commit")
async def block_commit(
    ctx: Context, *, device: str, job_id: str | None = None, base_node: str | None = None,
    base: str | None = None, top_node: str | None = None, top: str | None = None,
    backing_file: str | None = None, speed: int | None = None, on_error: str | None = None,
    filter_node_name: str | None = None, auto_finalize: bool | None = None,
    auto_dismiss: bool | None = None,
) -> None:
    job = await commit_job(
        ctx.graph, ctx.jobs, device=device, job_id=job_id, top=top, top_node=top_node,
        base=base, base_node=base_node, backing_file=backing_file,
        auto_finalize=True if auto_finalize is None else auto_finalize,
        auto_dismiss=True if auto_dismiss is None else auto_dismiss,
        on_error=on_error or "report",
    )
    await ctx.jobs.launch(job, speed or 0)


# -- the block-job-* verbs -----------------------------------------------------------------


@handler("block-job-set-speed")
async def block_job_set_speed(ctx: Context, *, device: str, speed: int) -> None:
    job = find_block_job(ctx.jobs, device)
    if job.set_speed(speed):
        await job.run_until_blocked()  # a faster pace: the job's next step comes first


@handler("block-job-cancel")
async def block_job_cancel(ctx: Context, *, device: str, force: bool = False) -> None:
    job = find_block_job(ctx.jobs, device)
    if job.user_paused and not force:
        raise JobError(f"The block job for device '{device}' is currently paused")
    job.cancel(force)
    ctx.tasks.recorder.cancel_requested(job)
    await job.settle()


@handler("block-job-pause")
async def block_job_pause(ctx: Context, *, device: str) -> None:
    job = find_block_job(ctx.jobs, device)
    job.user_pause()
    await job.settle()


@handler("block-job-resume")
async def block_job_resume(ctx: Context, *, device: str) -> None:
    job = find_block_job(ctx.jobs, device)
    job.user_resume()
    await job.settle()


@handler("block-job-complete")
async def block_job_complete(ctx: Context, *, device: str) -> None:
    find_block_job(ctx.jobs, device).complete()


@handler("block-job-finalize")
async def block_job_finalize(ctx: Context, *, id: str) -> None:
    find_block_job(ctx.jobs, id).finalize()


@handler("block-job-dismiss")
async def block_job_dismiss(ctx: Context, *, id: str) -> None:
    find_block_job(ctx.jobs, id).dismiss()


@handler("query-block-jobs")
async def query_block_jobs(ctx: Context) -> list[dict[str, Any]]:
    return [job.block_info() for job in ctx.jobs.jobs() if isinstance(job, BlockJob)]
