"""blockdev-create: a `create` job (not a block job) making an image with a driver's `create`.

As in qemu-storage-daemon 7.2: progress is 0/1 while it runs and 1/1 once it has ended (however
it ended); no BLOCK_JOB_* events; the job is never dismissed by itself (job-dismiss), and it
has no pause point (a pause is accepted and has no effect). The driver makes the image in a
worker thread.
"""

from __future__ import annotations

from typing import Any

from ...jobs.job import Emit, Job
from ...jobs.manager import JobManager
from ..drivers.base import CreateImage, Opener
from ..drivers.registry import DRIVERS
from ..errors import BlockError
from ..graph import BlockGraph
from ..nodes import graph_opener


class CreateJob(Job):
    job_type = "create"

    def __init__(
        self, job_id: str, emit: Emit, create: CreateImage, opener: Opener,
        options: dict[str, Any],
    ) -> None:
        super().__init__(job_id, emit, auto_finalize=True, auto_dismiss=False)
        self.create = create
        self.opener = opener
        self.options = options
        self.progress_total = 1

    def result(self) -> dict[str, Any]:
        return {"filename": self.options.get("filename"), "size": self.options.get("size")}

    async def run(self) -> None:
        self.io_begin()
        try:
            await self.create(self.opener, self.options)
        finally:
            self.io_end()
            self.progress_current = 1


def create_job(
    graph: BlockGraph, jobs: JobManager, job_id: str, options: dict[str, Any]
) -> CreateJob:
    """blockdev-create's checks, then its job (not yet created)."""
    driver = DRIVERS.get(options["driver"])
    if driver is None or driver.create is None:
        raise BlockError("Driver does not support blockdev-create")
    jobs.check_new_id(job_id)
    return CreateJob(job_id, jobs.emit, driver.create, graph_opener(graph), options)
