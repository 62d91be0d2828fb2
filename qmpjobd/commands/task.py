"""Handlers for schema/task.json: task records, their changes, and watching them.

The rules are the task layer's (tasks/registry.py, tasks/service.py). The reply to a command
that changes a task is held until the change is committed (`_after_commit`); the connection's
next commands need not wait for that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..access import OPERATOR
from ..context import Context, handler
from ..jobs.errors import JobError
from ..qmp.errors import generic
from ..tasks.errors import TaskError
from ..tasks.model import DEFAULT_TYPE, Task
from ..tasks.registry import (
    ABSENT,
    MAX_DESCRIPTION,
    MAX_NAME,
    check_length,
    check_other_config,
)
from ..tasks.service import QUERY_LIMIT, TaskWatch


def _after_commit(ctx: Context) -> None:
    """Send this command's reply once every change made so far is committed."""
    ctx.reply_after = ctx.tasks.feed.ticket


async def _edit(ctx: Context, uuid: str, change: Callable[[Task], None]) -> None:
    """Names and other-config, which any task may have changed."""
    await _own(ctx, uuid, "change")
    await ctx.tasks.registry.edit(uuid, change)
    _after_commit(ctx)


async def _own(ctx: Context, uuid: str, what: str, jobs_too: bool = False) -> None:
    """On an operator's connection: UUID must be a client's task its own uid created (or,
    JOBS_TOO, a job's task), as XenAPI's task.destroy separates own from any. An admin may
    touch every task; a task that does not exist gets the task layer's own error later."""
    if ctx.role != OPERATOR:
        return
    registry = ctx.tasks.registry
    task = registry.live.get(uuid)
    if task is None:
        try:
            task = Task.from_info(await registry.get(uuid))
        except TaskError:
            return  # no such task: the command's own error says so
    if task.job_id is not None:
        if jobs_too:
            return
        raise generic(f"Task '{uuid}' is job '{task.job_id}''s: an operator may not {what} it")
    uid = None if ctx.peer is None else ctx.peer[0]
    if task.owner is None or task.owner[0] != uid:
        who = "nobody known" if task.owner is None else f"uid {task.owner[0]}"
        raise generic(f"Task '{uuid}' was created by {who}: an operator may {what} only the "
                      "tasks its own uid created")


@handler("query-tasks")
async def query_tasks(ctx: Context, **filters: Any) -> list[dict[str, Any]]:
    return await ctx.tasks.registry.query(**filters)


@handler("query-task")
async def query_task(ctx: Context, *, uuid: str) -> dict[str, Any]:
    return await ctx.tasks.registry.get(uuid)


@handler("task-create")
async def task_create(
    ctx: Context, *, name_label: str, name_description: str = "", type: str = DEFAULT_TYPE,
    other_config: object = None, subtask_of: str | None = None,
) -> dict[str, str]:
    if subtask_of is not None:
        # A subtask changes its parent's outcome: an operator's only under its own tasks.
        await _own(ctx, subtask_of, "add a subtask to")
    uuid = await ctx.tasks.registry.create(
        name_label=name_label, name_description=name_description, type=type,
        other_config=other_config, subtask_of=subtask_of, owner=ctx.peer,
    )
    _after_commit(ctx)
    return {"uuid": uuid}


@handler("task-set-progress")
async def task_set_progress(ctx: Context, *, uuid: str, progress: float) -> None:
    await _own(ctx, uuid, "change")
    await ctx.tasks.registry.set_progress(uuid, progress)
    _after_commit(ctx)


@handler("task-set-result")
async def task_set_result(
    ctx: Context, *, uuid: str, result: object = ABSENT, result_type: str | None = None
) -> None:
    await _own(ctx, uuid, "change")
    await ctx.tasks.registry.set_result(uuid, result, result_type)
    _after_commit(ctx)


@handler("task-set-error-info")
async def task_set_error_info(
    ctx: Context, *, uuid: str, error_info: list[str], error_code: int | None = None
) -> None:
    await _own(ctx, uuid, "change")
    await ctx.tasks.registry.set_error_info(uuid, error_info, error_code)
    _after_commit(ctx)


@handler("task-set-status")
async def task_set_status(ctx: Context, *, uuid: str, status: str) -> None:
    await _own(ctx, uuid, "change")
    await ctx.tasks.registry.set_client_status(uuid, status)
    _after_commit(ctx)


@handler("task-set-name-label")
async def task_set_name_label(ctx: Context, *, uuid: str, name_label: str) -> None:
    check_length("name-label", name_label, MAX_NAME)

    def rename(task: Task) -> None:
        task.name_label = name_label

    await _edit(ctx, uuid, rename)


@handler("task-set-name-description")
async def task_set_name_description(ctx: Context, *, uuid: str, name_description: str) -> None:
    check_length("name-description", name_description, MAX_DESCRIPTION)

    def describe(task: Task) -> None:
        task.name_description = name_description

    await _edit(ctx, uuid, describe)


@handler("task-set-other-config")
async def task_set_other_config(ctx: Context, *, uuid: str, other_config: object) -> None:
    config = check_other_config(other_config)

    def replace(task: Task) -> None:
        task.other_config = config

    await _edit(ctx, uuid, replace)


@handler("task-add-to-other-config")
async def task_add_to_other_config(ctx: Context, *, uuid: str, key: str, value: str) -> None:
    def add(task: Task) -> None:
        task.other_config = check_other_config({**task.other_config, key: value})

    await _edit(ctx, uuid, add)


@handler("task-remove-from-other-config")
async def task_remove_from_other_config(ctx: Context, *, uuid: str, key: str) -> None:
    def remove(task: Task) -> None:
        task.other_config.pop(key, None)

    await _edit(ctx, uuid, remove)


@handler("task-cancel")
async def task_cancel(ctx: Context, *, uuid: str) -> None:
    await _own(ctx, uuid, "cancel", jobs_too=True)  # as job-cancel, which operators may run
    tasks = ctx.tasks
    task = tasks.registry.live.get(uuid)
    if task is None:  # no such task (the error says so), or finished
        raise tasks.registry.refusal(Task.from_info(await tasks.registry.get(uuid)), "cancel")
    if task.job_id is None:
        await tasks.registry.cancel_client_task(task)
        _after_commit(ctx)
        return
    # A job's task: exactly job-cancel of its job.
    job = ctx.jobs.get(task.job_id)
    if job is None:
        raise JobError("Job not found")
    job.cancel(force=True)
    tasks.recorder.cancel_requested(job)
    await job.settle()
    _after_commit(ctx)


@handler("task-destroy")
async def task_destroy(ctx: Context, *, uuid: str) -> None:
    await _own(ctx, uuid, "destroy")
    await ctx.tasks.registry.destroy(uuid)
    _after_commit(ctx)


@handler("query-task-changes")
async def query_task_changes(
    ctx: Context, *, since: int = 0, limit: int = QUERY_LIMIT
) -> dict[str, Any]:
    return await ctx.tasks.changes(since, limit)


@handler("task-watch")
async def task_watch(ctx: Context, *, since: int | None = None) -> dict[str, int]:
    watch = ctx.watch
    if watch is None:
        watch = ctx.watch = TaskWatch(ctx.send_event)
    start = await ctx.tasks.watch(watch, since)
    ctx.after_reply.append(watch.finish)
    return {"seq": start}


@handler("task-unwatch")
async def task_unwatch(ctx: Context) -> None:
    if ctx.watch is not None:
        ctx.watch.cancel()
