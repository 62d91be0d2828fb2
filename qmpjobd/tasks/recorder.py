"""Keeps a task record for every job, in step with the job, from the event bus.

The recorder subscribes to the bus before any client does, so it sees each JOB_STATUS_CHANGE
first: `created` makes the job's task, the first `running` starts it, every status is noted in
the record (and its history), `concluded` finishes it (success, failure or cancelled, with the
job's result or error), and `null` (the job dismissed) leaves the record on its own. The job
layer knows nothing of this: jobs only emit. Progress is read from the jobs every
PROGRESS_INTERVAL and recorded when it changed.

A job's outcome is committed before any client learns that the job concluded: recording it
holds the output gate until the commit (feed.py).
"""

from __future__ import annotations

from typing import Any

import trio

from ..events import Event
from ..jobs.job import Job
from ..jobs.manager import JobManager
from ..jobs.status import JobStatus
from .model import Task, TaskStatus
from .registry import PROGRESS_INTERVAL, TaskRegistry


class TaskRecorder:
    def __init__(self, registry: TaskRegistry, jobs: JobManager) -> None:
        self.registry = registry
        self.jobs = jobs
        # The task of each job that exists, by job id.
        self.by_job: dict[str, Task] = {}
        # Where each job's progress stood when it started, for its estimated end.
        self._progress_at_start: dict[str, float] = {}

    def deliver(self, event: Event) -> None:
        """An event bus subscriber."""
        if event.name != "JOB_STATUS_CHANGE":
            return
        data: dict[str, Any] = event.message["data"]
        job_id, status = data["id"], JobStatus(data["status"])
        if status == JobStatus.CREATED:
            job = self.jobs.get(job_id)
            if job is not None:
                self._created(job)
            return
        task = self.by_job.get(job_id)
        if task is None:
            return
        registry = self.registry
        now = registry.clock()
        task.job_status = None if status == JobStatus.NULL else status
        job = self.jobs.get(job_id)
        if status == JobStatus.RUNNING and task.started is None:
            task.started = now
            self._progress_at_start[job_id] = task.progress
        if status == JobStatus.CONCLUDED and job is not None:
            self._conclude(task, job)
            return
        if status == JobStatus.NULL:
            del self.by_job[job_id]
            self._progress_at_start.pop(job_id, None)
            if task.status.finished:
                registry.live.pop(task.uuid, None)
            registry.changed(task, urgent=False)
            return
        task.note_status(now)
        registry.changed(task, urgent=False)

    def _created(self, job: Job) -> None:
        task = self.registry.new_task(
            type=job.job_type, name_label=job.id, job_id=job.id, job_status=JobStatus.CREATED
        )
        self.by_job[job.id] = task
        self.registry.changed(task, "add", urgent=False)

    def _conclude(self, task: Task, job: Job) -> None:
        task.job_status = JobStatus.CONCLUDED
        if job.error is None:
            result = job.result()
            if result is not None:
                task.set_result(result, job.job_type)
            outcome = TaskStatus.SUCCESS
        elif job.cancelled:
            outcome = TaskStatus.CANCELLED
        else:
            task.error_info = ["JobFailed", job.error]
            outcome = TaskStatus.FAILURE
        # No client may see `concluded` before the outcome is committed.
        self.registry.set_status(task, outcome, hold_output=True)

    def cancel_requested(self, job: Job) -> None:
        """job-cancel (or block-job-cancel with force, or task-cancel) was accepted: the task
        is cancelling until the job concludes."""
        task = self.by_job.get(job.id)
        if task is not None and job.is_cancelled and task.status == TaskStatus.PENDING:
            self.registry.set_status(task, TaskStatus.CANCELLING)

    def task_of(self, job_id: str) -> Task | None:
        return self.by_job.get(job_id)

    # -- progress ------------------------------------------------------------------------

    def sample_progress(self) -> None:
        """Read each job's progress; note the changes (recorded coalesced by the registry)."""
        now = self.registry.clock()
        for job_id, task in self.by_job.items():
            job = self.jobs.get(job_id)
            if job is None or task.status.finished or not job.progress_total:
                continue
            progress = min(job.progress_current / job.progress_total, 1.0)
            if progress == task.progress:
                continue
            task.progress = progress
            task.eta = self._eta(task, job_id, now)
            self.registry.progressed(task)
        self.registry.flush_progress()

    def _eta(self, task: Task, job_id: str, now: float) -> float | None:
        if task.started is None or now <= task.started:
            return None
        rate = (task.progress - self._progress_at_start.get(job_id, 0.0)) / (now - task.started)
        return now + (1.0 - task.progress) / rate if rate > 0 else None

    async def run(self) -> None:
        """Sample progress every PROGRESS_INTERVAL, for as long as the daemon runs."""
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            self.sample_progress()
