"""What qmpjob asks the daemon, as dialogues: generators that yield the commands to run,
each with its arguments, and are sent their return values (a QMP error is thrown into them as
CommandFailed). They own no connection: the one-shot subcommands run them over a blocking
socket (connection.py), the live views over trio (live.py), alike.
"""

from __future__ import annotations

import time

from ..qmp.client import CommandFailed
from . import render

# typing itself would cost a one-shot client 3 ms to load (mypy reads this as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any, TypeVar

    T = TypeVar("T")
    # Yields (command, arguments or None); is sent each command's return value; returns T.
    Dialogue = Generator[tuple[str, dict[str, Any] | None], Any, T]

PAGE = 1000  # task records asked for at a time


def query_tasks(query: dict[str, Any]) -> Dialogue[list[dict[str, Any]]]:
    """Every task record QUERY matches, page after page (the daemon gives at most PAGE at a
    time); none from a daemon without task records (qemu-storage-daemon: jobs only)."""
    found: list[dict[str, Any]] = []
    page: dict[str, Any] = {**query, "limit": PAGE}
    while True:
        try:
            batch = yield "query-tasks", page
        except CommandFailed as e:
            if e.cls == "CommandNotFound":
                return found
            raise
        found += batch
        if len(batch) < PAGE:
            return found
        page["after"] = batch[-1]["uuid"]


def rows(everything: bool) -> Dialogue[list[dict[str, Any]]]:
    """The jobs and the task records to show: one entry each (a job's task with its job)."""
    now = time.time()
    jobs = yield "query-jobs", None
    block_jobs = (yield "query-block-jobs", None) if jobs else []
    limits = {job["device"]: job.get("speed", 0) for job in block_jobs}
    tasks = yield from query_tasks({} if everything else {"status": ["pending", "cancelling"]})
    # Newest first: a job id's first task is its job's (an id may have been used before).
    by_job: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if "job-id" in task:
            by_job.setdefault(task["job-id"], task)
    for job in jobs:  # ended, not dismissed yet: its task is finished
        if job["id"] not in by_job:
            for task in (yield from query_tasks({"job-id": job["id"]}))[:1]:
                by_job[job["id"]] = task
    shown: set[str] = set()
    out = []
    for job in jobs:
        task = by_job.get(job["id"], {})
        if task:
            shown.add(task["uuid"])
        total, current = job["total-progress"], job["current-progress"]
        started = render.parse_time(task.get("started"))
        rate = current / (now - started) if started and now > started and current else None
        out.append(entry("job", job["id"], job["type"], job["status"], task, now,
                         current / total if total else None, rate, limits.get(job["id"]),
                         current=current, total=total))
    for task in tasks:
        if task["uuid"] in shown:
            continue
        ident = task.get("job-id", task["uuid"])
        out.append(entry("task", ident, task["type"], task["status"], task, now,
                         task["progress"], None, None))
    return out


def entry(kind: str, ident: str, type_: str, status: str, task: dict[str, Any], now: float,
          progress: float | None, rate: float | None, limit: int | None,
          **extra: Any) -> dict[str, Any]:
    created = render.parse_time(task.get("created"))
    eta = render.parse_time(task.get("eta"))
    return {"kind": kind, "id": ident, "uuid": task.get("uuid"), "type": type_,
            "status": status, "progress": progress, **{f"{k}-progress": v
                                                      for k, v in extra.items()},
            "speed": rate, "speed-limit": limit or None,
            "eta": None if eta is None else max(0.0, eta - now),
            "age": None if created is None else max(0.0, now - created)}
