"""Handlers for schema/job.json: the job-* verbs and query-jobs, served from the registry."""

from __future__ import annotations

from typing import Any

from ..dispatch import Context, handler


@handler("job-pause")
async def job_pause(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id)


@handler("job-resume")
async def job_resume(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id)


@handler("job-cancel")
async def job_cancel(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id)


@handler("job-complete")
async def job_complete(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id)


@handler("job-dismiss")
async def job_dismiss(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id)


@handler("job-finalize")
async def job_finalize(ctx: Context, *, id: str) -> None:
    ctx.jobs.find(id)


@handler("query-jobs")
async def query_jobs(ctx: Context) -> list[dict[str, Any]]:
    return ctx.jobs.query()
