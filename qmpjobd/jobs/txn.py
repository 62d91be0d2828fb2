"""Jobs that complete together: a transaction's group (and every job's own group of one).

A job whose work succeeded waits in `waiting` until every job of its group got that far; then
all go `pending` and, unless one of them needs job-finalize (auto-finalize off), are finalized
together. One failure or cancellation aborts the whole group: the others are cancelled, and
every job then ends in `aborting` and `concluded`. Jobs are handled newest first, as QEMU does.
"""

from __future__ import annotations

from typing import Protocol

from .errors import CANCELED
from .status import JobStatus


class Job(Protocol):
    """What a transaction needs of its members (jobs/job.py's Job)."""

    txn: JobTxn
    status: JobStatus
    error: str | None
    work_done: bool
    auto_finalize: bool
    auto_dismiss: bool

    @property
    def finished(self) -> bool: ...

    def transition(self, status: JobStatus) -> None: ...

    def request_cancel(self, force: bool) -> None: ...

    def wake(self) -> None: ...

    def on_pending(self) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...

    def on_finalized(self) -> None: ...


class JobTxn:
    def __init__(self) -> None:
        self.jobs: list[Job] = []  # newest first
        self.aborting = False

    def add(self, job: Job) -> None:
        if job.txn is not self:
            job.txn.jobs.remove(job)
            job.txn = self
        self.jobs.insert(0, job)

    def job_done(self, job: Job, error: str | None) -> None:
        """JOB's work ended: successfully (ERROR None), or failed or cancelled."""
        if self.aborting:
            self._finish_abort()  # the last member to stop finishes the abort
            return
        if error is not None:
            job.error = error
            # As QEMU's: the job that failed (or was cancelled) goes `aborting` at once, before
            # the others are cancelled.
            job.transition(JobStatus.ABORTING)
            self.abort(job)
            return
        job.transition(JobStatus.WAITING)
        if any(not other.work_done for other in self.jobs):
            return
        for other in self.jobs:
            other.transition(JobStatus.PENDING)
            if not other.auto_finalize:
                other.on_pending()
        if all(other.auto_finalize for other in self.jobs):
            self.finalize()

    def finalize(self) -> None:
        # Each job in turn makes its result final, reports it and concludes before the next
        # one starts (QSD: COMPLETED, concluded, null of one job, then of the next).
        for job in list(self.jobs):
            job.commit()
            job.on_finalized()
            self._conclude(job)

    def abort(self, initiator: Job) -> None:
        """Abort the group because of INITIATOR (failed or cancelled)."""
        self.aborting = True
        for job in self.jobs:
            if job is not initiator and not job.finished:
                job.request_cancel(force=True)
                if job.error is None:
                    job.error = CANCELED
                job.wake()
        # Jobs still working stop at their next pause point; the last to stop finishes the
        # abort (job_done), or it is finished here if no job is working any more.
        self._finish_abort()

    def _finish_abort(self) -> None:
        for job in list(self.jobs):
            if not job.work_done:
                return  # its task comes back here when its work has stopped
        for job in list(self.jobs):
            if job.finished:
                continue
            if job.error is None:
                job.error = CANCELED
            if job.status != JobStatus.ABORTING:
                job.transition(JobStatus.ABORTING)
            job.abort()
            job.on_finalized()
            self._conclude(job)

    @staticmethod
    def _conclude(job: Job) -> None:
        job.transition(JobStatus.CONCLUDED)
        if job.auto_dismiss:
            job.transition(JobStatus.NULL)
