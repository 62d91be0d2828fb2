"""The task records and what may be done to them: the task-* commands' rules, in one place.

The tasks that are not finished (and job tasks whose job still exists) are kept here as live
`Task`s; a finished task lives only in the store. Every change goes through the feed
(`changed`), which gives it its sequence number; the reply to the command that made it is held
until it is committed (the handler says so: Context.reply_after), while the connection's next
commands go on, so that one client's pipelined changes share commits too. What a client reads
comes from the store, after a sync, so it never sees a change that a crash could take back.
"""

from __future__ import annotations

import math
import time
import uuid as uuids
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import orjson
import trio

from .errors import TaskError
from .feed import TaskFeed
from .model import DEFAULT_TYPE, TRANSACTION, Task, TaskStatus, parse_timestamp
from .store import Query

# The bounds on what a client may store in a task (docs/tasks.md).
MAX_RESULT: Final = 64 << 10  # bytes of a result, as JSON
MAX_CONFIG_KEYS: Final = 64
MAX_CONFIG_ITEM: Final = 256  # bytes of an other-config key or value (UTF-8)
MAX_NAME: Final = 1024  # bytes of a name label or a type
MAX_DESCRIPTION: Final = 4096
MAX_ERROR_INFO: Final = 64 << 10  # bytes of error-info, all entries together
QUERY_LIMIT: Final = 1000
QUERY_LIMIT_MAX: Final = 10000
# Progress changes are sent at most this often per task (the last value always is).
PROGRESS_INTERVAL: Final = 0.1


