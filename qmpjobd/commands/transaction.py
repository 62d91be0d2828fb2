"""Handler for schema/transaction.json: several job starts that succeed or fail together.

Every action is checked and its job created first (`created`; a drive-backup's target file is
made or opened on the way); if one fails, the jobs already created are discarded (`aborting`,
`concluded`, `null`) and the reply is that action's error. Only when all succeeded do the
jobs start. With completion-mode grouped they also complete together (jobs/txn.py).
"""

from __future__ import annotations

from typing import Any

from ..block.drive import drive_backup_job
from ..block.jobs.backup import backup_job
from ..context import Context, handler
from ..jobs.errors import JobError
from ..jobs.job import Job
from ..jobs.txn import JobTxn


@handler("transaction")
async def transaction(
    ctx: Context, *, actions: list[dict[str, Any]], properties: dict[str, Any] | None = None
) -> None:
    grouped = (properties or {}).get("completion-mode", "individual") == "grouped"
    group = JobTxn() if grouped else None
    prepared: list[Job] = []
    try:
        for action in actions:
            kind, data = action["type"], action["data"]
            job: Job
            if kind == "abort":
                raise JobError("Transaction aborted using Abort action")
            if kind == "blockdev-backup":
                job = backup_job(ctx.graph, ctx.jobs, data)
            elif kind == "drive-backup":
                job = await drive_backup_job(ctx.graph, ctx.jobs, data)
            elif kind in ctx.daemon.transaction_actions:  # a user's job kind (api.Job)
                job = ctx.daemon.transaction_actions[kind](ctx, data)
                try:
                    ctx.jobs.check_new_id(job.id)
                except JobError:
                    job.abort()  # (it lets go of what it took)
                    raise
            else:
                raise JobError(f"{kind} is not implemented yet")
            ctx.jobs.create(job, data.get("speed", 0))
            prepared.append(job)
            if group is not None:
                group.add(job)
    except BaseException:
        # (A user's from_action may raise anything: QmpError, or a bug.)
        for created in reversed(prepared):
            created.discard()
        raise
    if prepared:
        # The transaction's own task, whose subtasks are its jobs' tasks.
        ctx.tasks.transaction([job.id for job in prepared])
    await ctx.jobs.start(*prepared)

