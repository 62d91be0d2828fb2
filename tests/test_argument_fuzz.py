"""Every command's arguments, fuzzed from the daemon's own schema, against a live qmpjobd.

The schema comes from the daemon (`query-qmp-schema`); from it each command gets a valid base
argument object, and from that (a) a deterministic table of the nastiest cases per member (every
wrong JSON type, integers at and beyond every sized integer's bounds, floats for integers, a 1 MiB
string, a lone surrogate, wrong enum values, nesting hundreds deep, exactly at QMP's limit of
1024 and one over it, unknown keys, missing members, arguments that are not an object) and
(b) hypothesis-generated argument objects mixing valid and hostile values, with a fixed budget.

Before the fuzzing the daemon holds a baseline state: null-co nodes, file and raw nodes over real
files in the test's directory (which is also the daemon's working directory, so that a relative
file name lands there), a backup at speed 1 that stays running, and a concluded backup (auto-dismiss
off).  Every case is pipelined with query-jobs, query-block-jobs and query-named-block-nodes, and
checked: exactly one well-formed reply carries the case's id (a message the JSON layer refuses gets
id-less errors instead), no desc shows Python internals, the daemon answers the queries on the same
connection.  A rejected command must leave the queries' replies, the directory's listing (names,
sizes, mtimes) and the event stream as they were.  A command that succeeds is recorded; if it
changed the state, the state is torn down (jobs cancelled and dismissed, nodes deleted, files
rewritten) and the baseline is built again.

A deterministic sample of the argument-checking errors is sent to a live qemu-storage-daemon too:
same class, same desc.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import re
from collections.abc import Iterator
from contextlib import chdir
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpjobd.qapi import load_schema
from tests.conftest import SCHEMA
from tests.daemons import QMPJOBD, DaemonProcess, QmpConnection, daemon_env
from tests.schema_shape import own_names

MiB = 1 << 20
WAIT = 30.0
NESTING_LIMIT = 1024  # QEMU's JSON parser: an object or array nested deeper is refused

# Texts that only Python (not QEMU) would put in an error message.
PYTHON_TELLS = re.compile(
    r"Traceback|Error\(|Exception|object has no attribute|NoneType|not subscriptable|"
    r"unsupported operand|positional argument|keyword argument|object is not|"
    r"unhashable|invalid literal|\bself\b|__\w+__|\.py\b|line \d+"
)

# The argument checker's messages (qapi/visit.py): errors QSD must give word for word.
# qmpjobd's own commands (schema/task.json), which QSD does not have.
OWN = own_names(load_schema(str(SCHEMA)))
ARGUMENT_ERRORS = re.compile(
    r"^(Invalid parameter type for '[^']*', expected: \w+"
    r"|Parameter '[^']*' (is missing|is unexpected|does not accept value '.*'"
    r"|expects u?int(8|16|32|64)(_t)?)"
    r"|QMP input member 'arguments' must be an object)$",
    re.S,
)

# -- values ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text put into a message as it is: nesting too deep for json.dumps, and JSON that
    Python's encoder cannot write."""

    text: str


def deep_list(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


def deep_dict(depth: int) -> Raw:
    return Raw('{"a":' * (depth - 1) + "{}" + "}" * (depth - 1))


def dumps(message: object) -> bytes:
    """MESSAGE as one line of ASCII JSON (lone surrogates as \\uD800), Raw parts spliced in."""
    raws: list[str] = []

    def mark(value: object) -> object:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(message), separators=(",", ":"))
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000raw{i}\\u0000"', raw, 1)
    return text.encode("ascii") + b"\n"


SAMPLES: dict[str, object] = {
    "string": "fuzz", "int": 7, "number": 0.5, "boolean": True, "null": None,
    "object": {}, "array": [],
}
# Integers at and beyond the bounds of every sized integer type (all are 'int' in the
# introspection), and floats where integers are wanted.
NASTY_INTS: list[object] = [
    -1, 0, 128, -129, 256, 32768, -32769, 65536, 2**31, -(2**31) - 1, 2**32, 2**53 + 1,
    2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 10**40,
    1.0, -0.0, 0.5, 1e300, -1e300,
]
HUGE = "x" * MiB
BIG = "y" * (64 * 1024)  # qmpjobd's lexer takes some 0.35 s per MiB: 1 MiB only now and then
LONE_SURROGATE = "\ud800"
NASTY_STRINGS: list[object] = [BIG, "", "\x00", "\u00e9\u20ac\U0001f600", "a" * 4096, "#block1",
                               LONE_SURROGATE]


