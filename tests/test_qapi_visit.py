"""Argument checking (qmpjobd.qapi.visit) against qemu-storage-daemon 7.2, message for message.

The differential cases send each (command, arguments) pair to a live QSD and run our checker over
QSD's own schema; the error descriptions must be identical. Every case is meant to fail in QEMU's
input visitor, before any command runs: where the arguments would otherwise be valid, a trailing
member 'zz' keeps the call on the error path (and proves that everything before it was accepted).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.qapi.schema import (
    AlternateType,
    ArrayType,
    BuiltinType,
    Command,
    EnumType,
    ObjectType,
    Schema,
    Type,
    load_schema,
)
from qmpjobd.qapi.visit import ArgumentError, compile_command
from tests.conftest import SCHEMA
from tests.daemons import QSD_DEFINES, QmpConnection, QsdProcess

Z = {"zz": 1}  # a member no command has: keeps a call that is otherwise valid from running
UNIX = {"type": "unix", "data": {"path": "/nonexistent/qmpjobd.sock"}}
NULL_CO = {"driver": "null-co", "node-name": "n1"}


def _case(command: str, arguments: dict[str, Any], id: str) -> Any:
    return pytest.param(command, arguments, id=id)


CASES = [
    # Commands without arguments: only {} is accepted.
    _case("query-jobs", {"x": 1}, "no-data-unexpected"),
    _case("quit", {"x": 1}, "no-data-quit"),
    _case("query-jobs", {"x": 1, "y": 2, "a": 3}, "no-data-several-unexpected"),
    _case("query-jobs", {"": 1}, "empty-key-root"),
    _case("query-jobs", {"é€": 1, "x": 2}, "non-ascii-keys"),
    # Missing, wrong JSON type, null for an optional member.
    _case("job-pause", {}, "missing"),
    _case("job-pause", {"bogus": 1}, "missing-before-unexpected"),
    _case("job-pause", {"id": 1}, "str-got-int"),
    _case("job-pause", {"id": None}, "str-got-null"),
    _case("job-pause", {"id": []}, "str-got-list"),
    _case("job-pause", {"id": {}}, "str-got-dict"),
    _case("job-pause", {"id": True}, "str-got-bool"),
    _case("job-pause", {"id": "x", "": 1}, "empty-key-after-member"),
    _case("block-job-cancel", {"device": "x", "force": 1}, "bool-got-int"),
    _case("block-job-cancel", {"device": "x", "force": None}, "optional-null-is-an-error"),
    _case("block-job-cancel", {"device": "x", "force": "true"}, "bool-got-str"),
    _case("qom-list-types", {"implements": 5}, "optional-str-got-int"),
    # Order: schema order, not input order; missing members before unknown ones.
    _case("block-job-set-speed", {"speed": "x"}, "first-member-missing-first"),
    _case("block-job-set-speed", {"speed": "x", "device": 1}, "first-member-type-first"),
    _case("block-job-set-speed", {"bogus": 1, "device": "x"}, "missing-later-member"),
    _case("block-job-set-speed", {"device": "x", "speed": 1, "bogus": 1, "x": 2}, "two-unknown"),
    # int (int64).
    _case("block-job-set-speed", {"device": "x", "speed": 1.0}, "int-got-float"),
    _case("block-job-set-speed", {"device": "x", "speed": 2**63}, "int-above-int64"),
    _case("block-job-set-speed", {"device": "x", "speed": -(2**63) - 1}, "int-below-int64"),
    _case("block-job-set-speed", {"device": "x", "speed": 2**64}, "int-above-uint64"),
    _case("block-job-set-speed", {"device": "x", "speed": 10**30}, "int-huge"),
    _case("block-job-set-speed", {"device": "x", "speed": -(2**63), **Z}, "int-min-ok"),
    _case("block-job-set-speed", {"device": "x", "speed": True}, "int-got-bool"),
    _case("block-job-set-speed", {"device": "x", "speed": "1"}, "int-got-str"),
    # uint64 and size: negatives wrap, floats and out-of-range values name "uint64".
    _case("block-set-write-threshold", {"node-name": "x", "write-threshold": -1, **Z},
          "uint64-negative-accepted"),
    _case("block-set-write-threshold", {"node-name": "x", "write-threshold": -(2**63), **Z},
          "uint64-int64-min-accepted"),
    _case("block-set-write-threshold", {"node-name": "x", "write-threshold": -(2**63) - 1},
          "uint64-below-int64"),
    _case("block-set-write-threshold", {"node-name": "x", "write-threshold": 2**64 - 1, **Z},
          "uint64-max-accepted"),
    _case("block-set-write-threshold", {"node-name": "x", "write-threshold": 2**64},
          "uint64-above"),
    _case("block-set-write-threshold", {"node-name": "x", "write-threshold": 1.0},
          "uint64-got-float"),
    _case("block-set-write-threshold", {"node-name": "x", "write-threshold": None},
          "uint64-got-null"),
    _case("block-set-write-threshold", {"node-name": "x", "write-threshold": False},
          "uint64-got-bool"),
    _case("blockdev-add", {**NULL_CO, "latency-ns": -1, **Z}, "uint64-in-branch-negative"),
    _case("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "/x",
                                                          "size": 1.5}}, "size-nested-float"),
    # uint16 / uint32 / int32: range errors name only the member (or 'null' in a list).
    _case("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": "0", "to": 70000}}}, "uint16-above"),
    _case("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": "0", "to": -1}}}, "uint16-negative"),
    _case("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": "0", "to": 65535}}, **Z}, "uint16-max-accepted"),
    _case("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": "0", "to": 1.5}}}, "uint16-got-float"),
    _case("nbd-server-start", {"addr": UNIX, "max-connections": 2**32}, "uint32-above"),
    _case("nbd-server-start", {"addr": UNIX, "max-connections": -1}, "uint32-negative"),
    _case("nbd-server-start", {"addr": UNIX, "max-connections": 2**32 - 1, **Z},
          "uint32-max-accepted"),
    _case("block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "n",
                               "addr": {"type": "unix", "path": "/x"}, "num-queues": 70000},
          "uint16-in-union-branch"),
    _case("object-add", {"qom-type": "thread-context", "id": "t", "cpu-affinity": [1, 70000]},
          "uint16-list-element"),
    _case("object-add", {"qom-type": "thread-context", "id": "t", "cpu-affinity": [1.5]},
          "uint16-list-element-float"),
    _case("object-add", {"qom-type": "secret_keyring", "id": "t", "serial": 2**31},
          "int32-above"),
    _case("blockdev-add", {"driver": "blkdebug", "node-name": "n1", "image": "x",
                           "max-transfer": -(2**31) - 1}, "int32-below"),
    _case("blockdev-add", {"driver": "blkdebug", "node-name": "n1", "image": "x",
                           "max-transfer": -(2**31), **Z}, "int32-min-accepted"),
    # Enums.
    _case("drive-mirror", {"device": "x", "target": "y", "sync": "sideways"}, "enum-value"),
    _case("drive-mirror", {"device": "x", "target": "y", "sync": 3}, "enum-got-int"),
    _case("drive-mirror", {"device": "x", "target": "y", "sync": "full", "mode": "bogus"},
          "enum-optional-value"),
    _case("qmp_capabilities", {"enable": ["bogus"]}, "enum-list-element"),
    _case("qmp_capabilities", {"enable": [1]}, "enum-list-element-type"),
    _case("qmp_capabilities", {"enable": "oob"}, "list-got-str"),
    _case("blockdev-add", {"driver": "file", "node-name": "n1", "filename": "/x",
                           "discard": "bogus"}, "enum-in-base"),
    _case("blockdev-add", {"driver": "file", "node-name": "n1", "filename": "/x",
                           "aio": "io_uring", **Z}, "enum-conditional-value-on"),
    # Nested objects and lists: full paths.
    _case("nbd-server-start", {"addr": 5}, "object-got-int"),
    _case("nbd-server-start", {"addr": {}}, "nested-missing-tag"),
    _case("nbd-server-start", {"addr": {"type": "bogus"}}, "nested-tag-value"),
    _case("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h"}}}, "nested-2"),
    _case("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "h", "port": 0}}},
          "nested-2-type"),
    _case("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "bogus": 1}}},
          "nested-2-unexpected"),
    _case("nbd-server-start", {"addr": {**UNIX, "bogus": 1}}, "nested-1-unexpected"),
    _case("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "": 1}}},
          "nested-empty-key"),
    _case("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "a": 1, "b": 2,
                                                                 "c": 3}}},
          "nested-several-unexpected"),
    _case("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x", "tight": 1}}},
          "member-conditional-on"),
    _case("nbd-server-start", {"addr": UNIX, "tls-creds": None}, "optional-null-after-nested"),
    _case("nbd-server-start", {"addr": UNIX, "max-connections": 5, "zz": 1, "tls-creds": 1},
          "member-error-before-unexpected"),
    _case("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]}, "list-dict-path"),
    _case("transaction", {"actions": [{"type": "bogus"}]}, "list-union-tag"),
    _case("transaction", {"actions": [{"type": "abort"}]}, "list-union-branch-missing"),
    _case("transaction", {"actions": [{"type": "abort", "data": {}},
                                      {"type": "block-dirty-bitmap-add", "data": {"node": "n"}}]},
          "list-second-element"),
    _case("transaction", {"actions": [], "properties": {"completion-mode": "bogus"}},
          "nested-enum"),
    _case("transaction", {"actions": {}}, "list-got-dict"),
    _case("blockdev-backup", {"job-id": "j", "device": "d", "target": "t", "sync": "full",
                              "x-perf": {"max-chunk": 1.5}}, "nested-int-float"),
    _case("chardev-add", {"id": "c", "backend": {"type": "file", "data": {"out": 5}}},
          "chardev-nested"),
    _case("chardev-add", {"id": "c", "backend": {"type": "dbus", "data": {"name": 5}}},
          "branch-conditional-on"),
    _case("blockdev-reopen", {"options": [{**NULL_CO, "zz": 1}]}, "boxed-in-list"),
    # Flat unions (boxed): discriminator, base before branch, branch members, conditions.
    _case("blockdev-add", {}, "union-tag-missing"),
    _case("blockdev-add", {"driver": "bogus"}, "union-tag-value"),
    _case("blockdev-add", {"driver": 5}, "union-tag-type"),
    _case("blockdev-add", {"driver": "nvme-io_uring"}, "union-tag-conditional-off"),
    _case("blockdev-add", {"driver": "null-co", "node-name": 5}, "union-base-member"),
    _case("blockdev-add", {**NULL_CO, "size": "x", "detect-zeroes": "bogus"},
          "union-base-before-branch"),
    _case("blockdev-add", {**NULL_CO, "bogus": 1}, "union-unexpected"),
    _case("blockdev-add", {**NULL_CO, "size": "x", "bogus": 1}, "union-branch-before-unexpected"),
    _case("blockdev-add", {"driver": "raw", "node-name": "n1"}, "union-branch-missing"),
    _case("blockdev-add", {"driver": "file", "node-name": "n1", "filename": "/x",
                           "cache": {"direct": 1}}, "union-nested-struct"),
    _case("blockdev-add", {"driver": "file", "node-name": "n1", "filename": "/x",
                           "drop-cache": True, **Z}, "union-conditional-member-on"),
    _case("object-add", {"qom-type": "bogus", "id": "x"}, "object-add-type"),
    _case("object-add", {"qom-type": "memory-backend-memfd", "id": "m"}, "object-add-branch-base"),
    _case("object-add", {"qom-type": "iothread", "id": "m", "poll-max-ns": 1.5}, "object-add-int"),
    # Alternates: branch by JSON type; a wrong type names the alternate and only the member.
    _case("blockdev-add", {"driver": "raw", "node-name": "n1", "file": 5}, "alternate-int"),
    _case("blockdev-add", {"driver": "raw", "node-name": "n1", "file": None}, "alternate-null"),
    _case("blockdev-add", {"driver": "raw", "node-name": "n1", "file": []}, "alternate-list"),
    _case("blockdev-add", {"driver": "raw", "node-name": "n1", "file": False}, "alternate-bool"),
    _case("blockdev-add", {"driver": "raw", "node-name": "n1", "file": "x", **Z},
          "alternate-str-accepted"),
    _case("blockdev-add", {"driver": "raw", "node-name": "n1", "file": {}},
          "alternate-object-missing"),
    _case("blockdev-add", {"driver": "raw", "node-name": "n1",
                           "file": {"driver": "raw", "file": {"driver": "null-co", "q": 1}}},
          "alternate-object-nested-unexpected"),
    _case("blockdev-add", {"driver": "raw", "node-name": "n1",
                           "file": {"driver": "null-co", "q": 1}, "offset": "x"},
          "nested-unexpected-before-later-member"),
    _case("blockdev-add", {"driver": "qcow2", "node-name": "n1", "file": "x", "backing": 5},
          "alternate-or-null-int"),
    _case("blockdev-add", {"driver": "qcow2", "node-name": "n1", "file": "x", "backing": None,
                           **Z}, "alternate-null-branch"),
    _case("blockdev-add", {"driver": "qcow2", "node-name": "n1", "file": "x",
                           "overlap-check": "bogus"}, "alternate-enum-branch"),
    _case("blockdev-add", {"driver": "qcow2", "node-name": "n1", "file": "x",
                           "overlap-check": {"template": 5}}, "alternate-struct-branch-type"),
    _case("blockdev-add", {"driver": "qcow2", "node-name": "n1", "file": "x",
                           "overlap-check": {"template": "bogus"}}, "alternate-struct-enum"),
    _case("blockdev-add", {"driver": "quorum", "node-name": "n1", "children": [5]},
          "alternate-list-element"),
    _case("blockdev-add", {"driver": "quorum", "node-name": "n1",
                           "children": ["a", {"driver": "raw"}]}, "alternate-list-object"),
    _case("blockdev-add", {"driver": "blkdebug", "node-name": "n1", "image": "x",
                           "inject-error": [{"event": "read_aio"}, {}]}, "list-struct-missing"),
    _case("blockdev-add", {"driver": "blkdebug", "node-name": "n1", "image": "x",
                           "inject-error": [{"event": "read_aio", "errno": 1.5}]},
          "list-struct-int-float"),
    _case("x-blockdev-set-iothread", {"node-name": "n", "iothread": 5}, "str-or-null-int"),
    _case("x-blockdev-set-iothread", {"node-name": "n", "iothread": None, **Z},
          "str-or-null-null"),
    _case("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [5]},
          "alternate-in-list"),
    _case("block-dirty-bitmap-merge", {"node": "n", "target": "t",
                                       "bitmaps": ["a", {"node": "n"}]},
          "alternate-object-in-list"),
    # any: never walked, whatever it holds.
    _case("qom-set", {"path": "/", "property": "p", "value": {"a": [{"b": None}]}, **Z},
          "any-accepted"),
    _case("qom-set", {"path": "/", "property": "p"}, "any-missing"),
]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qsd_schema(qemu_source: Path) -> Schema:
    return load_schema(str(qemu_source / "storage-daemon" / "qapi" / "qapi-schema.json"))


@pytest.fixture(scope="module")
def conn(qsd: QsdProcess) -> Any:
    with qsd.connect() as connection:
        yield connection


def _ask(conn: QmpConnection, text: str) -> dict[str, Any]:
    """Send one message as raw JSON text and return QSD's reply, events set aside."""
    conn.stream.write(text.encode() + b"\n")
    conn.stream.flush()
    while True:
        reply = conn.receive()
        if "event" not in reply:
            return reply


