"""The command and event tables the dispatcher is built from, compiled once per schema.

Everything the server needs per command at run time is here, precomputed: the argument checker
(visit.py), the flags the protocol layer consults (allow-oob, success-response, ...), the return
type the tests hold replies to, and the reply to query-qmp-schema. Conditions are applied for the
given defines: a command or event whose condition does not hold is not in the tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from .introspect import SchemaInfo, introspect
from .schema import Command, Event, ObjectType, Schema, Type
from .visit import Checker, compile_command


def python_name(name: str) -> str:
    """A schema name as a Python identifier: `job-id` -> `job_id`, `x-perf` -> `x_perf`."""
    return name.replace("-", "_").replace(".", "_")


class CommandEntry(NamedTuple):
    name: str
    check_arguments: Checker
    boxed: bool
    allow_oob: bool
    allow_preconfig: bool
    # False for commands that send no reply on success (none in QSD's schema; the protocol
    # layer honours it all the same).
    success_response: bool
    returns: Type | None
    features: tuple[str, ...]


class EventEntry(NamedTuple):
    name: str
    data: ObjectType | None
    boxed: bool
    features: tuple[str, ...]


class Tables(NamedTuple):
    schema: Schema
    defines: frozenset[str]
    # Both in the order QEMU lists them (module, then definition order).
    commands: Mapping[str, CommandEntry]
    events: Mapping[str, EventEntry]
    # The reply to query-qmp-schema.
    schema_info: list[SchemaInfo]


def _features(entity: Command | Event, defines: frozenset[str]) -> tuple[str, ...]:
    return tuple(f.name for f in entity.features if f.cond.holds(defines))


def build_tables(schema: Schema, defines: frozenset[str] = frozenset()) -> Tables:
    commands = {
        c.name: CommandEntry(
            name=c.name,
            check_arguments=compile_command(c, defines),
            boxed=c.boxed,
            allow_oob=c.allow_oob,
            allow_preconfig=c.allow_preconfig,
            success_response=c.success_response,
            returns=c.ret_type,
            features=_features(c, defines),
        )
        for c in schema.commands()
        if c.cond.holds(defines)
    }
    events = {
        e.name: EventEntry(e.name, e.arg_type, e.boxed, _features(e, defines))
        for e in schema.events()
        if e.cond.holds(defines)
    }
    return Tables(schema, defines, commands, events, introspect(schema, defines))
