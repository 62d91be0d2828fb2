"""Handlers for schema/job.json: the job-* verbs and query-jobs."""

from __future__ import annotations

from typing import Any

from ..context import Context, handler


@handler("job-pause")
async def job_pause(ctx: Context, *, id: str) -> None:
    job = ctx.jobs.find(id)
    job.user_pause()
    await job.settle()


@handler("job-resume")
async def job_resume(ctx: Context, *, id: str) -> None:
    job = ctx.jobs.find(id)
    job.user_resume()
    await job.settle()


@handler("job-cancel")
async def job_cancel(ctx: Context, *, id: str) -> None:
    job = ctx.jobs.find(id)
    job.cancel(force=True)
    ctx.tasks.recorder.cancel_requested(job)
    await job.settle()


@handler("job-complete")
async def job_complete(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id).complete()


@handler("job-dismiss")
async def job_dismiss(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id).dismiss()


@handler("job-finalize")
async def job_finalize(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id).finalize()


@handler("query-jobs")
async def query_jobs(ctx: Context) -> list[dict[str, Any]]:
    return ctx.jobs.query()