def _command(schema: Schema, name: str) -> Command:
    command = schema.lookup(name)
    assert isinstance(command, Command), name
    return command


def _ours(schema: Schema, command: str, arguments: dict[str, Any]) -> str | None:
    try:
        compile_command(_command(schema, command), QSD_DEFINES)(arguments)
    except ArgumentError as error:
        return error.desc
    return None


def _theirs(conn: QmpConnection, command: str, arguments: dict[str, Any]) -> str:
    reply = conn.execute(command, arguments)
    assert "error" in reply, f"QSD ran {command} {arguments}: {reply}"
    assert reply["error"]["class"] == "GenericError", reply
    desc: str = reply["error"]["desc"]
    return desc


# -- differential tests --------------------------------------------------------------------


def test_defines_match_qsd(conn: QmpConnection, qsd_schema: Schema) -> None:
    """QSD_DEFINES: each enum and object with conditional parts looks in QSD's introspection
    exactly as our schema does under these conditions (type names are masked there, so the
    comparison is by value and member lists)."""
    listed = conn.execute("query-qmp-schema")["return"]
    enums = {tuple(e["values"]) for e in listed if e["meta-type"] == "enum"}
    objects = {tuple(m["name"] for m in e["members"]) for e in listed if e["meta-type"] == "object"}
    compared = 0
    for typ in qsd_schema.types():
        if isinstance(typ, EnumType) and any(v.cond.present for v in typ.values):
            values = tuple(v.name for v in typ.values if v.cond.holds(QSD_DEFINES))
            assert values in enums, typ.name
            compared += 1
        if isinstance(typ, ObjectType) and any(m.cond.present for m in typ.local_members):
            members = tuple(m.name for m in typ.members if m.cond.holds(QSD_DEFINES))
            assert members in objects, typ.name
            compared += 1
    assert compared >= 10


