"""Handler for schema/transaction.json: several job starts that succeed or fail together.

Every action is checked and its job created first (`created`; a drive-backup's target file is
made or opened on the way); if one fails, the jobs already created are rolled back (`aborting`,
`concluded`, `null`) and the reply is that action's error.
Only when all succeeded do the jobs start. With completion-mode grouped they also complete
together (jobs/txn.py).
"""

from __future__ import annotations

from typing import Any

from ..dispatch import Context, handler
from ..jobs.errors import JobError
from ..jobs.job import Job
from ..jobs.txn import JobTxn
from .block import create_job, prepare_backup, prepare_drive_backup, release


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
            if kind == "abort":
                raise JobError("Transaction aborted using Abort action")
            if kind == "blockdev-backup":
                backup = prepare_backup(ctx, data)
            elif kind == "drive-backup":
                backup = await prepare_drive_backup(ctx, data)
            else:
                raise JobError(f"{kind} is not implemented yet")
            create_job(ctx, backup, data.get("speed", 0))
            prepared.append(backup)
            if group is not None:
                group.add(backup)
    except JobError:
        for job in reversed(prepared):
            job.transition("aborting")
            job.transition("concluded")
            job.transition("null")
            release(job)
        raise
    for job in prepared:
        job.start(ctx.job_nursery)
    for job in prepared:
        await job.run_until_blocked()
