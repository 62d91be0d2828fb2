"""Users' extensions: the modules of --handlers and of the entry-point group qmpjobd.handlers,
the schema files they name, and the job kinds and transaction actions they declare (api.py),
found and checked before the schema is compiled with them. A mistake is a StartupError naming
the file and line of what is wrong.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from . import api
from .dispatch import StartupError
from .jobs.job import Job
from .qapi.schema import EnumType, ObjectType, Schema

HANDLERS_GROUP = "qmpjobd.handlers"
# A job type is a value of the schema's JobType enum: a QAPI enum value's name.
_VALUE_NAME = re.compile(r"(__[a-z0-9.-]+_)?(x-)?[a-z][a-z0-9-]*")


def user_modules(names: Sequence[str]) -> list[ModuleType]:
    """The modules of --handlers (NAMES), then those the installed packages name in the
    entry-point group qmpjobd.handlers."""
    found = []
    for name in names:
        try:
            found.append(importlib.import_module(name))
        except Exception as exc:  # ImportError, or whatever the module raised as it loaded
            raise StartupError(f"--handlers {name}: cannot import: {exc}") from None
    for name, value in entry_points(HANDLERS_GROUP):
        module_name, _, attribute = value.partition(":")
        try:
            loaded = importlib.import_module(module_name.strip())
            if attribute:
                loaded = getattr(loaded, attribute.strip())
        except Exception as exc:
            raise StartupError(f"entry point {name} ({value}) of {HANDLERS_GROUP}: cannot "
                               f"load: {exc}") from None
        if not isinstance(loaded, ModuleType):
            raise StartupError(f"entry point {name} of {HANDLERS_GROUP}: {value} is not a "
                               "module")
        if loaded not in found:
            found.append(loaded)
    return found


def entry_points(group: str) -> list[tuple[str, str]]:
    """(name, value) of each entry point in GROUP of the distributions on sys.path, the first
    of a name winning: what importlib.metadata finds, without its 50 ms of start-up (it reads
    every distribution's metadata; this reads the entry_points.txt files only)."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for directory in sys.path:
        try:
            entries = sorted(os.scandir(directory or "."), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith((".dist-info", ".egg-info")):
                continue
            distribution = entry.name.rsplit(".", 1)[0].split("-")[0].lower().replace("_", "-")
            if distribution in seen:
                continue
            seen.add(distribution)
            try:
                with open(os.path.join(entry.path, "entry_points.txt"), encoding="utf-8",
                          errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            section = None
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("[") and line.endswith("]"):
                    section = line[1:-1].strip()
                elif section == group and "=" in line and not line.startswith(("#", ";")):
                    name, _, value = line.partition("=")
                    found.append((name.strip(), value.strip()))
    return found


def module_schema(module: ModuleType) -> list[str]:
    """The schema files a handler module names (its SCHEMA: one path or several, relative to
    the module's own directory)."""
    named = getattr(module, "SCHEMA", None)
    if named is None:
        return []
    paths_named = [named] if isinstance(named, str | os.PathLike) else list(named)
    base = os.path.dirname(getattr(module, "__file__", None) or ".")
    return [os.path.join(base, os.fspath(path)) for path in paths_named]


def user_job_classes(modules: list[ModuleType]) -> list[type[Job]]:
    return [value for module in modules for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, Job) and value.job_type
            and value.__module__ == module.__name__]


def action_classes(modules: list[ModuleType]) -> list[type[api.Job]]:
    """The users' job kinds that are transaction actions (api.Job.transaction_action)."""
    return [cls for cls in user_job_classes(modules)
            if issubclass(cls, api.Job) and cls.transaction_action is not None]


def transaction_actions(modules: list[ModuleType]) -> list[tuple[str, str]]:
    """(action, wrapper struct) of each of them."""
    found: list[tuple[str, str]] = []
    for cls in action_classes(modules):
        assert cls.transaction_action is not None
        if cls.transaction_action not in found:
            found.append(cls.transaction_action)
    return found


def action_builders(modules: list[ModuleType]) -> dict[str, Callable[..., Any]]:
    return {cls.transaction_action[0]: cls.from_action for cls in action_classes(modules)
            if cls.transaction_action is not None}


def job_kinds(modules: list[ModuleType]) -> list[str]:
    """The job types of the users' job kinds (qmpjobd.api.Job subclasses), which JobType
    gains."""
    kinds: list[str] = []
    for cls in user_job_classes(modules):
        if cls.job_type not in kinds:
            kinds.append(cls.job_type)
    return kinds


def where(cls: type) -> str:
    """FILE:LINE of a class's definition."""
    try:
        return f"{inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]}"
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def _misnamed(cls: type, what: str, name: str, taken: set[str], kind: str) -> str | None:
    """Why NAME, the WHAT of CLS, cannot be a new KIND beside those TAKEN (None: it can)."""
    if not _VALUE_NAME.fullmatch(name):
        return (f"{where(cls)}: {what} {name!r} of {cls.__name__} is not a {kind}'s name "
                "(lower case, digits and '-', from a letter)")
    if name in taken:
        return f"{where(cls)}: {what} {name!r} of {cls.__name__} is a built-in {kind}"
    return None


def _values(schema: Schema, enum: str) -> set[str]:
    found = schema.lookup_type(enum)
    assert isinstance(found, EnumType)
    return {value.name for value in found.values}


def _refines_built_in(cls: type[Job], users: set[str]) -> bool:
    """Whether CLS has its job_type from one of qmpjobd's own job classes."""
    return any(base.__dict__.get("job_type") == cls.job_type
               and base.__module__.startswith("qmpjobd.") and base.__module__ not in users
               for base in cls.__mro__[1:])


def check_job_kinds(schema: Schema, modules: list[ModuleType]) -> None:
    """StartupError unless each user's job_type is a new value for SCHEMA's JobType, or the
    one a job class it derives from has (a built-in kind, refined, is still that kind)."""
    taken = _values(schema, "JobType")
    users = {module.__name__ for module in modules}
    problems = [problem for cls in user_job_classes(modules)
                if not (cls.job_type in taken and _refines_built_in(cls, users))
                and (problem := _misnamed(cls, "job_type", cls.job_type, taken, "job type"))]
    if problems:
        raise StartupError("; ".join(problems))


def blame_actions(plain: Schema, modules: list[ModuleType]) -> None:
    """When the schema did not compile with the users' transaction actions added: the
    StartupError naming each action class at fault, checked against PLAIN, the schema
    compiled without them (none raised if none is: the fault is elsewhere)."""
    taken = _values(plain, "TransactionActionKind")
    problems = []
    for cls in action_classes(modules):
        assert cls.transaction_action is not None
        case, wrapper = cls.transaction_action
        problem = _misnamed(cls, "transaction_action", case, taken, "action")
        found = plain.lookup(wrapper)
        if problem is None and (not isinstance(found, ObjectType) or found.meta != "struct"):
            problem = (f"{where(cls)}: transaction_action of {cls.__name__} names "
                       f"{wrapper!r}, which is not a struct of the schema")
        if problem is not None:
            problems.append(problem)
    if problems:
        raise StartupError("; ".join(problems))