def contains_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(contains_lone_surrogate(k) or contains_lone_surrogate(v)
                   for k, v in value.items())
    if isinstance(value, list):
        return any(contains_lone_surrogate(v) for v in value)
    return False


# -- the schema, as the daemon describes it ----------------------------------------------------


@dataclass
class Member:
    name: str
    type: str
    optional: bool


class Schema:
    """query-qmp-schema's SchemaInfo list, with what the generators need."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.types = {e["name"]: e for e in entries if e["meta-type"] not in ("command", "event")}
        self.commands = {e["name"]: e["arg-type"] for e in entries if e["meta-type"] == "command"}

    def meta(self, typ: str) -> str:
        return str(self.types[typ]["meta-type"])

    def members(self, typ: str, tag_value: str | None = None) -> list[Member]:
        """An object type's members; for a union, the base's and TAG_VALUE's branch's."""
        info = self.types[typ]
        out = [Member(m["name"], m["type"], "default" in m) for m in info["members"]]
        if tag_value is not None:
            for variant in info.get("variants", []):
                if variant["case"] == tag_value:
                    out += self.members(variant["type"])
        return out

    def json_types(self, typ: str) -> set[str]:
        """The JSON types a value of TYP may have."""
        info = self.types[typ]
        meta = info["meta-type"]
        if meta == "builtin":
            jt = info["json-type"]
            if jt == "value":
                return set(SAMPLES)
            return {"int", "number"} if jt == "number" else {jt}
        if meta == "enum":
            return {"string"}
        if meta == "object":
            return {"object"}
        if meta == "array":
            return {"array"}
        assert meta == "alternate"
        return set().union(*(self.json_types(m["type"]) for m in info["members"]))

    def valid(self, typ: str, depth: int = 0) -> object:
        """A plain value of TYP: required members only, first enum values, scalar branches."""
        info = self.types[typ]
        meta = info["meta-type"]
        if meta == "builtin":
            return {"str": "fuzz-none", "int": 0, "number": 0.0, "bool": False, "null": None,
                    "any": {}}[typ]
        if meta == "enum":
            return info["values"][0]
        if meta == "array":
            return [] if depth > 2 else [self.valid(info["element-type"], depth + 1)]
        if meta == "alternate":
            branches = [m["type"] for m in info["members"]]
            scalar = [b for b in branches if self.meta(b) != "object"]
            return self.valid((scalar or branches)[0], depth + 1)
        out: dict[str, object] = {}
        tag = info.get("tag")
        tag_value = None
        if tag is not None:
            tag_value = self.valid_tag(typ)
        for m in self.members(typ, tag_value):
            if m.name == tag:
                out[m.name] = tag_value
            elif not m.optional:
                out[m.name] = self.valid(m.type, depth + 1)
        return out

    def valid_tag(self, typ: str) -> str:
        info = self.types[typ]
        tag_member = next(m for m in info["members"] if m["name"] == info["tag"])
        values: list[str] = self.types[tag_member["type"]]["values"]
        # null-co: a branch whose required members are few and harmless.
        return "null-co" if "null-co" in values else values[0]


# -- cases -------------------------------------------------------------------------------------

Path_ = tuple[str | int, ...]


@dataclass
class Case:
    command: str
    arguments: object  # usually a dict; anything for "arguments not an object"
    label: str
    omit_arguments: bool = False

    def message(self, ident: object) -> dict[str, object]:
        msg: dict[str, object] = {"execute": self.command}
        if not self.omit_arguments:
            msg["arguments"] = self.arguments
        msg["id"] = ident
        return msg

    @property
    def framing_reject(self) -> bool:
        """The JSON layer refuses the message: id-less errors, no command."""
        return contains_lone_surrogate(self.arguments) or "over the nesting limit" in self.label


def set_at(value: object, path: Path_, new: object) -> object:
    out = copy.deepcopy(value)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return out


def delete_at(value: object, path: Path_) -> object:
    out = copy.deepcopy(value)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return out


def mutation_points(
    schema: Schema, typ: str, value: object, path: Path_, depth: int = 0
) -> Iterator[tuple[Path_, Member, dict[str, object]]]:
    """(path, member, the containing object) for each member of each object reachable in VALUE,
    optional members included; into nested objects and first list elements, 3 levels deep."""
    meta = schema.meta(typ)
    if depth > 3:
        return
    if meta == "array" and isinstance(value, list) and value:
        element = schema.types[typ]["element-type"]
        yield from mutation_points(schema, element, value[0], (*path, 0), depth + 1)
    if meta != "object" or not isinstance(value, dict):
        return
    info = schema.types[typ]
    tag = info.get("tag")
    for m in schema.members(typ, value.get(tag) if tag else None):
        yield (*path, m.name), m, value
        if m.name in value:
            yield from mutation_points(schema, m.type, value[m.name], (*path, m.name), depth + 1)


def nasty_values(schema: Schema, typ: str, depth_left: int) -> list[tuple[str, object]]:
    """The table's values for a member of type TYP at nesting DEPTH_LEFT below the limit."""
    admitted = schema.json_types(typ)
    out: list[tuple[str, object]] = [
        (f"wrong type {jt}", sample) for jt, sample in SAMPLES.items() if jt not in admitted
    ]
    if "int" in admitted:
        out += [(f"int {v!r}", v) for v in NASTY_INTS]
    if "string" in admitted:
        out += [(f"string {v[:12]!r}", v) for v in NASTY_STRINGS if isinstance(v, str)]
    info = schema.types[typ]
    if info["meta-type"] == "enum":
        first = info["values"][0]
        out += [("enum no-such-value", "no-such-value"), ("enum upper", first.upper()),
                ("enum padded", f" {first}"), ("enum surrogate", first + LONE_SURROGATE)]
    if "object" in admitted:
        out += [("object unknown key", {"fuzz-unknown": 1})]
    if "array" in admitted:
        out += [("array of wrong", [None, {}]), ("array nested", [[[]]])]
    out += [
        ("deep list 300", deep_list(300)),
        ("deep dict 300", deep_dict(300)),
        ("deep list at the nesting limit", deep_list(depth_left)),
    ]
    return out


