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

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType

from .block.graph import BlockGraph
from .events import EventBus
from .jobs.manager import JobManager
from .qapi.tables import Tables
from .qmp.session import Session

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
    events: EventBus = field(default_factory=EventBus)
    graph: BlockGraph = field(default_factory=BlockGraph)
    jobs: JobManager = field(init=False)
    # Set by `quit`; the server watches it.
    quit_requested: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self.jobs = JobManager(self.events.emit)


@dataclass(slots=True)
class Context:
    """A handler's view: the calling session and the daemon."""

    session: Session
    daemon: Daemon

    @property
    def jobs(self) -> JobManager:
        return self.daemon.jobs

    @property
    def events(self) -> EventBus:
        return self.daemon.events

    @property
    def graph(self) -> BlockGraph:
        return self.daemon.graph
