"""What block jobs add to jobs: error policies, the BLOCK_JOB_* events, query-block-jobs' view."""

from __future__ import annotations

import bisect
import errno
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import trio

from ...jobs.errors import DeviceNotActive
from ...jobs.job import Emit, Job
from ...jobs.manager import JobManager
from ...jobs.status import JobStatus
from ..drivers.base import Node
from ..errors import BlockError, CopyFailed

_READY = frozenset({JobStatus.READY, JobStatus.STANDBY})
# How long a job waits before it retries a request whose error it was told to ignore: QSD
# retries at once, and sends a BLOCK_JOB_ERROR for every attempt; a pause between attempts
# keeps a lasting error from flooding the clients with events (about as many as QSD sends).
IGNORED_ERROR_RETRY_NS = 10_000_000


# The most bytes a walk copies between two pause points when the job has no speed limit.
WALK_BATCH = 8 << 20
# ... and the most it walks over (pieces it need not copy cost little, but not nothing).
WALK_SPAN = 1 << 30
# A walk whose copies a copier process makes (defers_copies) goes on longer between two pause
# points, up to this many bytes copied or WALK_TRIP_NS: the trip's end waits for the copier.
WALK_DEFERRED_BATCH = 64 << 20
WALK_TRIP_NS = 20_000_000


class DeferredCopies:
    """`with DeferredCopies(target) as copies:` a run of a job's requests in a worker thread,
    TARGET's copies made by its copier process meanwhile (Node.defer_copies_sync), all
    settled when the run ends, however it ends; `copies.failed` is then the failed copy with
    the lowest offset, (offset, error), if any. (Backup, mirror and commit trips.)"""

    def __init__(self, target: Node) -> None:
        self.target = target
        self.failed: tuple[int, OSError] | None = None

    def __enter__(self) -> DeferredCopies:
        self.target.defer_copies_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.failed = self.target.settle_copies_sync()


def piece_at(starts: Sequence[int], at: int) -> int:
    """Which of the pieces that begin at STARTS (in order) offset AT lies in: its index."""
    return bisect.bisect_right(starts, at) - 1


def _walk_pieces(step: Callable[[int], tuple[int, bool]], offset: int, size: int,
                 batch: int, starts: list[int] | None = None,
                 deadline: int | None = None) -> tuple[int, int, CopyFailed | None]:
    """STEP over the pieces from OFFSET: one, or as many as copy up to BATCH bytes (and
    until time.monotonic_ns() reaches DEADLINE, if given); (bytes walked, bytes copied, the
    failure that stopped the walk or None). Each piece's offset is added to STARTS. In a
    worker thread."""
    walked = copied = 0
    while offset + walked < size:
        if starts is not None:
            starts.append(offset + walked)
        try:
            n, did_copy = step(offset + walked)
        except CopyFailed as failure:
            return walked, copied, failure
        walked += n
        copied += n if did_copy else 0
        if copied >= batch or walked >= WALK_SPAN or not batch:
            break
        if deadline is not None and time.monotonic_ns() >= deadline:
            break
    return walked, copied, None


