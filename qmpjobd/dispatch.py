"""Command name -> argument check -> handler -> result, generated from the schema's tables.

Handlers register with `@handler("command-name")` in the modules of qmpjobd.commands (one per
schema file). At start-up `Dispatcher` pairs them with the schema's commands: a schema command
without a handler, a handler without a schema command, or a handler that cannot take one of its
command's arguments is a start-up error, not a surprise at the first call.

A handler is `async def name(ctx, **arguments)`: arguments arrive checked and converted (see
qapi/visit.py), named after the schema members with '-' turned into '_'; an absent optional
member is not passed. A boxed command's handler gets the argument object as one positional
dict. The handler returns a JSON-able value (None means {}) or raises QmpError.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from .block.graph import BlockGraph
from .events import EventBus
from .jobs.errors import JobError
from .jobs.manager import JobManager
from .qapi.conform import problem
from .qapi.schema import Command
from .qapi.tables import CommandEntry, Tables, python_name
from .qapi.visit import ArgumentError
from .qmp.errors import QmpError, generic
from .qmp.session import Request, Session

log = logging.getLogger("qmpjobd.dispatch")

Handler = Callable[..., Awaitable[object]]

_HANDLERS: dict[str, Handler] = {}


def handler(name: str) -> Callable[[Handler], Handler]:
    """Register the decorated coroutine function as the handler of command NAME."""

    def register(fn: Handler) -> Handler:
        if name in _HANDLERS:
            raise RuntimeError(f"two handlers for command {name!r}")
        _HANDLERS[name] = fn
        return fn

    return register


def registered_handlers() -> dict[str, Handler]:
    """Every handler of the modules in qmpjobd.commands (imported here, once)."""
    from . import commands  # noqa: F401  (importing the package registers its handlers)

    return dict(_HANDLERS)


class StartupError(Exception):
    """The schema and the handlers do not fit together."""


@dataclass
class Daemon:
    """What handlers reach through ctx besides their session: the daemon-wide state."""

    tables: Tables
    jobs: JobManager = field(default_factory=JobManager)
    events: EventBus = field(default_factory=EventBus)
    graph: BlockGraph = field(default_factory=BlockGraph)
    # Where jobs run; the server opens it before it serves anyone.
    job_nursery: trio.Nursery | None = None
    # Set by `quit`; the server watches it.
    quit_requested: Callable[[], None] = lambda: None


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

    @property
    def job_nursery(self) -> trio.Nursery:
        assert self.daemon.job_nursery is not None
        return self.daemon.job_nursery


class Dispatcher:
    def __init__(
        self, tables: Tables, handlers: dict[str, Handler], *, check_replies: bool = False
    ) -> None:
        self.tables = tables
        self.check_replies = check_replies
        _check_pairing(tables, handlers)
        self._routes: dict[str, tuple[CommandEntry, Handler]] = {
            name: (entry, handlers[name]) for name, entry in tables.commands.items()
        }

    async def run(self, ctx: Context, request: Request) -> object:
        """The command's result; raises QmpError with the reply's error."""
        name = request.command
        route = self._routes.get(name)
        if route is None or (not ctx.session.negotiated and name != "qmp_capabilities"):
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        entry, fn = route
        if request.oob and not entry.allow_oob:
            raise generic(f"The command {name} does not support OOB")
        try:
            arguments = entry.check_arguments(request.arguments)
        except ArgumentError as exc:
            raise generic(exc.desc) from None
        try:
            result = await (fn(ctx, arguments) if entry.boxed else fn(ctx, **arguments))
        except QmpError:
            raise
        except JobError as exc:
            raise QmpError(exc.cls, exc.desc) from None
        except Exception:
            log.exception("command %s failed unexpectedly (arguments %r)", name, arguments)
            raise generic(f"internal error in {name}; the daemon's log has the details") from None
        if result is None:
            result = {}
        if self.check_replies and entry.returns is not None:
            found = problem(result, entry.returns, self.tables.defines)
            if found is not None:
                log.error("reply of %s does not conform to the schema: %s", name, found)
                raise generic(f"internal error: reply of {name} does not conform: {found}")
        return result


def _check_pairing(tables: Tables, handlers: dict[str, Handler]) -> None:
    problems = []
    for name in tables.commands.keys() - handlers.keys():
        problems.append(f"command {name} has no handler")
    for name in handlers.keys() - tables.commands.keys():
        problems.append(f"handler for {name}, which is not in the schema")
    for name, entry in tables.commands.items():
        fn = handlers.get(name)
        if fn is None or entry.boxed:
            continue
        command = tables.schema.lookup(name)
        assert isinstance(command, Command)
        members = command.arg_type.members if command.arg_type else []
        parameters = inspect.signature(fn).parameters
        takes_rest = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        for member in members:
            if not takes_rest and python_name(member.name) not in parameters:
                problems.append(f"handler for {name} cannot take argument {member.name!r}")
    if problems:
        raise StartupError("schema and handlers disagree: " + "; ".join(sorted(problems)))
