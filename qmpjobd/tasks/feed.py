"""The change log: sequence numbers, group commit, and TASK_CHANGE after each commit.

Every change to a task gets the next sequence number at once (`record`) and joins the batch the
writer task commits next (a progress update may also be stored without a change of the feed,
`store_quietly`, when a later change will announce it); the writer commits batch after batch in
a worker thread, so that many clients' changes share a transaction while the previous one is
being written. A change a
command made is committed as soon as the writer is free (the command's reply waits for it:
`sync`); the changes jobs make wait at most `JOB_DELAY`. After a commit each change goes out as
a TASK_CHANGE event: nothing a client sees was not committed, so a sequence number a client has
seen is never given again, also across a crash.

A job's final status is special: from the moment it is recorded until it is committed, the
output gate holds every client's output, so that no client sees the job conclude before the
database has its outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final, TypeVar

import trio

from ..events import OutputGate
from ..jobs.job import Emit
from .store import Change, Loaded, TaskStore

log = logging.getLogger("qmpjobd.tasks")

# How long a change a job made may wait before it is committed.
JOB_DELAY: Final = 0.1
# How long the writer waits before it tries a commit that failed again.
RETRY_DELAY: Final = 1.0

_T = TypeVar("_T")


class TaskFeed:
    def __init__(
        self, store: TaskStore, loaded: Loaded, emit: Emit, gate: OutputGate | None = None
    ) -> None:
        self.store = store
        self._emit = emit
        self._gate = gate
        self.last_seq = loaded.last_seq  # the last sequence number handed out
        self.committed_seq = loaded.last_seq
        self.floor = loaded.floor
        self.finished_count = loaded.finished
        self._batch: list[Change] = []
        # Batches are numbered as the writer takes them: a reply waits for the number of the
        # batch that holds its change (its ticket) to be committed.
        self.committed_batch = 0
        self._taken_batch = 0
        self._last_ticket = 0
        self._urgent = False
        self._wake = trio.Event()
        self._committed = trio.Event()
        # Gate holds to release once the change with that seq is committed.
        self._gate_holds: list[int] = []
        # One caller of the store at a time: the writer, and readers (queries).
        self._limiter = trio.CapacityLimiter(1)

    # -- writing -------------------------------------------------------------------------

    def record(
        self, kind: str, uuid: str, record: dict[str, Any] | None, *, urgent: bool,
        finished_delta: int = 0, hold_output: bool = False,
    ) -> int:
        """Log a change (KIND add/mod/del) with the record as it is now; its sequence number.
        URGENT: commit as soon as the writer can (a command waits); else within JOB_DELAY.
        HOLD_OUTPUT: hold every client's output until it is committed."""
        self.last_seq += 1
        seq = self.last_seq
        if record is not None:
            record["seq"] = seq
        self._add(Change(seq, kind, uuid, record, finished_delta))
        self.finished_count += finished_delta
        if hold_output and self._gate is not None:
            self._gate.hold()
            self._gate_holds.append(seq)
            urgent = True
        if urgent:
            self._urgent = True
            self._wake.set()
        elif len(self._batch) == 1:
            self._wake.set()
        return seq

    def store_quietly(self, uuid: str, record: dict[str, Any]) -> None:
        """Store RECORD as it is now without a change of the feed (no new sequence number, no
        TASK_CHANGE): a progress update that a later change will announce (coalescing)."""
        self._add(Change(record["seq"], "rec", uuid, record))
        self._urgent = True
        self._wake.set()

    def _add(self, change: Change) -> None:
        self._batch.append(change)
        self._last_ticket = self._taken_batch + 1

    @property
    def ticket(self) -> int:
        """The batch that holds the last change recorded: once it is committed, so is
        everything recorded so far."""
        return self._last_ticket

    async def sync(self) -> None:
        """Wait until every change recorded so far is committed."""
        await self.wait_committed(self._last_ticket)

    async def wait_committed(self, ticket: int) -> None:
        """Wait until the batch TICKET (and every one before it) is committed."""
        while self.committed_batch < ticket:
            self._urgent = True
            self._wake.set()
            await self._committed.wait()

    async def run(self) -> None:
        """The writer: commit batch after batch, then announce what each committed."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._batch:
                continue
            if not self._urgent:
                with trio.move_on_after(JOB_DELAY):
                    while not self._urgent:
                        await self._wake.wait()
                        self._wake = trio.Event()
            batch, self._batch = self._batch, []
            self._taken_batch += 1
            number = self._taken_batch
            self._urgent = False
            await self._commit(batch)
            self.committed_batch = number
            self.committed_seq = max(
                [self.committed_seq, *(c.seq for c in batch if c.kind != "rec")]
            )
            # As the store has just dropped the changes too old to keep.
            self.floor = max(self.floor, self.committed_seq - self.store.changes_kept)
            self._release_gate()
            for change in batch:
                if change.kind == "rec":
                    continue
                data: dict[str, Any] = {"seq": change.seq, "change": change.kind,
                                        "uuid": change.uuid}
                if change.record is not None:
                    data["task"] = change.record
                self._emit("TASK_CHANGE", data)
            self._committed.set()
            self._committed = trio.Event()
            if self._batch:
                self._wake.set()

    async def _commit(self, batch: list[Change]) -> None:
        while True:
            try:
                await self.read(self.store.commit, batch)
                return
            except Exception:
                # The disk is full, say: nothing is acknowledged until it is written.
                log.exception("committing %d task changes failed; trying again", len(batch))
                await trio.sleep(RETRY_DELAY)

    def _release_gate(self) -> None:
        while self._gate_holds and self._gate_holds[0] <= self.committed_seq:
            self._gate_holds.pop(0)
            if self._gate is not None:
                self._gate.release()

    # -- reading -------------------------------------------------------------------------

    async def read(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run one of the store's methods in a worker thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
