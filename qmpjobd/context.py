"""What a command handler is given, and how a module declares its handlers.

A handler is `async def name(ctx, **arguments)`, declared with `@handler("command-name")`:
arguments arrive checked and converted (qapi/visit.py), named after the schema members with '-'
turned into '_'; an absent optional member is not passed. A boxed command's handler gets the
argument object as one positional dict. The handler returns a JSON-able value (None means {})
or raises QmpError (or an error of the job or block layer, which carries its QMP class).

`@handler` only marks the function; `handlers_in(modules)` collects the marked functions of the
modules it is given, so that whoever builds the dispatcher says which modules serve commands
(the daemon's own, qmpjobd.commands, and any given with --handlers).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .access import ADMIN
from .block.graph import BlockGraph
from .events import Event, EventBus, OutputGate
from .jobs.manager import JobManager
from .qapi.tables import Tables
from .qmp.session import Session
from .tasks.registry import TaskLimits
from .tasks.service import TaskService, TaskWatch

log = logging.getLogger("qmpjobd.jobs")

Handler = Callable[..., Awaitable[object]]

_MARK = "__qmp_command__"


def handler(name: str) -> Callable[[Handler], Handler]:
    """Mark the decorated coroutine function as the handler of command NAME."""

    def mark(fn: Handler) -> Handler:
        setattr(fn, _MARK, name)
        return fn

    return mark


class DuplicateHandler(Exception):
    """Two handlers for one command."""


def handlers_in(modules: Iterable[ModuleType]) -> dict[str, Handler]:
    """The handlers the MODULES declare, by command name."""
    found: dict[str, Handler] = {}
    for module in modules:
        for value in vars(module).values():
            name = getattr(value, _MARK, None)
            if not isinstance(name, str):
                continue
            if found.get(name, value) is not value:
                raise DuplicateHandler(f"two handlers for command {name!r}")
            found[name] = value
    return found


@dataclass
class Daemon:
    """The daemon-wide state handlers reach through ctx, besides their session."""

    tables: Tables
    # Where task records are kept (None: in memory), and their bounds.
    state_dir: str | None = None
    task_limits: TaskLimits = field(default_factory=TaskLimits)
    events: EventBus = field(default_factory=EventBus)
    graph: BlockGraph = field(default_factory=BlockGraph)
    # Holds every client's output while a job's outcome is being committed.
    gate: OutputGate = field(default_factory=OutputGate)
    jobs: JobManager = field(init=False)
    tasks: TaskService = field(init=False)
    # Set by `quit`; the server watches it.
    quit_requested: Callable[[], None] = lambda: None
    # The least role each command needs (the dispatcher's; query-commands lists by it).
    command_roles: dict[str, int] = field(default_factory=dict)
    # Users' transaction actions: the action's name -> what makes its job from its arguments
    # (api.Job.from_action).
    transaction_actions: dict[str, Callable[[Context, dict[str, Any]], Any]] = field(
        default_factory=dict)

    def __post_init__(self) -> None:
        self.jobs = JobManager(self.events.emit)
        # (Opens the store: a StoreError if the state directory cannot be used.)
        self.tasks = TaskService(
            self.jobs, self.events, self.gate, self.state_dir, self.task_limits
        )
        self.events.subscribe(self._log_job)

    def _log_job(self, event: Event) -> None:
        """At info: each job's start, and how it ended (its error), for the operator's log."""
        data = event.message.get("data")
        if event.name != "JOB_STATUS_CHANGE" or data is None:
            return
        status, job_id = data["status"], data["id"]
        if status not in ("created", "concluded"):
            return
        job = self.jobs.get(job_id)
        kind = job.job_type if job is not None else "?"
        if status == "created":
            log.info("job %s (%s) started", job_id, kind, extra={"job": job_id})
        elif job is not None and job.error is not None:
            log.info("job %s (%s) ended: %s", job_id, kind, job.error, extra={"job": job_id})
        else:
            log.info("job %s (%s) ended: success", job_id, kind, extra={"job": job_id})


def _no_send(event: Event) -> None:
    raise RuntimeError("this context has no connection to send events on")


@dataclass(slots=True)
class Context:
    """A handler's view: the calling session and the daemon, and the connection's own state:
    its peer (uid, pid; None for stdio), its watch of the task feed, how to send it an event,
    what to do once the reply it is serving has been sent, and the task feed's batch that reply
    must wait for (committed; 0: none)."""

    session: Session
    daemon: Daemon
    peer: tuple[int, int] | None = None
    # What it may run (access.py's roles): its monitor's, lowered by the access policy.
    role: int = ADMIN
    watch: TaskWatch | None = None
    send_event: Callable[[Event], None] = _no_send
    after_reply: list[Callable[[], None]] = field(default_factory=list)
    reply_after: int = 0

    @property
    def jobs(self) -> JobManager:
        return self.daemon.jobs

    @property
    def events(self) -> EventBus:
        return self.daemon.events

    @property
    def graph(self) -> BlockGraph:
        return self.daemon.graph

    @property
    def tasks(self) -> TaskService:
        return self.daemon.tasks