@pytest.mark.parametrize(("command", "arguments"), CASES)
def test_same_error_as_qsd(
    conn: QmpConnection, qsd_schema: Schema, command: str, arguments: dict[str, Any]
) -> None:
    ours = _ours(qsd_schema, command, arguments)
    # Every case must fail in the visitor; never send QSD a call it would run.
    assert ours is not None, f"{command} {arguments} was accepted: the case must fail"
    assert ours == _theirs(conn, command, arguments)


def _nested_blockdev(depth: int) -> tuple[str, dict[str, Any]]:
    """blockdev-add with DEPTH raw nodes stacked on a bad null-co node, as text and as data
    (built without recursion: json.dumps would overflow the stack)."""
    leaf = '{"driver": "null-co", "zz": 1}'
    text = '{"driver": "raw", "file": ' * depth + leaf + "}" * depth
    value: dict[str, Any] = {"driver": "null-co", "zz": 1}
    for _ in range(depth):
        value = {"driver": "raw", "file": value}
    arguments = {"driver": "raw", "node-name": "n", "file": value}
    message = (
        '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "n", '
        f'"file": {text}}}}}'
    )
    return message, arguments


@pytest.mark.parametrize("depth", [1, 50, 1021])
def test_deep_recursive_type(conn: QmpConnection, qsd_schema: Schema, depth: int) -> None:
    """1021 is the deepest QEMU's parser accepts here (nesting limit 1024), far beyond
    Python's recursion limit: the checker must not recurse per level."""
    message, arguments = _nested_blockdev(depth)
    ours = _ours(qsd_schema, "blockdev-add", arguments)
    assert ours == "Parameter '" + "file." * (depth + 1) + "zz' is unexpected"
    assert ours == _ask(conn, message)["error"]["desc"]


