"""The job registry: every job the daemon knows, newest first, found by id.

The engine (job states, verbs, transactions) fills it; until then it is empty and every verb
answers as QEMU does for an unknown id.
"""

from __future__ import annotations

from typing import Any, Protocol

from .errors import JobError


class JobLike(Protocol):
    id: str

    def info(self) -> dict[str, Any]: ...


class JobManager:
    def __init__(self) -> None:
        # Insertion order is creation order; queries list the newest first, as QEMU does.
        self._jobs: dict[str, JobLike] = {}

    def find(self, job_id: str) -> JobLike:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    def query(self) -> list[dict[str, Any]]:
        return [job.info() for job in reversed(self._jobs.values())]