def table(schema: Schema) -> list[Case]:
    """The deterministic cases, for every command but quit."""
    cases: list[Case] = []
    for index, (command, arg_type) in enumerate(schema.commands.items()):
        if command == "quit":
            continue
        base = schema.valid(arg_type)
        assert isinstance(base, dict)
        cases += [
            Case(command, base, "valid base"),
            Case(command, {}, "empty object"),
            Case(command, None, "no arguments", omit_arguments=True),
            Case(command, {**base, "fuzz-unknown": 1}, "unknown key"),
            Case(command, {**base, "fuzz-unknown": 1, "fuzz-unknown-2": None}, "two unknown keys"),
            Case(command, {**base, LONE_SURROGATE: 1}, "lone surrogate key"),
            Case(command, {**base, BIG: 1}, "big key"),
            Case(command, {**base, "deep": deep_list(NESTING_LIMIT - 1)},
                 "deep value over the nesting limit"),
        ]
        cases += [Case(command, wrong, f"arguments {wrong!r}")
                  for wrong in ([], [base], "str", 1, 1.5, True, None)]
        # A 1 MiB string in the first string member of every third command (qmpjobd's lexer
        # takes some 0.35 s per MiB; 64 KiB strings everywhere else).
        huge_done = index % 3 != 0
        unknown_done: set[Path_] = set()
        for path, member, parent in mutation_points(schema, arg_type, base, ()):
            where = ".".join(map(str, path))
            # The message is an object (1), arguments (2), then one level per path element.
            depth_left = NESTING_LIMIT - 2 - (len(path) - 1)
            if member.name in parent and not member.optional:
                cases.append(Case(command, delete_at(base, path), f"{where}: missing"))
            if path[:-1] not in unknown_done:  # one unknown key in each object
                unknown_done.add(path[:-1])
                cases.append(Case(command, set_at(base, (*path[:-1], "fuzz-unknown"), 0),
                                  f"{where}: unknown sibling"))
            for label, value in nasty_values(schema, member.type, depth_left):
                cases.append(Case(command, set_at(base, path, value), f"{where}: {label}"))
            if not huge_done and "string" in schema.json_types(member.type):
                huge_done = True
                cases.append(Case(command, set_at(base, path, HUGE), f"{where}: 1 MiB string"))
    return cases