def test_deep_any(conn: QmpConnection, qsd_schema: Schema) -> None:
    depth = 1000
    value: Any = 5
    for _ in range(depth):
        value = [value]
    arguments = {"path": "/", "property": "p", "value": value, "zz": 1}
    ours = _ours(qsd_schema, "qom-set", arguments)
    message = (
        '{"execute": "qom-set", "arguments": {"path": "/", "property": "p", "zz": 1, "value": '
        + "[" * depth + "5" + "]" * depth + "}}"
    )
    assert ours == "Parameter 'zz' is unexpected" == _ask(conn, message)["error"]["desc"]


def test_which_unexpected_member_is_named(conn: QmpConnection, qsd_schema: Schema) -> None:
    """QEMU names the first leftover key of its hash table, not of the input: random key sets,
    with and without visited members, nested, with resizes (up to 80 keys), must all agree."""
    rng = random.Random(20240607)
    alphabet = string.ascii_letters + string.digits + "-_.é€"
    mismatches = []
    for _ in range(300):
        keys: set[str] = set()
        count = rng.choice([2, 3, 4, 5, 7, 8, 9, 12, 16, 25, 40, 80])
        while len(keys) < count:
            keys.add("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))))
        extra: list[tuple[str, object]] = [
            (k, 1) for k in sorted(keys) if k not in ("device", "speed", "path")
        ]
        rng.shuffle(extra)
        shape = rng.choice(["none", "members", "nested"])
        arguments: dict[str, Any]
        if shape == "none":
            command, arguments = "query-jobs", dict(extra)
        elif shape == "members":
            items = list(extra)
            items.insert(rng.randint(0, len(items)), ("device", "d"))
            items.insert(rng.randint(0, len(items)), ("speed", 1))
            command, arguments = "block-job-set-speed", dict(items)
        else:
            items = list(extra)
            items.insert(rng.randint(0, len(items)), ("path", "/x"))
            data = dict(items)
            command, arguments = "nbd-server-start", {"addr": {"type": "unix", "data": data}}
        ours = _ours(qsd_schema, command, arguments)
        theirs = _theirs(conn, command, arguments)
        if ours != theirs:
            mismatches.append((command, arguments, ours, theirs))
    assert not mismatches, mismatches[:3]


_JUNK: list[Any] = [
    None, True, 0, -1, 1.5, 2**63, 2**64, -(2**63) - 1, 70000, 256, -129, 2**31, 2**32,
    "", "x", "bogus", [], {}, [1], {"a": 1},
]


def _random_value(typ: Type, rng: random.Random, depth: int) -> Any:
    """A value for TYP that is mostly well-formed, with junk, gaps and strays mixed in."""
    if rng.random() < 0.08 or depth > 4:
        return rng.choice(_JUNK)
    if isinstance(typ, BuiltinType):
        scalars: dict[str, list[Any]] = {
            "str": ["a", ""], "bool": [True, False], "null": [None], "any": _JUNK,
            "number": [1, 1.5],
        }
        return rng.choice(scalars.get(typ.name, [0, 5, 300, -1, 2**40]))
    if isinstance(typ, EnumType):
        values = [v.name for v in typ.values if v.cond.holds(QSD_DEFINES)]
        return rng.choice(values) if rng.random() < 0.9 else "bogus"
    if isinstance(typ, ArrayType):
        return [_random_value(typ.element, rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if isinstance(typ, AlternateType):
        return _random_value(rng.choice(typ.variants.variants).type, rng, depth)
    assert isinstance(typ, ObjectType)
    members = list(typ.members)
    out: dict[str, Any] = {}
    if typ.variants is not None:
        branch = rng.choice([v for v in typ.variants.variants if v.cond.holds(QSD_DEFINES)])
        assert isinstance(branch.type, ObjectType)
        members += branch.type.members
        out[typ.variants.tag_member.name] = branch.name
    for member in members:
        if member.cond.holds(QSD_DEFINES) and rng.random() < (0.4 if member.optional else 0.97):
            out[member.name] = _random_value(member.type, rng, depth + 1)
    if rng.random() < 0.05:
        out[rng.choice(["zz", "", "y"])] = 1
    items = list(out.items())
    rng.shuffle(items)
    return dict(items)


def test_random_arguments_match_qsd(conn: QmpConnection, qsd_schema: Schema) -> None:
    """Arguments generated from the schema for every command, each with a trailing 'zz' so that
    none runs: the first error must be the same."""
    rng = random.Random(7)
    commands = [c for c in qsd_schema.commands() if c.arg_type is not None]
    mismatches = []
    for _ in range(600):
        command = rng.choice(commands)
        assert command.arg_type is not None
        arguments = _random_value(command.arg_type, rng, 0)
        arguments = {**(arguments if isinstance(arguments, dict) else {}), "zz": 1}
        ours = _ours(qsd_schema, command.name, arguments)
        theirs = _theirs(conn, command.name, arguments)
        if ours != theirs:
            mismatches.append((command.name, arguments, ours, theirs))
    assert not mismatches, mismatches[:3]


# -- converted values ------------------------------------------------------------------------


def _convert(schema: Schema, command: str, arguments: dict[str, Any]) -> dict[str, object]:
    return compile_command(_command(schema, command), QSD_DEFINES)(arguments)


@pytest.fixture(scope="module")
def own_schema() -> Schema:
    return load_schema(str(SCHEMA))


def test_own_schema_conversions(own_schema: Schema) -> None:
    def run(command: str, arguments: dict[str, Any]) -> dict[str, object]:
        return compile_command(_command(own_schema, command), frozenset())(arguments)

    assert run("job-pause", {"id": "x"}) == {"id": "x"}
    assert run("qmp_capabilities", {"enable": ["oob"]}) == {"enable": ["oob"]}
    assert run("qmp_capabilities", {}) == {}
    assert run("query-jobs", {}) == {}
    with pytest.raises(ArgumentError) as error:
        run("query-jobs", {"x": 1})
    assert error.value.desc == "Parameter 'x' is unexpected"


def test_qsd_schema_conversions(qsd_schema: Schema) -> None:
    node = {"driver": "null-co", "node-name": "n", "size": 4096, "read-zeroes": True}
    assert _convert(qsd_schema, "blockdev-add", node) == node  # boxed: wire names
    raw = {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "/x"}}
    assert _convert(qsd_schema, "blockdev-add", raw) == raw
    qcow2 = {"driver": "qcow2", "node-name": "q", "file": "r", "backing": None}
    assert _convert(qsd_schema, "blockdev-add", qcow2) == qcow2
    wrapped = _convert(qsd_schema, "blockdev-add", {**node, "latency-ns": -1})  # uint64
    assert wrapped["latency-ns"] == 2**64 - 1
    mirror = {"job-id": "j", "device": "d", "target": "t", "sync": "full", "speed": 5}
    assert _convert(qsd_schema, "blockdev-mirror", mirror) == {
        "job_id": "j", "device": "d", "target": "t", "sync": "full", "speed": 5,
    }
    backup = {"job-id": "j", "device": "d", "target": "t", "sync": "full",
              "x-perf": {"max-chunk": 65536, "use-copy-range": False}}
    assert _convert(qsd_schema, "blockdev-backup", backup) == backup  # boxed: wire names
    options = {"driver": "file", "filename": "/x", "size": 1 << 20, "preallocation": "off"}
    assert _convert(qsd_schema, "blockdev-create", {"job-id": "j", "options": options}) == {
        "job_id": "j", "options": options,  # only the top level is renamed
    }
    addr = {"type": "inet", "data": {"host": "h", "port": "0", "to": 9}}
    assert _convert(qsd_schema, "nbd-server-start", {"addr": addr}) == {"addr": addr}
    value = {"deep": [{"x": None}]}
    converted = _convert(qsd_schema, "qom-set", {"path": "/", "property": "p", "value": value})
    assert converted["value"] is value  # any: passed through, not copied
    actions = [{"type": "abort", "data": {}}]
    assert _convert(qsd_schema, "transaction", {"actions": actions}) == {"actions": actions}
    assert _convert(qsd_schema, "query-jobs", {}) == {}


def test_checkers_share_compiled_types(qsd_schema: Schema) -> None:
    """Every command compiles, and compiling again reuses the recursive types."""
    for command in qsd_schema.commands():
        compile_command(command, QSD_DEFINES)
    first = compile_command(_command(qsd_schema, "blockdev-reopen"), QSD_DEFINES)
    again = compile_command(_command(qsd_schema, "blockdev-reopen"), QSD_DEFINES)
    args: dict[str, object] = {"options": [{"driver": "null-co", "node-name": "n"}]}
    assert first(args) == again(args) == args


# -- types QSD's input schema lacks: from QEMU's source, checked with a schema of our own ------

_SYNTHETIC = """
{ 'enum': 'Colour', 'data': [ 'red', { 'name': 'blue', 'if': 'HAVE_BLUE' } ] }
{ 'struct': 'Point', 'data': { 'x': 'int8', '*y': 'uint8' } }
{ 'alternate': 'NumOrPoint', 'data': { 'n': 'number', 'p': 'Point', 'b': 'bool' } }
{ 'alternate': 'IntOrNull', 'data': { 'i': 'int', 'n': 'null' } }
{ 'union': 'Shape', 'base': { 'kind': 'Colour', '*name': 'str' }, 'discriminator': 'kind',
  'data': { 'red': 'Point', 'blue': { 'type': 'Point', 'if': 'HAVE_BLUE' } } }
{ 'command': 'paint',
  'data': { 'a-b': 'int16', '*num': 'number', '*alt': 'NumOrPoint', '*nul': 'null',
            '*opt': 'IntOrNull', '*pts': [ 'Point' ], '*u8': 'uint8', '*i8': 'int8',
            '*blue-only': { 'type': 'str', 'if': 'HAVE_BLUE' }, '*colour': 'Colour' } }
{ 'command': 'draw', 'data': 'Shape', 'boxed': true }
"""


WRONG = "Invalid parameter type for "


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    path = tmp_path_factory.mktemp("schema") / "synthetic.json"
    path.write_text(_SYNTHETIC)
    return load_schema(str(path))


@pytest.mark.parametrize(
    ("defines", "command", "arguments", "expected"),
    [
        ((), "paint", {"a-b": 1, "num": 2}, {"a_b": 1, "num": 2.0}),
        ((), "paint", {"a-b": 1, "num": 10**400}, {"a_b": 1, "num": float("inf")}),
        ((), "paint", {"a-b": 1, "num": -(10**400)}, {"a_b": 1, "num": float("-inf")}),
        ((), "paint", {"a-b": 1, "num": 0.5}, {"a_b": 1, "num": 0.5}),
        ((), "paint", {"a-b": 1, "num": True}, WRONG + "'num', expected: number"),
        ((), "paint", {"a-b": 1, "alt": 3}, {"a_b": 1, "alt": 3.0}),
        ((), "paint", {"a-b": 1, "alt": True}, {"a_b": 1, "alt": True}),
        ((), "paint", {"a-b": 1, "alt": {"x": 1}}, {"a_b": 1, "alt": {"x": 1}}),
        ((), "paint", {"a-b": 1, "alt": {"x": 300}}, "Parameter 'x' expects int8_t"),
        ((), "paint", {"a-b": 1, "alt": {"y": 1}}, "Parameter 'alt.x' is missing"),
        ((), "paint", {"a-b": 1, "alt": "s"}, WRONG + "'alt', expected: NumOrPoint"),
        ((), "paint", {"a-b": 1, "alt": None}, WRONG + "'alt', expected: NumOrPoint"),
        ((), "paint", {"a-b": 1, "opt": None, "nul": None}, {"a_b": 1, "opt": None, "nul": None}),
        ((), "paint", {"a-b": 1, "opt": 1.5}, WRONG + "'opt', expected: integer"),
        ((), "paint", {"a-b": 1, "nul": 0}, WRONG + "'nul', expected: null"),
        ((), "paint", {"a-b": 2**15}, "Parameter 'a-b' expects int16_t"),
        ((), "paint", {"a-b": -(2**15)}, {"a_b": -(2**15)}),
        ((), "paint", {"a-b": 1, "i8": 128}, "Parameter 'i8' expects int8_t"),
        ((), "paint", {"a-b": 1, "i8": -129}, "Parameter 'i8' expects int8_t"),
        ((), "paint", {"a-b": 1, "i8": 2**63}, WRONG + "'i8', expected: integer"),
        ((), "paint", {"a-b": 1, "u8": 256}, "Parameter 'u8' expects uint8_t"),
        ((), "paint", {"a-b": 1, "u8": -1}, "Parameter 'u8' expects uint8_t"),
        ((), "paint", {"a-b": 1, "u8": 255}, {"a_b": 1, "u8": 255}),
        ((), "paint", {"a-b": 1, "pts": [{"x": 1}, {"x": 200}]}, "Parameter 'x' expects int8_t"),
        ((), "paint", {"a-b": 1, "pts": [{"x": 1, "y": 2}]}, {"a_b": 1, "pts": [{"x": 1, "y": 2}]}),
        ((), "paint", {"a-b": 1, "blue-only": "b"}, "Parameter 'blue-only' is unexpected"),
        (("HAVE_BLUE",), "paint", {"a-b": 1, "blue-only": "b"}, {"a_b": 1, "blue_only": "b"}),
        ((), "paint", {"a-b": 1, "colour": "blue"},
         "Parameter 'colour' does not accept value 'blue'"),
        (("HAVE_BLUE",), "paint", {"a-b": 1, "colour": "blue"}, {"a_b": 1, "colour": "blue"}),
        ((), "draw", {"kind": "red", "x": 1}, {"kind": "red", "x": 1}),
        ((), "draw", {"kind": "blue", "x": 1}, "Parameter 'kind' does not accept value 'blue'"),
        (("HAVE_BLUE",), "draw", {"kind": "blue", "x": 1, "name": "n"},
         {"kind": "blue", "name": "n", "x": 1}),
        ((), "draw", {"kind": "red"}, "Parameter 'x' is missing"),
    ],
)
def test_synthetic(
    synthetic: Schema, defines: tuple[str, ...], command: str, arguments: dict[str, Any],
    expected: dict[str, object] | str,
) -> None:
    check = compile_command(_command(synthetic, command), frozenset(defines))
    if isinstance(expected, str):
        with pytest.raises(ArgumentError) as error:
            check(arguments)
        assert error.value.desc == expected
    else:
        result = check(arguments)
        assert result == expected
        assert json.dumps(result, sort_keys=True) == json.dumps(expected, sort_keys=True)
