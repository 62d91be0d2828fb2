"""A task record: XenAPI's task with CloudStack's async-job result, as schema/task.json's
TaskInfo describes it.

A `Task` is the live, mutable record; `info()` renders it as the TaskInfo a client gets, which
is also what the store keeps: a finished task lives on only as that JSON, never as an object.
Times are seconds since the epoch inside, ISO 8601 UTC strings with microseconds and a Z on
the wire. `allowed-operations` is derived from the state, so the rendering is complete.
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from ..jobs.status import VERBS, JobStatus


class TaskStatus(StrEnum):
    PENDING = "pending"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """success, failure or cancelled: the status changes no more."""
        return self in _FINISHED


_FINISHED = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED})

# The status changes a record keeps (the last ones).
HISTORY_KEPT: Final = 32
# The type of a transaction's own task, whose subtasks are its jobs' tasks.
TRANSACTION: Final = "transaction"
# The type of a client's task when it gives none.
DEFAULT_TYPE: Final = "task"
_NO_RESULT: Final = object()


@functools.lru_cache(maxsize=4096)
def timestamp(seconds: float) -> str:
    """SECONDS since the epoch as ISO 8601 UTC with microseconds and a Z. (Cached: a record is
    rendered at each of its changes, its times each time.)"""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.lru_cache(maxsize=4096)
def parse_timestamp(text: str) -> float:
    """An ISO 8601 time (a Z or an offset; without one, UTC) as seconds since the epoch;
    ValueError if it is none."""
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


@dataclass(slots=True)
class Task:
    uuid: str
    type: str
    name_label: str
    created: float
    name_description: str = ""
    job_id: str | None = None
    status: TaskStatus = TaskStatus.PENDING
    # For a job's task, the job's status while the job exists.
    job_status: JobStatus | None = None
    started: float | None = None
    finished: float | None = None
    progress: float = 0.0
    eta: float | None = None
    result: object = _NO_RESULT
    result_type: str | None = None
    error_info: list[str] = field(default_factory=list)
    error_code: int | None = None
    subtask_of: str | None = None
    subtasks: list[str] = field(default_factory=list)
    other_config: dict[str, str] = field(default_factory=dict)
    owner: tuple[int, int] | None = None
    # (status, job status or None, time), oldest first, at most HISTORY_KEPT.
    history: list[tuple[TaskStatus, JobStatus | None, float]] = field(default_factory=list)
    seq: int = 0

    @property
    def is_job_task(self) -> bool:
        return self.job_id is not None

    def set_result(self, result: object, result_type: str | None) -> None:
        self.result = result
        self.result_type = result_type

    def clear_result(self) -> None:
        self.result = _NO_RESULT
        self.result_type = None

    def note_status(self, now: float) -> None:
        """Add the current status (and job status) to the history."""
        self.history.append((self.status, self.job_status, now))
        del self.history[:-HISTORY_KEPT]

    def allowed_operations(self) -> list[str]:
        if self.job_status is not None:
            # A job's task: what QEMU's verb table allows the job now.
            return [verb.value for verb, statuses in VERBS.items() if self.job_status in statuses]
        if self.status.finished:
            return ["destroy"]
        return ["cancel"] if self.status == TaskStatus.PENDING else []

    def info(self, resident_on: str) -> dict[str, Any]:
        """The TaskInfo a client gets."""
        info: dict[str, Any] = {"uuid": self.uuid}
        if self.job_id is not None:
            info["job-id"] = self.job_id
        info["type"] = self.type
        info["name-label"] = self.name_label
        info["name-description"] = self.name_description
        info["status"] = self.status.value
        if self.job_status is not None:
            info["job-status"] = self.job_status.value
        info["created"] = timestamp(self.created)
        if self.started is not None:
            info["started"] = timestamp(self.started)
        if self.finished is not None:
            info["finished"] = timestamp(self.finished)
        info["progress"] = self.progress
        if self.eta is not None and self.status == TaskStatus.PENDING:
            info["eta"] = timestamp(self.eta)
        if self.result is not _NO_RESULT:
            info["result"] = self.result
        if self.result_type is not None:
            info["result-type"] = self.result_type
        info["error-info"] = list(self.error_info)
        if self.error_code is not None:
            info["error-code"] = self.error_code
        info["allowed-operations"] = self.allowed_operations()
        if self.subtask_of is not None:
            info["subtask-of"] = self.subtask_of
        info["subtasks"] = list(self.subtasks)
        info["other-config"] = dict(self.other_config)
        info["resident-on"] = resident_on
        if self.owner is not None:
            info["owner"] = {"uid": self.owner[0], "pid": self.owner[1]}
        history = []
        for status, job_status, when in self.history:
            entry: dict[str, Any] = {"status": status.value}
            if job_status is not None:
                entry["job-status"] = job_status.value
            entry["time"] = timestamp(when)
            history.append(entry)
        info["history"] = history
        info["seq"] = self.seq
        return info

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Task:
        """A live record again, from the TaskInfo the store kept (a pending task at start-up)."""
        task = cls(
            uuid=info["uuid"], type=info["type"], name_label=info["name-label"],
            created=parse_timestamp(info["created"]),
            name_description=info["name-description"], job_id=info.get("job-id"),
            status=TaskStatus(info["status"]),
            job_status=JobStatus(info["job-status"]) if "job-status" in info else None,
            started=parse_timestamp(info["started"]) if "started" in info else None,
            finished=parse_timestamp(info["finished"]) if "finished" in info else None,
            progress=info["progress"],
            eta=parse_timestamp(info["eta"]) if "eta" in info else None,
            result_type=info.get("result-type"), error_info=list(info["error-info"]),
            error_code=info.get("error-code"), subtask_of=info.get("subtask-of"),
            subtasks=list(info["subtasks"]), other_config=dict(info["other-config"]),
            seq=info["seq"],
        )
        if "result" in info:
            task.result = info["result"]
        owner = info.get("owner")
        if owner is not None:
            task.owner = (owner["uid"], owner["pid"])
        for entry in info["history"]:
            job_status = entry.get("job-status")
            task.history.append((
                TaskStatus(entry["status"]), JobStatus(job_status) if job_status else None,
                parse_timestamp(entry["time"]),
            ))
        return task
