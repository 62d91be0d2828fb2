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

from typing import Any, ClassVar

from .block.drivers.base import Node
from .context import Context, handler
from .jobs import job as _jobs
from .jobs.errors import JobError
from .jobs.job import Emit
from .qmp.errors import QmpError

__all__ = ["Context", "Emit", "Job", "JobFailed", "Node", "QmpError", "handler", "start_job"]

# Raised by a job's run(): the job concludes with this error (as a failed read does).
JobFailed = JobError


class Job(_jobs.Job):
    """A job kind of yours: set `job_type`, write `run()` (the module docstring says how).

    To be an action of `transaction` too, name the action and the wrapper struct of your
    schema that holds its arguments ({'data': ARGUMENTS}, as QEMU's BlockdevBackupWrapper):
    `transaction_action = ("x-checksum", "XChecksumWrapper")`, and build the job from those
    arguments in `from_action`. The transaction creates every action's job first and starts
    them only if all could be created; with completion-mode grouped they conclude together."""

    transaction_action: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def from_action(cls, ctx: Context, arguments: dict[str, Any]) -> Job:
        """The job an action with ARGUMENTS (checked against the schema) makes; raise
        JobFailed with the error the transaction should fail with."""
        raise NotImplementedError(f"{cls.__name__} is no transaction action")


async def start_job(ctx: Context, job: Job, speed: int = 0) -> None:
    """Register JOB under its id (refused with QEMU's words if the id is malformed or taken)
    and start it, at SPEED bytes a second (0: no limit); returns once it has taken its first
    step, as QEMU's job commands do before they reply."""
    try:
        ctx.jobs.check_new_id(job.id)
    except JobError:
        job.abort()  # (it lets go of what it took)
        raise
    await ctx.jobs.launch(job, speed)
