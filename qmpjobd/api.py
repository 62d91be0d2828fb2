"""The public API for your own commands and job kinds: what a `--handlers` module imports.

A command is declared in a QAPI file of yours (`--schema FILE`, compiled as if qapi-schema.json
included it) and served by an `async def` marked with `@handler`; a job kind is a `Job` subclass
whose `run()` does the work. The daemon gives such a job QEMU's whole job model: statuses and
JOB_STATUS_CHANGE events, pause, resume, cancel, speed limits, `query-jobs`, and a task record
that keeps its outcome (and `result()`). docs/extending.md walks through an example
(examples/checksum: a SHA-256 of a block node's contents).

    from qmpjobd.api import Context, Job, QmpError, handler, start_job

    class Count(Job):
        job_type = "x-count"                     # joins JobType: query-jobs names it

        async def run(self) -> None:
            self.progress_total = 100
            for _ in range(100):
                await self.pause_point()         # pauses take effect, cancel is noticed
                self.charge(1)                   # progress, and the speed limit's count
                await self.ratelimit_sleep()     # as long as the speed asks

    @handler("x-count")
    async def x_count(ctx: Context, *, job_id: str, speed: int = 0) -> None:
        await start_job(ctx, Count(job_id, ctx.jobs.emit), speed)

Errors: raise `QmpError("GenericError", desc)` from a handler, and the client gets exactly
that error; raise `JobFailed(desc)` from `run()`, and the job concludes with that error (its
task record fails with it). `Node` is a block node (`ctx.graph.find(name)`: its `size`,
`read_sync(offset, length)` in a worker thread, `source_of` to hold it while a job reads it);
`Emit` is what a job reports its events through (`ctx.jobs.emit`).
"""

from __future__ import annotations

from .block.drivers.base import Node
from .context import Context, handler
from .jobs.errors import JobError
from .jobs.job import Emit, Job
from .qmp.errors import QmpError

__all__ = ["Context", "Emit", "Job", "JobFailed", "Node", "QmpError", "handler", "start_job"]

# Raised by a job's run(): the job concludes with this error (as a failed read does).
JobFailed = JobError


async def start_job(ctx: Context, job: Job, speed: int = 0) -> None:
    """Register JOB under its id (refused with QEMU's words if the id is malformed or taken)
    and start it, at SPEED bytes a second (0: no limit); returns once it has taken its first
    step, as QEMU's job commands do before they reply."""
    ctx.jobs.check_new_id(job.id)
    await ctx.jobs.launch(job, speed)