# -- the daemon and its state ------------------------------------------------------------------

FILES = {"disk.img": 4 * MiB, "target.img": 4 * MiB, "small.img": 64 * 1024}
# Names worth hitting: the baseline's nodes and jobs (fuzzed strings are drawn from these too).
NODES = ["null-src", "null-tgt", "null-src2", "null-tgt2", "null-spare", "file0", "raw0", "file1"]
JOBS = ["job-run", "job-done", "job-create"]


@dataclass
class Fuzzer:
    conn: QmpConnection
    files: Path
    baseline: tuple[object, ...] = ()
    counter: itertools.count[int] = field(default_factory=itertools.count)
    sent: int = 0
    rejected: int = 0
    succeeded: list[str] = field(default_factory=list)
    rebuilds: int = 0
    # The table's replies, by case index (test_table fills it; the QSD comparison reads it).
    table_replies: dict[int, dict[str, Any] | None] = field(default_factory=dict)

    # -- talking -------------------------------------------------------------------------------

    def call(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.conn.execute(command, arguments)
        assert "error" not in reply, (command, arguments, reply)
        return reply

    def wait_status(self, job: str, status: str) -> None:
        """Until query-jobs shows JOB in STATUS; waits for an event between looks."""
        while True:
            jobs = {j["id"]: j["status"] for j in self.call("query-jobs")["return"]}
            if jobs.get(job) == status:
                return
            self.conn.events.append(self.conn.receive(timeout=WAIT))

    def send_case(self, case: Case) -> tuple[dict[str, Any] | None, list[dict[str, Any]],
                                             tuple[object, ...]]:
        """Send CASE with the three state queries pipelined behind it; check the invariants
        that hold for every case. Returns the case's reply (None for a message the JSON layer
        refused), the id-less errors, and the state the queries show."""
        n = next(self.counter)
        ident = f"fuzz-{n}"
        queries = ["query-jobs", "query-block-jobs", "query-named-block-nodes"]
        data = dumps(case.message(ident)) + b"".join(
            dumps({"execute": q, "id": f"{ident}-{q}"}) for q in queries
        )
        self.conn.stream.write(data)
        self.conn.stream.flush()
        self.sent += 1
        replies: list[dict[str, Any]] = []
        answers: dict[str, Any] = {}
        events_before = len(self.conn.events)
        while len(answers) < len(queries):
            try:
                message = self.conn.receive(timeout=WAIT)
            except (TimeoutError, ConnectionError) as exc:
                raise AssertionError(f"{case.command} {case.label}: no reply ({exc!r})") from exc
            if "event" in message:
                self.conn.events.append(message)
                continue
            check_well_formed(message, case)
            if message.get("id", "").startswith(f"{ident}-"):
                assert "return" in message, (case.label, message)
                answers[message["id"]] = message["return"]
            else:
                assert not answers, f"{case.label}: reply after the queries' {message}"
                replies.append(message)
        ours = [r for r in replies if r.get("id") == ident]
        stray = [r for r in replies if "id" in r and r["id"] != ident]
        assert not stray, f"{case.command} {case.label}: replies with other ids {stray}"
        idless = [r for r in replies if "id" not in r]
        if case.framing_reject:
            assert not ours and idless, (case.command, case.label, replies)
            assert all("error" in r for r in idless), (case.label, idless)
        else:
            assert len(ours) == 1 and not idless, (case.command, case.label, replies)
        state = (*(answers[f"{ident}-{q}"] for q in queries), self.listing())
        reply = ours[0] if ours else None
        if reply is None or "error" in reply:
            self.rejected += 1
            new_events = self.conn.events[events_before:]
            assert state == self.baseline, (
                f"{case.command} {case.label}: rejected ({reply}) but the state changed"
            )
            assert not new_events, (case.command, case.label, new_events)
        elif state != self.baseline:
            self.succeeded.append(f"{case.command}: {case.label}")
            self.rebuild()
        return reply, idless, state

    # -- state ---------------------------------------------------------------------------------

    def listing(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for root, dirs, names in os.walk(self.files):
            for name in dirs + names:
                st_ = os.lstat(os.path.join(root, name))
                out.append((os.path.join(root, name), st_.st_size, st_.st_mtime_ns))
        return tuple(sorted(out))

    def snapshot(self) -> tuple[object, ...]:
        return (self.call("query-jobs")["return"], self.call("query-block-jobs")["return"],
                self.call("query-named-block-nodes")["return"], self.listing())

    def build(self) -> None:
        for name, size in FILES.items():
            path = self.files / name
            with open(path, "wb") as f:
                f.write(bytes(range(256)) * (min(size, MiB) // 256))
                f.truncate(size)
        for name, size in [("null-src", 4 * MiB), ("null-tgt", 4 * MiB), ("null-src2", MiB),
                           ("null-tgt2", MiB), ("null-spare", MiB)]:
            self.call("blockdev-add", {"driver": "null-co", "node-name": name, "size": size})
        self.call("blockdev-add", {"driver": "file", "node-name": "file0",
                                   "filename": str(self.files / "disk.img")})
        self.call("blockdev-add", {"driver": "raw", "node-name": "raw0", "file": "file0"})
        self.call("blockdev-add", {"driver": "file", "node-name": "file1", "read-only": True,
                                   "filename": str(self.files / "small.img")})
        self.call("blockdev-backup", {"job-id": "job-done", "device": "null-src2",
                                      "target": "null-tgt2", "sync": "full",
                                      "auto-dismiss": False})
        self.wait_status("job-done", "concluded")
        # A job that is not a block job (blockdev-create's), concluded: it waits for a dismiss.
        self.call("blockdev-create", {"job-id": "job-create", "options": {
            "driver": "file", "filename": str(self.files / "created.img"), "size": MiB}})
        self.wait_status("job-create", "concluded")
        # Speed 1: the first chunk goes at once, the next is due in hours.
        self.call("blockdev-backup", {"job-id": "job-run", "device": "null-src",
                                      "target": "null-tgt", "sync": "full", "speed": 1})
        self.wait_status("job-run", "running")
        while self.call("query-jobs")["return"][0]["current-progress"] < MiB:
            self.conn.events.append(self.conn.receive(timeout=WAIT))
        self.conn.events.clear()
        self.baseline = self.snapshot()
        assert self.snapshot() == self.baseline  # nothing in it moves by itself

    def teardown(self) -> None:
        for _ in range(100):
            jobs = self.call("query-jobs")["return"]
            if all(j["status"] == "concluded" for j in jobs):
                for j in jobs:
                    self.call("job-dismiss", {"id": j["id"]})
                break
            for j in jobs:
                if j["status"] in ("running", "paused", "ready", "standby"):
                    self.conn.execute("block-job-cancel", {"device": j["id"], "force": True})
                elif j["status"] == "pending":
                    self.conn.execute("job-finalize", {"id": j["id"]})
            if any(j["status"] not in ("running", "paused", "ready", "standby", "pending",
                                       "concluded") for j in jobs):
                self.conn.events.append(self.conn.receive(timeout=WAIT))
        else:
            raise AssertionError("jobs would not go away")
        while nodes := self.call("query-named-block-nodes")["return"]:
            for node in nodes:
                self.conn.execute("blockdev-del", {"node-name": node["node-name"]})
            left = self.call("query-named-block-nodes")["return"]
            assert len(left) < len(nodes), f"nodes would not go away: {left}"
        for path in sorted(self.files.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        self.conn.events.clear()

    def rebuild(self) -> None:
        self.rebuilds += 1
        self.teardown()
        self.build()


def check_well_formed(message: dict[str, Any], case: Case) -> None:
    keys = set(message) - {"id"}
    assert keys in ({"return"}, {"error"}), (case.command, case.label, message)
    if "error" in message:
        error = message["error"]
        assert isinstance(error, dict) and set(error) == {"class", "desc"}, message
        assert isinstance(error["class"], str) and isinstance(error["desc"], str), message
        # What the client sent comes back quoted; the rest is the daemon's own words.
        own_words = re.sub(r"'[^']*'", "''", error["desc"])
        assert not PYTHON_TELLS.search(own_words), (case.command, case.label, message)
        assert not error["desc"].startswith("internal error"), (case.command, case.label,
                                                                message)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzer]:
    workdir = tmp_path_factory.mktemp("fuzz")
    files = workdir / "files"
    files.mkdir()
    # The daemon's working directory is FILES: a relative file name that gets through lands
    # where the listing sees it.
    with chdir(files), DaemonProcess.start(
        workdir, "--log", str(workdir / "qmpjobd.log"), program=QMPJOBD, env=daemon_env()
    ) as daemon, daemon.connect() as conn:
        conn.timeout = WAIT
        fz = Fuzzer(conn, files)
        fz.build()
        yield fz
        log = (workdir / "qmpjobd.log").read_text()
        assert "Traceback" not in log, log[log.index("Traceback"):][:4000]


@pytest.fixture(scope="module")
def schema(fuzzer: Fuzzer) -> Schema:
    return Schema(fuzzer.call("query-qmp-schema")["return"])


@pytest.fixture(scope="module")
def cases(schema: Schema) -> list[Case]:
    return table(schema)


# -- the tests ---------------------------------------------------------------------------------


def test_schema_is_covered(schema: Schema, cases: list[Case]) -> None:
    """Every command but quit has cases, and the table reaches nested members."""
    assert {c.command for c in cases} == set(schema.commands) - {"quit"}
    huge = {c.command for c in cases if c.label.endswith("1 MiB string")}
    assert len(huge) >= 5, huge
    labels = {c.label.split(":")[0] for c in cases if c.command == "blockdev-add"}
    assert "size" in labels and "node-name" in labels  # the null-co branch's and the base's
    assert any(c.label.startswith("actions.0.") for c in cases if c.command == "transaction")


def test_table(fuzzer: Fuzzer, cases: list[Case]) -> None:
    """The deterministic table: every case keeps the invariants."""
    run_table(fuzzer, cases)
    assert fuzzer.rejected > len(cases) * 0.9
    print(f"\ntable: {len(cases)} cases over {len({c.command for c in cases})} commands; "
          f"{fuzzer.rejected} rejected; state-changing successes ({fuzzer.rebuilds} rebuilds): "
          f"{fuzzer.succeeded}")


def run_table(fuzzer: Fuzzer, cases: list[Case]) -> dict[int, dict[str, Any] | None]:
    if not fuzzer.table_replies:
        for i, case in enumerate(cases):
            fuzzer.table_replies[i] = fuzzer.send_case(case)[0]
    return fuzzer.table_replies


def test_checks_can_fail(fuzzer: Fuzzer) -> None:
    """The invariants catch what they are meant to catch."""
    case = Case("job-pause", {"id": 1}, "self-test")
    bad: dict[str, Any]
    for bad in (
        {"error": {"class": "GenericError", "desc": "Traceback (most recent call last):"}},
        {"error": {"class": "GenericError", "desc": "'NoneType' object is not subscriptable"}},
        {"error": {"class": "GenericError", "desc": "internal error in job-pause; the log"}},
        {"error": {"class": "GenericError"}}, {"return": {}, "error": {}}, {"id": 1},
    ):
        with pytest.raises(AssertionError):
            check_well_formed(bad, case)
    check_well_formed({"error": {"class": "GenericError", "desc": "Job 'x.py' not found"}}, case)
    baseline = fuzzer.baseline
    fuzzer.baseline = (*baseline[:3], ())  # as if a file had appeared
    try:
        with pytest.raises(AssertionError, match=r"rejected .* but the state changed"):
            fuzzer.send_case(case)
    finally:
        fuzzer.baseline = baseline
    with pytest.raises(AssertionError):  # a reply where the JSON layer should refuse
        fuzzer.send_case(Case("job-pause", {"id": 1}, "deep value over the nesting limit"))


def test_regressions(fuzzer: Fuzzer) -> None:
    """Found by fuzzing: the block-job-* verbs on blockdev-create's job (not a block job) were
    internal errors (an assert in commands/block.py); QSD: DeviceNotActive, not found."""
    for command, key in [("block-job-set-speed", "device"), ("block-job-cancel", "device"),
                         ("block-job-pause", "device"), ("block-job-resume", "device"),
                         ("block-job-complete", "device"), ("block-job-finalize", "id"),
                         ("block-job-dismiss", "id")]:
        arguments: dict[str, object] = {key: "job-create"}
        if command == "block-job-set-speed":
            arguments["speed"] = 1
        reply, _, _ = fuzzer.send_case(Case(command, arguments, "regression"))
        assert reply is not None and reply["error"] == {
            "class": "DeviceNotActive", "desc": "Block job 'job-create' not found"}, reply


def test_long_node_name_refused(fuzzer: Fuzzer) -> None:
    """Found by the table: QEMU refuses a node name of 32 bytes or more ('Node name too long':
    its node names are at most 31 bytes); qmpjobd accepted even 1 MiB ones."""
    reply, _, _ = fuzzer.send_case(
        Case("blockdev-add", {"driver": "null-co", "node-name": "n" * 32}, "regression"))
    assert reply is not None
    assert reply.get("error") == {"class": "GenericError", "desc": "Node name too long"}


# -- hypothesis --------------------------------------------------------------------------------

SAFE_TEXT = st.text(max_size=24).filter(lambda s: not s.startswith("/") and ".." not in s)
NAMES = st.sampled_from([*NODES, *JOBS, "fuzz-none", "", *FILES])
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(NASTY_INTS),
    st.floats(allow_nan=False, allow_infinity=False), NAMES, SAFE_TEXT,
)
ANY_JSON = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SAFE_TEXT, inner, max_size=3),
    max_leaves=6,
)
HOSTILE = st.one_of(
    LEAF, ANY_JSON, st.sampled_from([BIG, LONE_SURROGATE, deep_list(500), deep_dict(500)]),
    st.integers(100, 900).map(deep_list),
)


def value_strategy(schema: Schema, typ: str, depth: int = 0) -> st.SearchStrategy[object]:
    """Mostly well-typed values of TYP, each place sometimes hostile."""
    info = schema.types[typ]
    meta = info["meta-type"]
    typed: st.SearchStrategy[object]
    if meta == "builtin":
        typed = {
            "str": NAMES | SAFE_TEXT, "int": st.integers() | st.sampled_from(NASTY_INTS),
            "number": st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
            "bool": st.booleans(), "null": st.none(), "any": ANY_JSON,
        }[typ]
    elif meta == "enum":
        typed = st.sampled_from([*info["values"], "no-such-value"])
    elif meta == "array":
        element = info["element-type"]
        typed = (st.just([]) if depth > 3
                 else st.lists(value_strategy(schema, element, depth + 1), max_size=2))
    elif meta == "alternate":
        typed = st.one_of(*(value_strategy(schema, m["type"], depth + 1)
                            for m in info["members"]))
    elif depth > 3:
        typed = st.just(schema.valid(typ, depth))
    else:
        typed = object_strategy(schema, typ, depth)
    return st.one_of(typed, typed, typed, HOSTILE)


def object_strategy(schema: Schema, typ: str, depth: int) -> st.SearchStrategy[object]:
    info = schema.types[typ]
    tag = info.get("tag")
    if tag is None:
        return _members_strategy(schema, schema.members(typ), depth)
    branches = [
        _members_strategy(schema, schema.members(typ, v["case"]), depth, (tag, v["case"]))
        for v in info["variants"]
    ]
    return st.one_of(*branches)


def _members_strategy(
    schema: Schema, members: list[Member], depth: int, fixed: tuple[str, str] | None = None
) -> st.SearchStrategy[object]:
    absent = object()

    def build(values: dict[str, object], extra: dict[str, object]) -> dict[str, object]:
        out = {k: v for k, v in values.items() if v is not absent}
        out.update(extra)
        return out

    parts: dict[str, st.SearchStrategy[object]] = {}
    for m in members:
        if fixed is not None and m.name == fixed[0]:
            parts[m.name] = st.just(fixed[1]) | value_strategy(schema, m.type, depth + 1)
            continue
        strategy = value_strategy(schema, m.type, depth + 1)
        # A required member is sometimes missing, an optional one often absent.
        parts[m.name] = (st.just(absent) | strategy | strategy) if m.optional else (
            strategy | strategy | strategy | st.just(absent))
    extra = st.dictionaries(st.sampled_from(["fuzz-unknown", "x", ""]) | SAFE_TEXT, LEAF,
                            max_size=1)
    return st.builds(build, st.fixed_dictionaries(parts), st.one_of(st.just({}), st.just({}),
                                                                     extra))


FUZZ_EXAMPLES = int(os.environ.get("QMPJOBD_FUZZ_EXAMPLES", "1200"))


def test_hypothesis(fuzzer: Fuzzer, schema: Schema) -> None:
    """Generated argument objects for every command: the invariants hold for each."""
    commands = sorted(set(schema.commands) - {"quit"})
    strategies = {c: object_strategy(schema, schema.commands[c], 0) for c in commands}
    case_st = st.sampled_from(commands).flatmap(
        lambda c: st.tuples(st.just(c), strategies[c] | HOSTILE.map(lambda v: v))
    )
    before = fuzzer.sent

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case_st)
    def run(command_and_arguments: tuple[str, object]) -> None:
        command, arguments = command_and_arguments
        fuzzer.send_case(Case(command, arguments, f"generated {arguments!r:.200}"))

    run()
    print(f"\nhypothesis: {fuzzer.sent - before} cases; state-changing successes "
          f"({fuzzer.rebuilds} rebuilds so far): {len(fuzzer.succeeded)}")