class BlockJob(Job):
    """A job that reads a source node and writes a target node, holding both while it runs."""

    # Whether the job flushes its target before it ends or becomes ready (Node.write_behind).
    flushes_target: ClassVar[bool] = False
    # Whether a walk without a speed limit has its target's copies made by the target's
    # copier process (Node.defer_copies_sync) while it goes on.
    defers_copies: ClassVar[bool] = False

    def __init__(
        self, job_id: str, emit: Emit, source: Node, target: Node, *, auto_finalize: bool,
        auto_dismiss: bool, lock_target: bool = True, on_source_error: str = "report",
        on_target_error: str = "report",
    ) -> None:
        super().__init__(job_id, emit, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        # query-block-jobs' io-status: how the request the job stopped on failed.
        self.io_status = "ok"
        # The image's write lock, unless the job writes nothing (a stream without backing).
        self._locked = lock_target
        if lock_target:
            target.take_write()
        self.source = source
        self.target = target
        source.source_of.append(self.job_type)
        target.target_of = self.job_type
        if self.flushes_target:
            target.write_behind(True)
        self._holding = True
        # The error QEMU meets once the job is created (a drive-* target's image lock).
        self.late_error: str | None = None

    def check_created(self) -> None:
        if self.late_error is not None:
            raise BlockError(self.late_error)

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.source.source_of.remove(self.job_type)
            self.target.target_of = None
            if self.flushes_target:
                self.target.write_behind(False)
            if self._locked:
                self.target.drop_write()

    def commit(self) -> None:
        self._release()

    # -- I/O errors ----------------------------------------------------------------------

    def io_failed(self, failure: CopyFailed) -> str:
        """Apply the error policy to a failed request: send BLOCK_JOB_ERROR and return the
        action, 'report' (the caller fails the job with the error), 'ignore' (it retries) or
        'stop' (it retries once the job has been resumed: the job is now paused, as by its
        client, with the error in its io-status)."""
        read = failure.operation == "read"
        policy = self.on_source_error if read else self.on_target_error
        nospace = failure.error.errno == errno.ENOSPC
        action = ("stop" if nospace else "report") if policy == "enospc" else policy
        self._emit(
            "BLOCK_JOB_ERROR",
            {"device": self.id, "operation": failure.operation, "action": action},
        )
        if action == "stop":
            if not self.user_paused:
                self.user_paused = True
                self.pause()
            self.io_status = "nospace" if nospace else "failed"
        return action

    async def retry_after(self, action: str) -> None:
        """Before retrying a failed request: the pause for 'ignore', the pause point (where a
        stopped job waits for job-resume, or notices its cancellation) for both."""
        await self.sleep_ns(IGNORED_ERROR_RETRY_NS if action == "ignore" else 0)

    async def walk(self, size: int, step: Callable[[int], tuple[int, bool]]) -> None:
        """QEMU 7.2's stream and commit loop over [0, SIZE): STEP(offset), in a worker thread,
        handles the piece at offset and says how long it was and whether it was copied.
        Progress counts every piece, the speed only copied ones; one sleep per piece, for the
        delay the last copy asked (a pause or a speed change ends it early, and the walk goes
        on from there). A failed piece is tried again as the error policy says."""
        self.progress_total = size
        offset = delay = 0
        while offset < size:
            await self.sleep_ns(delay)
            # Without a speed limit the pieces between two pause points go to the worker
            # thread together (up to WALK_BATCH bytes copied): no sleep would come between
            # them, and a trip to the thread per piece would cost more than many a copy.
            batch = WALK_BATCH if not self.speed else 0
            n = copied_bytes = 0
            failure: CopyFailed | None = None
            self.io_begin()
            try:
                if batch and self.defers_copies:
                    n, copied_bytes, failure = await trio.to_thread.run_sync(
                        self._walk_deferred, step, offset, size)
                else:
                    n, copied_bytes, failure = await trio.to_thread.run_sync(
                        _walk_pieces, step, offset, size, batch)
            finally:
                self.io_end()
            offset += n
            self.progress_current += n
            delay = self.limit.delay_ns(copied_bytes) if copied_bytes else 0
            if failure is not None:
                action = self.io_failed(failure)
                if action == "report":
                    raise failure.error from None
                await self.retry_after(action)

    def _walk_deferred(self, step: Callable[[int], tuple[int, bool]], offset: int,
                       size: int) -> tuple[int, int, CopyFailed | None]:
        """_walk_pieces with the target's copies made by its copier meanwhile, all done
        before the trip ends: a copy that failed stops the walk at its piece, as if the piece
        had failed there. In a worker thread."""
        starts: list[int] = []
        with DeferredCopies(self.target) as copies:
            walked, copied, failure = _walk_pieces(
                step, offset, size, WALK_DEFERRED_BATCH, starts,
                time.monotonic_ns() + WALK_TRIP_NS)
        late = copies.failed
        if late is not None and (failure is None or late[0] < starts[-1]):
            began = starts[piece_at(starts, late[0])]
            return began - offset, 0, CopyFailed("write", late[1], 0)
        return walked, copied, failure

    def user_resume(self) -> None:
        super().user_resume()
        self.io_status = "ok"  # a resumed job retries: its error is no longer its state

    def abort(self) -> None:
        self._release()

    def _event_data(self) -> dict[str, Any]:
        return {
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self.speed,
            "type": self.job_type,
        }

    def on_pending(self) -> None:
        self._emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def on_ready(self) -> None:
        self._emit("BLOCK_JOB_READY", self._event_data())

    def on_finalized(self) -> None:
        data = self._event_data()
        if self.error is None:
            self._emit("BLOCK_JOB_COMPLETED", data)
        elif self.cancelled:
            self._emit("BLOCK_JOB_CANCELLED", data)
        else:
            data["error"] = self.error
            self._emit("BLOCK_JOB_COMPLETED", data)

    def result(self) -> dict[str, Any]:
        # As the job's final BLOCK_JOB_COMPLETED says it.
        return {"len": self.progress_total, "offset": self.progress_current}

    def source_bitmap(self) -> dict[str, Any] | None:
        """The dirty bitmap the job keeps on its source, as query-named-block-nodes lists it
        (None: the job keeps none)."""
        return None

    def reports_paused(self) -> bool:
        """query-block-jobs' `paused`."""
        return self.pause_count > 0

    def block_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.reports_paused(),
            "speed": self.speed,
            "io-status": self.io_status,
            "ready": self.status in _READY,
            "status": self.status,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.error is not None:
            info["error"] = self.error
        return info


def dirty_bitmap(count: int, granularity: int, *, recording: bool) -> dict[str, Any]:
    """A BlockDirtyInfo: COUNT dirty bytes, tracked in GRANULARITY-byte pieces."""
    return {"busy": False, "count": count, "granularity": granularity, "persistent": False,
            "recording": recording}


def new_job_id(jobs: JobManager, job_id: str | None) -> str:
    """The id of a new block job, checked. Without a job-id QEMU names the job after the
    device; QSD's nodes have no device name."""
    job_id = job_id or ""
    jobs.check_new_id(job_id)
    return job_id


def find_block_job(jobs: JobManager, job_id: str) -> BlockJob:
    """The block-job-* commands' lookup, with their error class and words. (blockdev-create's
    job is no block job: QEMU's block_job_get() does not find it.)"""
    job = jobs.get(job_id)
    if not isinstance(job, BlockJob):
        raise DeviceNotActive(f"Block job '{job_id}' not found")
    return job
