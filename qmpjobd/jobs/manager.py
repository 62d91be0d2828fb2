"""The job registry: every job the daemon knows, newest first, found by id; and where jobs
are created and started, as QEMU does it before the command that made them replies."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .errors import JobError
from .job import Emit, Job
from .status import JobStatus

# (A module constant: looking an enum member up on its class costs more than comparing it.)
_NULL = JobStatus.NULL
_PURGE_MIN = 64
# QEMU's well-formed ids: a letter, then letters, digits, '-', '.' and '_'.
_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


class JobManager:
    def __init__(self, emit: Emit, max_jobs: int = 65536) -> None:
        self._jobs: dict[str, Job] = {}  # creation order
        # Where the jobs made for this registry report their events (the event bus).
        self.emit = emit
        self.max_jobs = max_jobs  # limits.py
        self._purge_at = _PURGE_MIN
        # Where jobs run: the server opens it before it serves anyone.
        self._nursery: trio.Nursery | None = None

    def run_in(self, nursery: trio.Nursery) -> None:
        """Run the jobs (and the tasks that wait on them) in NURSERY from now on."""
        self._nursery = nursery

    def start_soon(self, task: Callable[[], Awaitable[object]]) -> None:
        """Run TASK beside the jobs (it lives as long as they may)."""
        if self._nursery is None:
            raise RuntimeError("no nursery to run jobs in yet")
        self._nursery.start_soon(task)

    def _live(self) -> dict[str, Job]:
        # Dismissed jobs (status null) leave the registry the next time anyone looks.
        for job_id in [i for i, job in self._jobs.items() if job.status == _NULL]:
            del self._jobs[job_id]
        return self._jobs

    def check_new_id(self, job_id: str) -> None:
        if not _WELL_FORMED.match(job_id):
            raise JobError(f"Invalid job ID '{job_id}'")
        if self.get(job_id) is not None:
            raise JobError(f"Job ID '{job_id}' already in use")
        # (Counting costs a pass over the jobs only near the limit.)
        if len(self._jobs) >= self.max_jobs and len(self._live()) >= self.max_jobs:
            raise JobError(
                f"Too many jobs: the daemon holds at most {self.max_jobs}; dismiss some first"
            )

    def add(self, job: Job) -> None:
        self.check_new_id(job.id)
        self._jobs.pop(job.id, None)  # a dismissed job of that id: the new one is the newest
        self._jobs[job.id] = job
        if len(self._jobs) >= self._purge_at:
            # Let go of dismissed jobs now and then (each pass is paid for by as many adds).
            self._purge_at = max(_PURGE_MIN, 2 * len(self._live()))

    def find(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    def get(self, job_id: str) -> Job | None:
        """The job JOB_ID, if it exists (not dismissed). O(1): lookups happen per event."""
        job = self._jobs.get(job_id)
        return None if job is None or job.status == _NULL else job

    def jobs(self) -> list[Job]:
        """Newest first."""
        return list(reversed(self._live().values()))

    def query(self) -> list[dict[str, Any]]:
        return [job.info() for job in self.jobs()]

    def __len__(self) -> int:
        return len(self._live())

    # -- a new job's first steps ---------------------------------------------------------------

    def create(self, job: Job, speed: int) -> None:
        """Register JOB and make it `created`, with its speed. An error QEMU meets only once the
        job exists (the job's own check_created, a negative speed) takes it away at once
        (`null`) and is raised."""
        self.add(job)
        job.transition(JobStatus.CREATED)
        try:
            job.check_created()
            if speed < 0:
                raise JobError("Parameter 'speed' expects a non-negative value")
        except JobError:
            job.transition(JobStatus.NULL)
            job.abort()
            raise
        job.speed = speed
        job.limit.set_speed(speed)

    async def start(self, *jobs: Job) -> None:
        """Start created JOBS (each `running`, in order) and let each take its first step, as
        QEMU's jobs do before the command that started them replies."""
        if self._nursery is None:
            raise RuntimeError("no nursery to run jobs in yet")
        for job in jobs:
            job.start(self._nursery)
        for job in jobs:
            await job.run_until_blocked()

    async def launch(self, job: Job, speed: int) -> None:
        """create, then start."""
        self.create(job, speed)
        await self.start(job)
