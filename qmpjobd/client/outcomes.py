"""What `wait` and `watch ID...` follow: the task records of the IDs asked for, to their end.

An ID is a job id (its newest task) or a task's uuid. A task watch starts before the IDs are
looked up, so that a change after the look arrives as a TASK_CHANGE event: none is missed.
"""

from __future__ import annotations

import sys

from ..qmp.client import CommandFailed

# typing itself would cost a one-shot client 3 ms to load (mypy reads this as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from .queries import Dialogue

FINISHED = frozenset({"success", "failure", "cancelled"})


def find_task(ident: str) -> Dialogue[dict[str, Any]]:
    """The task IDENT names: the newest of the job with that id, else the task of that uuid."""
    found = yield "query-tasks", {"job-id": ident, "limit": 1}
    if found:
        return dict(found[0])
    try:
        return dict((yield "query-task", {"uuid": ident}))
    except CommandFailed:
        raise CommandFailed("GenericError", f"no job or task '{ident}'") from None


def follow(idents: Sequence[str]) -> Dialogue[Outcomes]:
    """The Outcomes of IDENTS: a task watch started, then each ID's task looked up."""
    try:
        yield "task-watch", None
    except CommandFailed as e:
        if e.cls != "CommandNotFound":
            raise
        raise CommandFailed(e.cls, "waiting for jobs needs the daemon's task records, and "
                            "this one has none (no task-watch)") from None
    outcomes = Outcomes()
    for ident in idents:
        outcomes.found(ident, (yield from find_task(ident)))
    return outcomes


def outcome(ident: str, task: dict[str, Any]) -> str | None:
    """Why the task did not succeed, or None if it did."""
    if task["status"] == "success":
        return None
    if task["status"] == "cancelled":
        return f"{ident}: cancelled"
    info = task.get("error-info") or []
    reason = info[1] if len(info) > 1 else (info[0] if info else "failed")
    return f"{ident}: failed: {reason}"


class Outcomes:
    """The tasks of the IDs asked for, followed to their end by the TASK_CHANGE events of a
    watch started before they were looked up (a change after the look is never missed):
    made by `follow`, then told each event as it comes."""

    def __init__(self) -> None:
        self.waiting: dict[str, str] = {}  # uuid -> the ID it was asked by
        self.failures: list[str] = []
        self.tasks: dict[str, tuple[str, dict[str, Any]]] = {}  # uuid -> ID, latest record

    def found(self, ident: str, task: dict[str, Any]) -> None:
        """IDENT's task, as first looked up."""
        self.tasks[task["uuid"]] = (ident, task)
        if task["status"] in FINISHED:
            self._ended(ident, task)
        else:
            self.waiting[task["uuid"]] = ident

    def _ended(self, ident: str, task: dict[str, Any]) -> None:
        failure = outcome(ident, task)
        if failure:
            self.failures.append(failure)

    def seen(self, event: dict[str, Any]) -> None:
        if event["event"] != "TASK_CHANGE":
            return
        change = event["data"]
        ident = self.waiting.get(change["uuid"])
        if ident is None:
            return
        if change["change"] == "del":
            self.failures.append(f"{ident}: its task record was destroyed before it ended")
            del self.waiting[change["uuid"]]
            return
        self.tasks[change["uuid"]] = (ident, change["task"])
        if change["task"]["status"] in FINISHED:
            self._ended(ident, change["task"])
            del self.waiting[change["uuid"]]

    def report(self) -> bool:
        """Whether all ended well; each failure on stderr."""
        for failure in self.failures:
            print(f"qmpjob: {failure}", file=sys.stderr)
        return not self.failures
