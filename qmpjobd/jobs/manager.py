"""The job registry: every job the daemon knows, newest first, found by id."""

from __future__ import annotations

import re
from typing import Any

from .errors import JobError
from .job import Job


class DeviceNotActive(JobError):
    cls = "DeviceNotActive"


# QEMU's well-formed ids: a letter, then letters, digits, '-', '.' and '_'.
_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


class JobManager:
    def __init__(self, max_jobs: int = 65536) -> None:
        self._jobs: dict[str, Job] = {}  # creation order
        self.max_jobs = max_jobs  # limits.py

    def _live(self) -> dict[str, Job]:
        # Dismissed jobs (status null) leave the registry the next time anyone looks.
        for job_id in [i for i, job in self._jobs.items() if job.status == "null"]:
            del self._jobs[job_id]
        return self._jobs

    def check_new_id(self, job_id: str) -> None:
        if not _WELL_FORMED.match(job_id):
            raise JobError(f"Invalid job ID '{job_id}'")
        if job_id in self._live():
            raise JobError(f"Job ID '{job_id}' already in use")
        if len(self._jobs) >= self.max_jobs:
            raise JobError(
                f"Too many jobs: the daemon holds at most {self.max_jobs}; dismiss some first"
            )

    def add(self, job: Job) -> None:
        self.check_new_id(job.id)
        self._jobs[job.id] = job

    def find(self, job_id: str) -> Job:
        job = self._live().get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    def find_block(self, job_id: str) -> Job:
        """The block-job-* commands' lookup, with their own error class and words."""
        job = self._live().get(job_id)
        if job is None:
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    def jobs(self) -> list[Job]:
        """Newest first."""
        return list(reversed(self._live().values()))

    def query(self) -> list[dict[str, Any]]:
        return [job.info() for job in self.jobs()]

    def __len__(self) -> int:
        return len(self._live())