class TaskLimits(NamedTuple):
    retention: float = 86400.0  # seconds a finished task is kept
    max_tasks: int = 100_000  # finished tasks kept
    max_pending: int = 100_000  # client tasks pending at once
    changes_kept: int = 100_000


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_other_config(value: object) -> dict[str, str]:
    """An other-config argument: a JSON object of strings to strings, within the bounds."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TaskError("Parameter 'other-config' expects an object of strings")
    if len(value) > MAX_CONFIG_KEYS:
        raise TaskError(f"other-config may have at most {MAX_CONFIG_KEYS} keys")
    for key, item in value.items():
        _check_config_item(key, item)
    return dict(value)


def _check_config_item(key: str, value: str) -> None:
    if _utf8_len(key) > MAX_CONFIG_ITEM or _utf8_len(value) > MAX_CONFIG_ITEM:
        raise TaskError(
            f"other-config keys and values may have at most {MAX_CONFIG_ITEM} bytes each"
        )


def check_length(what: str, text: str, limit: int) -> str:
    """TEXT, if it has at most LIMIT bytes (UTF-8); else the error naming parameter WHAT."""
    if _utf8_len(text) > limit:
        raise TaskError(f"Parameter '{what}' may have at most {limit} bytes")
    return text


def check_time(what: str, text: str) -> float:
    try:
        return parse_timestamp(text)
    except ValueError:
        raise TaskError(f"Parameter '{what}' expects an ISO 8601 time") from None


class TaskRegistry:
    def __init__(
        self, feed: TaskFeed, resident_on: str, limits: TaskLimits,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.feed = feed
        self.resident_on = resident_on
        self.limits = limits
        self.clock = clock
        self.live: dict[str, Task] = {}
        self.pending_clients = 0
        # Tasks whose progress changed since their last change was recorded, and when each
        # was last recorded.
        self._progressed: set[str] = set()
        self._last_progress: dict[str, float] = {}
        # Finished records are edited one at a time (read, change, write back).
        self._edit = trio.Lock()
        # The outcomes (status, error-info) of the finished subtasks of each unfinished
        # transaction task, by subtask.
        self._outcomes: dict[str, dict[str, tuple[TaskStatus, list[str]]]] = {}

    # -- recording changes ---------------------------------------------------------------

    def changed(
        self, task: Task, kind: str = "mod", *, urgent: bool = True, finished: bool = False,
        hold_output: bool = False,
    ) -> int:
        """Record TASK's change (its record as it is now); its sequence number."""
        self._progressed.discard(task.uuid)
        seq = self.feed.record(
            kind, task.uuid, task.info(self.resident_on), urgent=urgent,
            finished_delta=1 if finished else 0, hold_output=hold_output,
        )
        task.seq = seq
        return seq

    def progressed(self, task: Task) -> None:
        """TASK's progress changed: recorded at most every PROGRESS_INTERVAL (flush_progress)."""
        self._progressed.add(task.uuid)

    def flush_progress(self) -> None:
        """Record the progress of the tasks whose progress changed (coalesced)."""
        now = self.clock()
        for uuid in list(self._progressed):
            task = self.live.get(uuid)
            if task is None:
                self._progressed.discard(uuid)
            elif now - self._last_progress.get(uuid, 0.0) >= PROGRESS_INTERVAL:
                self._last_progress[uuid] = now
                self.changed(task, urgent=not task.is_job_task)

    def set_status(self, task: Task, status: TaskStatus, *, hold_output: bool = False) -> None:
        now = self.clock()
        was_pending_client = not task.is_job_task and not task.status.finished
        task.status = status
        if status.finished:
            task.finished = now
            task.progress = 1.0
            task.eta = None
        task.note_status(now)
        if status.finished and was_pending_client:
            self.pending_clients -= 1
        if status.finished and task.job_status is None:
            self.live.pop(task.uuid, None)
            self._last_progress.pop(task.uuid, None)
        self.changed(task, urgent=not task.is_job_task, finished=status.finished,
                     hold_output=hold_output)
        if status.finished and task.subtask_of is not None:
            parent = self.live.get(task.subtask_of)
            if parent is not None and parent.type == TRANSACTION:
                self.subtask_finished(parent, task)

    def new_task(self, **fields: Any) -> Task:
        task = Task(uuid=str(uuids.uuid4()), created=self.clock(), **fields)
        task.note_status(task.created)
        self.live[task.uuid] = task
        return task

    # -- reading -------------------------------------------------------------------------

    async def sync(self) -> None:
        await self.feed.sync()

    async def get(self, uuid: str) -> dict[str, Any]:
        await self.sync()
        record = await self.feed.read(self.feed.store.get, uuid)
        if record is None:
            raise TaskError(f"Task '{uuid}' not found")
        return record

    async def query(
        self, *, status: list[str] | None = None, type: str | None = None,
        name_label: str | None = None, job_id: str | None = None,
        subtask_of: str | None = None, other_config: object = None,
        created_after: str | None = None, created_before: str | None = None,
        limit: int = QUERY_LIMIT, after: str | None = None,
    ) -> list[dict[str, Any]]:
        """query-tasks: the filters by their names in the schema, '-' as '_'."""
        if not 1 <= limit <= QUERY_LIMIT_MAX:
            raise TaskError(f"Parameter 'limit' expects a value from 1 to {QUERY_LIMIT_MAX}")
        query = Query(
            statuses=status, type=type, name_label=name_label, job_id=job_id,
            subtask_of=subtask_of,
            other_config=None if other_config is None else check_other_config(other_config),
            created_after=None if created_after is None else check_time(
                "created-after", created_after),
            created_before=None if created_before is None else check_time(
                "created-before", created_before),
            limit=limit,
        )
        await self.sync()
        if after is not None:
            position = await self.feed.read(self.feed.store.position, after)
            if position is None:
                raise TaskError(f"Task '{after}' not found")
            query = query._replace(after=position)
        return await self.feed.read(self.feed.store.query, query)

    # -- client tasks --------------------------------------------------------------------

    async def create(
        self, *, name_label: str, name_description: str = "", type: str = DEFAULT_TYPE,
        other_config: object = None, subtask_of: str | None = None,
        owner: tuple[int, int] | None = None,
    ) -> str:
        if self.pending_clients >= self.limits.max_pending:
            raise TaskError(
                f"Too many pending tasks: the daemon holds at most {self.limits.max_pending}; "
                "finish some first"
            )
        config = {} if other_config is None else check_other_config(other_config)
        parent = None
        if subtask_of is not None:
            parent = self.live.get(subtask_of)
            if parent is None:  # no such task (the error says so), or a finished one
                parent = Task.from_info(await self.get(subtask_of))
            if parent.status != TaskStatus.PENDING:
                raise self.refusal(parent, "add a subtask")
        task = self.new_task(
            type=check_length("type", type, MAX_NAME),
            name_label=check_length("name-label", name_label, MAX_NAME),
            name_description=check_length("name-description", name_description,
                                           MAX_DESCRIPTION),
            other_config=config, subtask_of=subtask_of, owner=owner,
        )
        self.pending_clients += 1
        self.changed(task, "add")
        if parent is not None:
            parent.subtasks.append(task.uuid)
            self.changed(parent)
        return task.uuid

    async def set_progress(self, uuid: str, progress: float) -> None:
        if not (isinstance(progress, float | int) and math.isfinite(progress)
                and 0 <= progress <= 1):
            raise TaskError("Parameter 'progress' expects a number from 0 to 1")
        task = await self._client_task(uuid, "progress", "set-progress")
        task.progress = float(progress)
        now = self.clock()
        if now - self._last_progress.get(uuid, 0.0) >= PROGRESS_INTERVAL:
            self._last_progress[uuid] = now
            self.changed(task)
        else:
            # Coalesced: stored now, announced by the next change (flush_progress sends it
            # within PROGRESS_INTERVAL).
            self.feed.store_quietly(uuid, task.info(self.resident_on))
            self._progressed.add(uuid)

    async def set_result(self, uuid: str, result: object, result_type: str | None) -> None:
        task = await self._client_task(uuid, "result", "set-result")
        if result is not _ABSENT and len(orjson.dumps(result)) > MAX_RESULT:
            raise TaskError(f"A task's result may have at most {MAX_RESULT} bytes (as JSON)")
        if result is not _ABSENT:
            task.set_result(result, result_type)
        elif result_type is not None:
            task.result_type = result_type
        task.error_info = []
        task.error_code = None
        self.set_status(task, TaskStatus.SUCCESS)

    async def set_error_info(
        self, uuid: str, error_info: list[str], error_code: int | None
    ) -> None:
        task = await self._client_task(uuid, "error information", "set-error-info")
        if sum(_utf8_len(item) for item in error_info) > MAX_ERROR_INFO:
            raise TaskError(f"error-info may have at most {MAX_ERROR_INFO} bytes")
        task.error_info = list(error_info)
        task.error_code = error_code
        task.clear_result()
        self.set_status(task, TaskStatus.FAILURE)

    async def set_client_status(self, uuid: str, status: str) -> None:
        task = await self._client_task(uuid, "status", "set-status")
        self.set_status(task, TaskStatus(status))

    async def cancel_client_task(self, task: Task) -> None:
        if task.status != TaskStatus.PENDING:
            raise self.refusal(task, "cancel")
        self.set_status(task, TaskStatus.CANCELLING)

    async def edit(self, uuid: str, change: Callable[[Task], None]) -> None:
        """Names and other-config, which any task may have changed, finished or not."""
        async with self._edit:
            task = self.live.get(uuid)
            if task is None:
                record = await self.get(uuid)
                task = Task.from_info(record)
            change(task)
            self.changed(task)

    async def destroy(self, uuid: str) -> None:
        async with self._edit:
            task = self.live.get(uuid)
            if task is not None:
                if task.job_status is not None:
                    raise TaskError(
                        f"Task '{uuid}' cannot be destroyed: its job '{task.job_id}' still "
                        f"exists (status '{task.job_status.value}')"
                    )
                raise self.refusal(task, "destroy")
            record = await self.get(uuid)
            doomed = [record]
            index = 0
            while index < len(doomed):  # the subtasks, and theirs
                for sub in doomed[index]["subtasks"]:
                    if sub in self.live:
                        raise TaskError(
                            f"Task '{uuid}' cannot be destroyed: its subtask '{sub}' is "
                            f"{self.live[sub].status.value}"
                        )
                    found = await self.feed.read(self.feed.store.get, sub)
                    if found is not None:
                        doomed.append(found)
                index += 1
            for gone in doomed:
                self.feed.record("del", gone["uuid"], None, urgent=True, finished_delta=-1)
            parent_uuid = record.get("subtask-of")
            if parent_uuid is not None:
                await self._drop_subtask(parent_uuid, uuid)

    async def _drop_subtask(self, parent_uuid: str, uuid: str) -> None:
        parent = self.live.get(parent_uuid)
        if parent is None:
            await self.sync()
            found = await self.feed.read(self.feed.store.get, parent_uuid)
            if found is None:
                return
            parent = Task.from_info(found)
        if uuid in parent.subtasks:
            parent.subtasks.remove(uuid)
            self.changed(parent)

    async def expire(self) -> None:
        """Expire finished tasks older than the retention, or beyond the count kept."""
        await self.sync()
        limits = self.limits
        before = self.clock() - limits.retention
        found = await self.feed.read(
            self.feed.store.expired, before, limits.max_tasks, self.feed.finished_count
        )
        for uuid in found:
            self.feed.record("del", uuid, None, urgent=False, finished_delta=-1)

    # -- transactions ----------------------------------------------------------------------

    def transaction(self, job_tasks: list[Task]) -> Task:
        """A transaction's own task, whose subtasks are its jobs' tasks."""
        parent = self.new_task(type=TRANSACTION, name_label=TRANSACTION)
        parent.subtasks = [task.uuid for task in job_tasks]
        self.changed(parent, "add", urgent=False)
        for task in job_tasks:
            task.subtask_of = parent.uuid
            self.changed(task, urgent=False)
        return parent

    def subtask_finished(self, parent: Task, child: Task) -> None:
        """A transaction's job task finished: the transaction's task finishes once all have,
        a success if all are (else failure, or cancelled if none failed)."""
        outcomes = self._outcomes.setdefault(parent.uuid, {})
        outcomes[child.uuid] = (child.status, child.error_info)
        if len(outcomes) < len(parent.subtasks) or parent.status.finished:
            return
        del self._outcomes[parent.uuid]
        failed = [info for status, info in outcomes.values() if status == TaskStatus.FAILURE]
        if failed:
            parent.error_info = list(failed[0])
            self.set_status(parent, TaskStatus.FAILURE)
        elif any(status == TaskStatus.CANCELLED for status, _ in outcomes.values()):
            self.set_status(parent, TaskStatus.CANCELLED)
        else:
            self.set_status(parent, TaskStatus.SUCCESS)

    # -- lookups and refusals --------------------------------------------------------------

    async def _client_task(self, uuid: str, what: str, operation: str) -> Task:
        """A client's unfinished task, for OPERATION; else the error that says why not: no
        such task, a job's task (its WHAT comes from the job), or finished."""
        task = self.live.get(uuid)
        if task is None:
            task = Task.from_info(await self.get(uuid))  # finished: only in the store
        if task.is_job_task:
            raise TaskError(
                f"Task '{uuid}' belongs to job '{task.job_id}': its {what} comes from the job"
            )
        if task.status.finished:
            raise self.refusal(task, operation)
        return task

    @staticmethod
    def refusal(task: Task, operation: str) -> TaskError:
        """The error for OPERATION on TASK in its status, in the words of QEMU's verb errors."""
        return TaskError(
            f"Task '{task.uuid}' in status '{task.status.value}' cannot accept operation "
            f"'{operation}'"
        )


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


# The absence of an optional `any` argument (None would be JSON null, a valid result).
_ABSENT: Final = _Absent()
ABSENT: Final = _ABSENT


