"""python -m qmpjobd.qapi check FILE | introspect FILE [--define NAME]...

check: exit 0 if FILE (and everything it includes) is a valid schema; otherwise print the error,
location first, to stderr and exit 1.
introspect: print the query-qmp-schema reply for FILE as JSON, for a build in which the names
given with --define are defined.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import QapiError
from .introspect import introspect
from .schema import load_schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qmpjobd.qapi", description="Check a QAPI schema or print its introspection."
    )
    commands = parser.add_subparsers(dest="action", required=True)
    check = commands.add_parser("check", help="check a schema file")
    check.add_argument("file")
    intro = commands.add_parser("introspect", help="print the SchemaInfo list as JSON")
    intro.add_argument("file")
    intro.add_argument(
        "--define", "-D", action="append", default=[], metavar="NAME",
        help="a name that 'if' conditions may test (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        schema = load_schema(args.file)
    except QapiError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.action == "introspect":
        json.dump(introspect(schema, frozenset(args.define)), sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
