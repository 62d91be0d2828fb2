"""The task layer as the daemon holds it: the store opened, the records recovered, the writer,
the recorder and retention running, and each connection's watch of the feed.

At start-up the store is opened (and locked) and the live records loaded; job tasks that were
pending when the daemon stopped become `failure` ["Interrupted", ...], each a new change: the
block graph does not survive a restart, so neither do its jobs. Client tasks keep their status.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from ..events import Event, EventBus, OutputGate
from ..jobs.manager import JobManager
from .errors import TaskError
from .feed import TaskFeed
from .model import TRANSACTION, Task, TaskStatus
from .recorder import TaskRecorder
from .registry import QUERY_LIMIT, QUERY_LIMIT_MAX, TaskLimits, TaskRegistry
from .store import TaskStore

INTERRUPTED: Final = ["Interrupted", "the daemon stopped while the job was running"]
# How often finished tasks are looked at for expiry.
EXPIRY_INTERVAL: Final = 1.0


class TaskService:
    def __init__(
        self, jobs: JobManager, events: EventBus, gate: OutputGate | None = None,
        state_dir: str | None = None, limits: TaskLimits | None = None,
    ) -> None:
        self.limits = limits or TaskLimits()
        self.store = TaskStore(state_dir, self.limits.changes_kept)
        loaded = self.store.load()
        self.feed = TaskFeed(self.store, loaded, events.emit, gate)
        self.registry = TaskRegistry(self.feed, socket.gethostname(), self.limits)
        self.recorder = TaskRecorder(self.registry, jobs)
        self._recover(loaded.live)
        # The recorder sees every job event before any client does (subscribed first).
        events.subscribe(self.recorder.deliver)
        self._writer_scope = trio.CancelScope()
        self._others_scope = trio.CancelScope()

    def _recover(self, records: list[dict[str, Any]]) -> None:
        registry = self.registry
        for record in records:
            task = Task.from_info(record)
            registry.live[task.uuid] = task
            if not task.is_job_task and not task.status.finished:
                registry.pending_clients += 1
        for parent in list(registry.live.values()):
            if parent.type != TRANSACTION or parent.status.finished:
                continue
            for uuid in parent.subtasks:  # those that finished before the restart
                child = registry.live.get(uuid)
                if child is None:
                    found = self.store.get(uuid)
                    child = None if found is None else Task.from_info(found)
                if child is not None and child.status.finished:
                    registry.subtask_finished(parent, child)
        for task in list(registry.live.values()):
            if not task.is_job_task:
                continue
            task.job_status = None
            if task.status.finished:  # its job had concluded, and is gone now
                registry.live.pop(task.uuid)
                registry.changed(task, urgent=False)
                continue
            task.error_info = list(INTERRUPTED)
            registry.set_status(task, TaskStatus.FAILURE)

    async def run(self) -> None:
        """The writer, the recorder's progress samples and expiry, until close() (or
        cancelled)."""
        with self._writer_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.feed.run)
                with self._others_scope:
                    async with trio.open_nursery() as others:
                        others.start_soon(self.recorder.run)
                        others.start_soon(self._expire)

    async def _expire(self) -> None:
        while True:
            await self.registry.expire()
            await trio.sleep(EXPIRY_INTERVAL)

    async def close(self) -> None:
        """Commit what is left and close the store (at exit)."""
        self._others_scope.cancel()
        with trio.move_on_after(5):
            await self.feed.sync()
        self._writer_scope.cancel()
        await self.feed.read(self.store.close)

    def transaction(self, job_ids: list[str]) -> None:
        """A transaction made these jobs: their tasks become subtasks of its own task."""
        tasks = [self.recorder.by_job[job_id] for job_id in job_ids]
        self.registry.transaction(tasks)

    # -- the change feed -----------------------------------------------------------------

    def check_since(self, since: int) -> None:
        feed = self.feed
        if since < 0:
            raise TaskError("Parameter 'since' expects a non-negative sequence number")
        if since > feed.committed_seq:
            raise TaskError(
                f"Parameter 'since' ({since}) is beyond the last change ({feed.committed_seq})"
            )
        if since < feed.floor:
            raise TaskError(
                f"The changes after {since} are no longer kept (the oldest kept follows "
                f"{feed.floor}): list the tasks again (query-tasks)"
            )

    async def changes(self, since: int, limit: int) -> dict[str, Any]:
        """query-task-changes."""
        if not 1 <= limit <= QUERY_LIMIT_MAX:
            raise TaskError(f"Parameter 'limit' expects a value from 1 to {QUERY_LIMIT_MAX}")
        await self.feed.sync()
        self.check_since(since)
        last, floor, rows = await self.feed.read(self.store.changes_since, since, limit)
        if since < floor:  # trimmed meanwhile
            self.check_since(since)
        changes = [_change(seq, kind, uuid, record) for seq, kind, uuid, record in rows]
        seq = changes[-1]["seq"] if len(changes) == limit else last
        return {"seq": seq, "changes": changes}

    async def watch(self, watch: TaskWatch, since: int | None) -> int:
        """task-watch: WATCH (the connection's) buffers live changes from now on; the backlog
        after SINCE is read; `watch.finish` (after the reply) sends it, then what was
        buffered. Returns the last change at the start."""
        watch.begin()
        try:
            await self.feed.sync()
            if since is None:
                start, backlog = self.feed.committed_seq, []
            else:
                self.check_since(since)
                start, floor, rows = await self.feed.read(
                    self.store.changes_since, since, 1 << 62
                )
                if since < floor:
                    self.check_since(since)
                backlog = [_change(*row) for row in rows]
        except BaseException:
            watch.cancel()
            raise
        watch.ready(start, backlog)
        return start


def _change(seq: int, kind: str, uuid: str, record: dict[str, Any] | None) -> dict[str, Any]:
    change: dict[str, Any] = {"seq": seq, "change": kind, "uuid": uuid}
    if record is not None:
        change["task"] = record
    return change


class TaskWatch:
    """One connection's TASK_CHANGE subscription: the live events after its start, after the
    backlog, with no gap and no duplicate."""

    def __init__(self, send: Callable[[Event], None]) -> None:
        self._send = send
        self.start = 0
        self._buffer: list[Event] | None = None
        self._backlog: list[dict[str, Any]] = []
        self.active = False

    def begin(self) -> None:
        self.active = True
        self._buffer = []

    def cancel(self) -> None:
        self.active = False
        self._buffer = None

    def ready(self, start: int, backlog: list[dict[str, Any]]) -> None:
        self.start = start
        self._backlog = backlog

    def offer(self, event: Event) -> None:
        """A TASK_CHANGE from the bus."""
        if not self.active:
            return
        if self._buffer is not None:
            self._buffer.append(event)
        elif event.message["data"]["seq"] > self.start:
            self._send(event)

    def finish(self) -> None:
        """After task-watch's reply: the backlog, then what came meanwhile."""
        buffered, self._buffer = self._buffer or [], None
        now = time.time()
        for change in self._backlog:
            self._send(Event("TASK_CHANGE", change, now))
        self._backlog = []
        for event in buffered:
            if event.message["data"]["seq"] > self.start:
                self._send(event)


__all__ = ["QUERY_LIMIT", "TaskService", "TaskWatch"]
