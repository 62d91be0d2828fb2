"""qmpjob: see what a qmpjobd runs, wait for it, steer it.

    qmpjob list [--all] [--json]       jobs and task records, with progress, speed, eta, age
    qmpjob watch [ID...]               the same, live, until the named jobs conclude
    qmpjob wait ID...                  exit 0 once all succeeded, 1 if one failed or was cancelled
    qmpjob pause|resume|cancel|complete|finalize|dismiss ID
    qmpjob set-speed ID BYTES          a block job's speed limit (0: none; 64M = 64 MiB/s)
    qmpjob events [--json]             every event, as it comes
    qmpjob tasks [--status S] [--type T] [--label L] [--all] [--json]
    qmpjob schema [COMMAND]            the commands, or one command's arguments and reply

An ID is a job id or a task's uuid. Exit status: 0 done; 1 the daemon refused (its error on
stderr) or a waited-for job failed or was cancelled; 2 usage or connection errors; 130 given up
with Ctrl-C (events, and watch without IDs, end so: 0). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .. import paths
from ..qmp.client import CommandFailed, ProtocolError
from . import render
from .connection import ConnectFailed, Connection
from .outcomes import FINISHED, follow
from .queries import query_tasks, rows

# typing itself would cost a one-shot client 3 ms to load (mypy reads this as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
VERBS = {"pause": "job-pause", "resume": "job-resume", "cancel": "job-cancel",
         "complete": "job-complete", "finalize": "job-finalize", "dismiss": "job-dismiss"}
SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every other error: 'qmpjob wait: error: ...' (usage with --help).
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="qmpjob", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("-s", "--socket", default=None,
                     help=f"the daemon's QMP socket (default: {paths.default_socket_path()})")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND",
                             parser_class=_Parser)
    listing = sub.add_parser("list", help="jobs and running tasks")
    listing.add_argument("--all", action="store_true", help="finished task records too")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    watch = sub.add_parser("watch", help="a live view until the named jobs conclude")
    watch.add_argument("ids", nargs="*", metavar="ID")
    wait = sub.add_parser("wait", help="wait until jobs or tasks end (no output)")
    wait.add_argument("ids", nargs="+", metavar="ID")
    for verb in VERBS:
        one = sub.add_parser(verb, help=f"{VERBS[verb]} on a job")
        one.add_argument("id", metavar="ID")
    speed = sub.add_parser("set-speed", help="a block job's speed limit, bytes per second")
    speed.add_argument("id", metavar="ID")
    speed.add_argument("bytes", metavar="BYTES", type=byte_count)
    events = sub.add_parser("events", help="every event as it comes")
    events.add_argument("--json", action="store_true", help="each event as the daemon sent it")
    tasks = sub.add_parser("tasks", help="task records")
    tasks.add_argument("--status", action="append", choices=sorted(FINISHED | {
        "pending", "cancelling"}), help="only these statuses (repeatable)")
    tasks.add_argument("--type", help="only tasks of this type")
    tasks.add_argument("--label", help="only tasks with this name label")
    tasks.add_argument("--all", action="store_true", help="finished tasks too")
    tasks.add_argument("--json", action="store_true", help="one JSON object per line")
    schema = sub.add_parser("schema", help="commands and their arguments")
    schema.add_argument("name", nargs="?", metavar="COMMAND")
    return top


def byte_count(text: str) -> int:
    """BYTES as given: 1048576, 512k, 64M, 1G (binary units)."""
    number, suffix = text, ""
    if text and text[-1].lower() in SUFFIXES:
        number, suffix = text[:-1], text[-1].lower()
    try:
        value = int(number) * SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}")
    return value


# -- list ----------------------------------------------------------------------------------------

def show_rows(found: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for row in found:
            print(json.dumps(row))
        return
    if not found:
        print("no jobs or tasks")
        return
    cells = []
    for row in found:
        speed = "" if row["speed"] is None else f"{render.size(row['speed'])}/s"
        if row["speed-limit"]:
            speed = f"{speed} (max {render.size(row['speed-limit'])}/s)".strip()
        cells.append([row["id"], row["type"], row["status"], render.bar(row["progress"]),
                      speed, "" if row["eta"] is None else render.duration(row["eta"]),
                      "" if row["age"] is None else render.duration(row["age"])])
    print(render.table(["ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "ETA", "AGE"], cells))


def do_list(conn: Connection, args: argparse.Namespace) -> int:
    show_rows(conn.run(rows(args.all)), args.json)
    return EXIT_OK


# -- wait ----------------------------------------------------------------------------------------

def do_wait(conn: Connection, args: argparse.Namespace) -> int:
    outcomes = conn.run(follow(args.ids))
    while outcomes.waiting:
        event = conn.next_event()
        if event is not None:
            outcomes.seen(event)
    return EXIT_OK if outcomes.report() else EXIT_REFUSED


# -- verbs ---------------------------------------------------------------------------------------

def do_verb(conn: Connection, args: argparse.Namespace) -> int:
    try:
        conn.execute(VERBS[args.command], {"id": args.id})
    except CommandFailed:
        # cancel of a client's task (not a job): task-cancel, as the task API has it.
        if args.command != "cancel":
            raise
        try:
            task = conn.execute("query-task", {"uuid": args.id})
        except CommandFailed:
            task = None
        if task is None or "job-id" in task:
            raise
        conn.execute("task-cancel", {"uuid": args.id})
    return EXIT_OK


def do_set_speed(conn: Connection, args: argparse.Namespace) -> int:
    conn.execute("block-job-set-speed", {"device": args.id, "speed": args.bytes})
    return EXIT_OK


# -- tasks ---------------------------------------------------------------------------------------

def do_tasks(conn: Connection, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {}
    if args.status:
        query["status"] = args.status
    elif not args.all:
        query["status"] = ["pending", "cancelling"]
    if args.type is not None:
        query["type"] = args.type
    if args.label is not None:
        query["name-label"] = args.label
    found = conn.run(query_tasks(query))
    if args.json:
        for task in found:
            print(json.dumps(task))
        return EXIT_OK
    now = time.time()
    cells = []
    for task in found:
        created = render.parse_time(task["created"])
        finished = render.parse_time(task.get("finished"))
        cells.append([task["uuid"], task["type"], task["name-label"], task["status"],
                      render.bar(task["progress"]),
                      "" if created is None else render.duration(now - created),
                      "" if finished is None else render.duration(now - finished) + " ago"])
    if not cells:
        print("no tasks")
    else:
        print(render.table(["UUID", "TYPE", "NAME", "STATUS", "PROGRESS", "AGE", "FINISHED"],
                           cells))
    return EXIT_OK


# -- schema --------------------------------------------------------------------------------------

def do_schema(conn: Connection, args: argparse.Namespace) -> int:
    from .schema import command_names, describe

    entities = conn.execute("query-qmp-schema")
    if args.name is None:
        print("\n".join(command_names(entities)))
        return EXIT_OK
    print(describe(entities, args.name))
    return EXIT_OK


LIVE_VIEWS = frozenset({"watch", "events"})  # on trio (live.py); the rest, one-shots, here
COMMANDS: dict[str, Callable[[Connection, argparse.Namespace], int]] = {
    "list": do_list, "wait": do_wait, "set-speed": do_set_speed, "tasks": do_tasks,
    "schema": do_schema,
    **{verb: do_verb for verb in VERBS},
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    path = args.socket
    try:
        if path is None:
            path = paths.default_socket_path()
            private = paths.private_directory()
            if private is not None and os.path.lexists(private):
                paths.check_private(private)  # else another user could stand in for it
        if args.command in LIVE_VIEWS:
            from .live import view  # trio, and rich: for the live views only

            return view(path, args)
        with Connection(path) as conn:
            return COMMANDS[args.command](conn, args)
    except CommandFailed as e:
        what = " ".join([args.command, *([args.id] if "id" in args else [])])
        print(f"qmpjob: {what}: {e.desc}", file=sys.stderr)
        return EXIT_REFUSED
    except (ConnectFailed, ProtocolError, paths.NotPrivate) as e:
        print(f"qmpjob: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # A reply not shaped as the schema says: not a daemon this client can read.
        print(f"qmpjob: unexpected reply from the daemon ({type(e).__name__}: {e})",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # The user ended a view that has no end of its own (events, watch of everything):
        # done. Anything else they gave up on: not done (the shell's 128 + SIGINT).
        views = args.command == "events" or (args.command == "watch" and not args.ids)
        return EXIT_OK if views else EXIT_INTERRUPTED
    except BrokenPipeError:  # the output's reader went away (qmpjob events | head)
        sys.stderr.close()
        return EXIT_OK
