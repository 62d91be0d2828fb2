"""A job: QEMU's statuses, transition and verb tables, pauses, cancellation, speed, progress.

A job's work is a trio task running `run()`; between chunks it calls `pause_point()` and, when
rate-limited, `ratelimit_sleep()`, which is where pause, cancel and speed changes take effect,
as at QEMU's pause points. What happens once the work is done (waiting, pending, finalization,
abort of the whole group) is the transaction's business (txn.py).

The statuses, verbs and their tables are in status.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import trio

from .errors import CANCELED, InvalidTransition, JobCancelled, JobError
from .ratelimit import RateLimit
from .status import TRANSITIONS, VERBS, JobStatus, JobVerb
from .txn import JobTxn

log = logging.getLogger("qmpjobd.jobs")

Emit = Callable[[str, dict[str, Any] | None], object]

class Job:
    job_type: ClassVar[str] = ""

    def __init__(
        self, job_id: str, emit: Emit, *, auto_finalize: bool = True, auto_dismiss: bool = True
    ) -> None:
        self.id = job_id
        self.status = JobStatus.UNDEFINED
        self._emit = emit
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.txn = JobTxn()  # a job always belongs to a transaction, if only its own
        self.txn.add(self)
        # Pauses: the client's flag (pauses by the client do not nest) and the count of all
        # pause requests, the client's and the daemon's own.
        self.user_paused = False
        self.pause_count = 0
        self.busy = False  # doing work, rather than sleeping, paused or done
        self.cancelled = False
        self.force_cancel = False
        self.work_done = False  # run() has returned or raised
        self.error: str | None = None
        self.progress_current = 0
        self.progress_total = 0
        self.speed = 0
        self.limit = RateLimit()
        self._wake = trio.Event()
        self._changed = trio.Event()
        # Whether the job's task is running or runnable (not waiting for real), and the event
        # that tells of its next real wait.
        self._running = False
        self._stopped = trio.Event()
        self._in_io = False  # between io_begin and io_end

    # -- status --------------------------------------------------------------------------

    def transition(self, status: JobStatus) -> None:
        if status not in TRANSITIONS[self.status]:
            raise InvalidTransition(f"job {self.id}: {self.status} -> {status}")
        self.status = status
        # (A JobStatus is a str: it goes on the wire as its value.)
        self._emit("JOB_STATUS_CHANGE", {"status": status, "id": self.id})
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Wait for the next status change."""
        await self._changed.wait()

    async def settle(self) -> None:
        """Wait until the job has acted on what was just asked of it (pause, resume, cancel),
        so that the events it causes go out before the command's reply, as in QEMU. A job
        waiting for I/O in a worker thread acts only once that returns: as in QEMU, whose
        coroutine is then parked, the reply goes out first."""
        while (
            not self.work_done and not self.finished and not self._settled()
            and not self._in_io
        ):
            await self.changed()
        if self.is_cancelled:
            while not self.finished and not self._in_io:
                await self.changed()

    def _settled(self) -> bool:
        if self.is_cancelled:
            return False
        parked = self.status.parked
        return parked if self.pause_count > 0 else not parked

    def check_verb(self, verb: JobVerb) -> None:
        if self.status not in VERBS[verb]:
            raise JobError(
                f"Job '{self.id}' in state '{self.status.value}' cannot accept command verb "
                f"'{verb.value}'"
            )

    @property
    def is_cancelled(self) -> bool:
        """Cancelled for good (a soft cancel of a ready job is a completion instead)."""
        return self.cancelled and self.force_cancel

    @property
    def finished(self) -> bool:
        """Concluded or dismissed (the one test of "has this job ended")."""
        return self.status.finished

    # -- the work and its pause points -----------------------------------------------------

    async def run(self) -> None:
        """The job's work: subclasses copy, stream, create... raising JobCancelled when asked."""
        raise NotImplementedError

    def wake(self) -> None:
        self._wake.set()
        self._running = not self.work_done  # it runs as soon as the scheduler lets it

    def _blocked(self) -> None:
        """The job waits for real (a delay, a pause, a verb, I/O): whoever waits for it to
        get that far may go on."""
        self._running = False
        self._stopped.set()
        self._stopped = trio.Event()

    def io_begin(self) -> None:
        """The job waits for I/O (in a worker thread): for the commands waiting on it, that
        is a real wait, as QEMU's coroutine yields there."""
        self._in_io = True
        self._blocked()
        self._poke()  # a command settling on the job no longer waits for it

    def io_end(self) -> None:
        self._in_io = False
        self._running = True

    async def run_until_blocked(self) -> None:
        """Let the job run until it next waits for real, or ends: what QEMU's job coroutine
        does before the command that started or woke it replies. (A job started or woken
        by a command does its next step before the reply, so its progress and events are
        QSD's for a client that asks at once.)"""
        while self._running and not self.work_done:
            await self._stopped.wait()

    async def _wait_for_wake(self, timeout_ns: int | None = None) -> None:
        self.busy = False
        self._blocked()
        try:
            if timeout_ns is None:
                await self._wake.wait()
            else:
                with trio.move_on_after(timeout_ns / 1e9):
                    await self._wake.wait()
        finally:
            self._wake = trio.Event()
            self._running = True
            self.busy = True

    async def pause_point(self) -> None:
        """Where pauses take effect (and cancellation is noticed)."""
        if self.pause_count > 0 and not self.is_cancelled:
            resumed = self.status
            parked = JobStatus.PAUSED if resumed == JobStatus.RUNNING else JobStatus.STANDBY
            self.transition(parked)
            while self.pause_count > 0 and not self.is_cancelled:
                await self._wait_for_wake()
            self.transition(resumed)
        if self.is_cancelled:
            raise JobCancelled

    async def sleep_ns(self, ns: int) -> None:
        """Sleep, unless woken (pause, cancel, a faster speed), then pass a pause point."""
        if ns > 0:
            await self._wait_for_wake(ns)
        else:
            await trio.lowlevel.checkpoint()
        await self.pause_point()

    async def ratelimit_sleep(self) -> None:
        """Wait as long as the speed asks after the bytes charged so far."""
        while True:
            delay = self.limit.delay_ns(0)
            await self.sleep_ns(delay)
            if not delay or self.is_cancelled:
                return

    def charge(self, n: int) -> None:
        """Count N bytes processed, for progress and for the speed limit."""
        self.progress_current += n
        self.limit.delay_ns(n)

    # -- verbs (called by handlers; each raises JobError with QEMU's words) ------------------

    def pause(self) -> None:
        self.pause_count += 1
        self.wake()
        self._poke()

    def resume(self) -> None:
        if self.pause_count == 0:
            raise RuntimeError(f"job {self.id}: resumed more often than paused")
        self.pause_count -= 1
        if self.pause_count == 0:
            self.wake()
        self._poke()

    def _poke(self) -> None:
        """Wake whoever settles on this job: what it waits for may have been asked away (a
        pause undone by a resume before the job got to its pause point)."""
        self._changed.set()
        self._changed = trio.Event()

    def user_pause(self) -> None:
        self.check_verb(JobVerb.PAUSE)
        if self.user_paused:
            raise JobError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume(self) -> None:
        # QEMU checks the flag before the status: resuming a pending job says this too.
        if not self.user_paused:
            raise JobError("Can't resume a job that was not paused")
        self.check_verb(JobVerb.RESUME)
        self.user_paused = False
        self.resume()

    def set_speed(self, speed: int) -> bool:
        """Change the speed; whether the job was woken (a faster pace starts at once)."""
        self.check_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self.speed = speed
        self.limit.set_speed(speed)
        if speed and speed <= old:
            return False
        self.wake()
        return not self.work_done and self.pause_count == 0

    def cancel(self, force: bool) -> None:
        self.check_verb(JobVerb.CANCEL)
        self.request_cancel(force)
        if self.work_done:
            # Done already (waiting, pending): nothing to interrupt, the group aborts now.
            if self.is_cancelled:
                self.txn.abort(self)
        else:
            self.wake()

    def request_cancel(self, force: bool) -> None:
        self._poke()
        if self.user_paused:
            self.user_paused = False
            self.resume()
        if not self.cancelled:
            self.cancelled = True
            self.force_cancel = force
        self.force_cancel = self.force_cancel or force or not self.soft_cancel_completes()

    def soft_cancel_completes(self) -> bool:
        """Whether a cancel without force completes the job instead (a ready mirror)."""
        return False

    def complete(self) -> None:
        self.check_verb(JobVerb.COMPLETE)
        if self.cancelled or not self.completable():
            raise JobError(f"The active block job '{self.id}' cannot be completed")
        self.do_complete()

    def completable(self) -> bool:
        return False

    def do_complete(self) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        self.check_verb(JobVerb.FINALIZE)
        self.txn.finalize()

    def dismiss(self) -> None:
        self.check_verb(JobVerb.DISMISS)
        self.transition(JobStatus.NULL)

    def discard(self) -> None:
        """A created job that will never start (its transaction failed): it aborts, concludes
        and goes away at once, cancelled (what its task record says)."""
        self.cancelled = self.force_cancel = True
        self.error = CANCELED
        self.transition(JobStatus.ABORTING)
        self.transition(JobStatus.CONCLUDED)
        self.transition(JobStatus.NULL)
        self.abort()

    # -- hooks for the kinds of job (block jobs emit BLOCK_JOB_* events here) --------------

    def check_created(self) -> None:
        """Raise the JobError QEMU meets only once the job exists (a drive-* target's image
        lock); the job then goes away at once."""

    def on_pending(self) -> None:
        """The job entered `pending` and waits for job-finalize (auto-finalize off)."""

    def commit(self) -> None:
        """Make the job's result final (success)."""

    def abort(self) -> None:
        """Undo what can be undone (failure or cancellation)."""

    def on_finalized(self) -> None:
        """After commit or abort, before `concluded`: block jobs report how it ended."""

    def result(self) -> dict[str, Any] | None:
        """What the job produced, for its task record once it succeeded (None: nothing)."""
        return None

    # -- what query-jobs shows -------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": self.status,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    # -- the task ------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Created -> running (events now, before the creating command replies); work starts."""
        self.transition(JobStatus.RUNNING)
        self.busy = True
        self._running = True
        nursery.start_soon(self._main)

    async def _main(self) -> None:
        error: str | None = None
        try:
            await self.run()
            if self.is_cancelled:
                raise JobCancelled
        except JobCancelled:
            error = CANCELED
        except JobError as exc:
            error = exc.desc
        except OSError as exc:
            error = exc.strerror or str(exc)
        except Exception:
            # A bug: the job fails, the daemon goes on.
            log.exception("job %s failed unexpectedly", self.id)
            error = "internal error; the daemon's log has the details"
        self.work_done = True
        self.busy = False
        self._blocked()
        try:
            self.txn.job_done(self, error)
        except Exception:
            # A bug in finishing a job must not take the daemon (and every other job) down.
            log.exception("job %s could not be finished", self.id)
