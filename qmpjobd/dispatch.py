"""Command name -> argument check -> handler -> result, generated from the schema's tables.

`Dispatcher` pairs the schema's commands with the handlers it is given (context.py: a handler
is `async def name(ctx, **arguments)`): a schema command without a handler, a handler without a
schema command, or a handler that cannot take one of its command's arguments is a start-up
error, not a surprise at the first call. The session (qmp/session.py) has already refused what
the protocol refuses (unknown commands, the negotiation gate, oob where not allowed); the
dispatcher checks the arguments against the schema, runs the handler and turns what it raises
into the QMP error the client gets.
"""

from __future__ import annotations

import inspect
import logging

from .access import ROLE_NAMES, minimum_role
from .context import Context, Handler
from .jobs.errors import JobError
from .qapi.conform import problem
from .qapi.errors import ArgumentError
from .qapi.schema import Command
from .qapi.tables import CommandEntry, Tables, python_name
from .qmp.errors import QmpError, generic
from .qmp.session import Request
from .tasks.errors import TaskError

log = logging.getLogger("qmpjobd.dispatch")


class StartupError(Exception):
    """The schema and the handlers do not fit together."""


class Dispatcher:
    def __init__(
        self, tables: Tables, handlers: dict[str, Handler], *, check_replies: bool = False,
        user_commands: frozenset[str] = frozenset(),
    ) -> None:
        """USER_COMMANDS: those of the users' schema files (admin's unless a feature says)."""
        self.tables = tables
        self.check_replies = check_replies
        _check_pairing(tables, handlers)
        self._routes: dict[str, tuple[CommandEntry, Handler]] = {
            name: (entry, handlers[name]) for name, entry in tables.commands.items()
        }
        # What a session needs to know of the commands: each one's name, and whether it may
        # run out of band.
        self.commands: dict[str, bool] = {
            name: entry.allow_oob for name, entry in tables.commands.items()
        }
        # The least role that may run each command.
        self.roles: dict[str, int] = {
            name: minimum_role(name, entry.features, name not in user_commands)
            for name, entry in tables.commands.items()
        }

    async def run(self, ctx: Context, request: Request) -> object:
        """The result of REQUEST, which the session admitted; raises QmpError with the reply's
        error."""
        name = request.command
        entry, fn = self._routes[name]
        if ctx.role < self.roles[name]:
            raise generic(f"Command '{name}' needs the role '{ROLE_NAMES[self.roles[name]]}'; "
                          f"this connection's role is '{ROLE_NAMES[ctx.role]}'")
        try:
            arguments = entry.check_arguments(request.arguments)
        except ArgumentError as exc:
            raise generic(exc.desc) from None
        try:
            result = await (fn(ctx, arguments) if entry.boxed else fn(ctx, **arguments))
        except QmpError:
            raise
        except (JobError, TaskError) as exc:
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


def _where(fn: Handler) -> str:
    """FILE:LINE of a handler's definition."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return repr(fn)
    return f"{code.co_filename}:{code.co_firstlineno}"


def _check_pairing(tables: Tables, handlers: dict[str, Handler]) -> None:
    """StartupError naming, for each mismatch, the file and line it is at: a schema command
    without a handler (the schema's line), a handler without a command or one that cannot
    take an argument of its command (the handler's line)."""
    problems = []
    for name in tables.commands.keys() - handlers.keys():
        command = tables.schema.lookup(name)
        where = command.info.loc() if command is not None and command.info else "the schema"
        problems.append(f"{where}: command {name} has no handler")
    for name in handlers.keys() - tables.commands.keys():
        problems.append(f"{_where(handlers[name])}: handler for {name}, which is not in the "
                        "schema")
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
                problems.append(f"{_where(fn)}: handler for {name} cannot take argument "
                                f"{member.name!r}")
    if problems:
        raise StartupError("schema and handlers disagree: " + "; ".join(sorted(problems)))