# -- against the reference ---------------------------------------------------------------------

# Argument errors qmpjobd gives where QSD does otherwise, each a bullet of docs/compat.md.
DOCUMENTED = [
    # "null-co with a negative size": QSD prints the message and aborts.
    "Parameter 'size' expects a non-negative number below 2^64",
]
QSD_SAMPLE = 200


def test_errors_match_qsd(fuzzer: Fuzzer, cases: list[Case], qsd: DaemonProcess) -> None:
    """A deterministic sample of the table's argument errors: QSD gives the same class and desc."""
    eligible: list[tuple[Case, dict[str, Any]]] = []
    replies = run_table(fuzzer, cases)
    for i, case in enumerate(cases):
        reply = replies[i]
        if reply is None:
            continue
        if "error" not in reply or not ARGUMENT_ERRORS.match(reply["error"]["desc"]):
            continue
        if any(d in reply["error"]["desc"] for d in DOCUMENTED):
            continue
        if len(dumps(case.arguments)) > 8192:
            continue  # QSD's lexer takes some 6 s per MiB of string
        if case.command in OWN:
            continue  # qmpjobd's own commands: QSD has none to compare with
        eligible.append((case, reply["error"]))
    rng = random.Random(7)
    sample = sorted(rng.sample(range(len(eligible)), min(QSD_SAMPLE, len(eligible))))
    differences = []
    with qsd.connect() as ref:
        for i in sample:
            case, ours = eligible[i]
            ref.stream.write(dumps(case.message(i)))
            ref.stream.flush()
            theirs = ref.receive(timeout=WAIT)
            while "event" in theirs:
                theirs = ref.receive(timeout=WAIT)
            assert theirs.get("id") == i, theirs
            if theirs.get("error") != ours:
                differences.append((case.command, case.label, ours, theirs))
    assert len(sample) == QSD_SAMPLE, len(eligible)
    assert not differences, differences
    commands = {eligible[i][0].command for i in sample}
    print(f"\nQSD: {len(sample)} of {len(eligible)} argument errors compared over "
          f"{len(commands)} commands: all equal")
