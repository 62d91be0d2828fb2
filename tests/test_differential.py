"""Differential conversations: the same bytes to qemu-storage-daemon 7.2 and to qmpjobd.

A conversation is a list of raw byte chunks a client sends.  The player sends each chunk, then a
sentinel command whose reply is known, and reads every message up to the sentinel's reply: that
is everything the chunk provoked, without sleeps or timeouts.  Before negotiation the sentinel is
`qmp_capabilities` with `"enable": [1]`, which fails on its argument and leaves the session
un-negotiated; once negotiated it is `query-jobs` (the job registry is empty on both daemons).
Transcripts are compared as parsed JSON (key order and number spelling ignored), with event
timestamps dropped and the version numbers replaced by a placeholder.

Left out on purpose:
- Commands QSD has and qmpjobd's schema does not (object-add, nbd-server-start, query-block,
  ...): qmpjobd answers "The command X has not been found" by design.
- Integers beyond 64 bits and numbers beyond the range of a double: QSD echoes them as doubles
  (or as the invalid JSON `inf`); qmpjobd keeps them exact or refuses them (docs/compat.md,
  "QMP framing"). The tests at the end of this module pin down both answers.
- Requests behind an in-band request in the same chunk when oob is enabled: which reply leaves
  first is a race inside QSD, so every exec-oob below is alone in its chunk.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.cli import SCHEMA_DEFINES
from qmpjobd.qapi import load_schema
from qmpjobd.qapi.tables import build_tables
from tests.conftest import SCHEMA, missing
from tests.daemons import QSD, DaemonProcess, QmpConnection, start_qmpjobd
from tests.schema_shape import SUBSETTED, own_names, shape, subset_paths

TABLES = build_tables(load_schema(str(SCHEMA)), SCHEMA_DEFINES)
# What QSD has too: every command and event but qmpjobd's own (schema/task.json).
OWN = own_names(TABLES.schema)

# -- the player --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    """A chunk sent without a sentinel: it leaves the parser inside a value (which a sentinel
    would become part of), so the next chunk must complete it."""

    data: bytes


@dataclass(frozen=True)
class Last:
    """A chunk after which the daemon closes the connection: read up to EOF, no sentinel."""

    data: bytes


@dataclass(frozen=True)
class EndOfInput:
    """A chunk followed by the end of the client's input (shutdown for writing): read up to EOF.
    Only for chunks that leave no message complete: QSD drops requests still queued at EOF."""

    data: bytes


Chunk = bytes | Hold | Last | EndOfInput
Conversation = Sequence[Chunk]
Transcript = list[list[Any]]

EOF = "<EOF>"
VERSION = "<version>"


@dataclass(frozen=True)
class Unparsable:
    """A line that is not JSON (QSD writes `inf` for 1e400)."""

    text: str


def greeting_sentinel(sentinel_id: str) -> bytes:
    """Fails with a parameter error whether or not the session is negotiated; changes nothing."""
    return message(
        {"execute": "qmp_capabilities", "arguments": {"enable": [1]}, "id": sentinel_id}
    )


def negotiated_sentinel(sentinel_id: str) -> bytes:
    return message({"execute": "query-jobs", "id": sentinel_id})


def message(value: object) -> bytes:
    """One JSON line; NULL anywhere in VALUE becomes null."""
    return json.dumps(value, default=_null).encode() + b"\n"


class _Null:
    """A JSON null where None means "leave the member out"."""


NULL = _Null()


def _null(value: object) -> None:
    if value is not NULL:
        raise TypeError(value)


def _is_version(value: object) -> bool:
    if not isinstance(value, dict) or set(value) != {"qemu", "package"}:
        return False
    triple = value["qemu"]
    return (
        isinstance(triple, dict)
        and set(triple) == {"major", "minor", "micro"}
        and all(type(n) is int for n in triple.values())
        and isinstance(value["package"], str)
    )


def normalize(value: Any) -> Any:
    """Drop what legitimately differs: version numbers, event timestamps."""
    if not isinstance(value, dict):
        return value
    value = dict(value)
    if "QMP" in value and isinstance(value["QMP"], dict):
        greeting = dict(value["QMP"])
        if _is_version(greeting.get("version")):
            greeting["version"] = VERSION
        value["QMP"] = greeting
    if "event" in value:
        value.pop("timestamp", None)
    if _is_version(value.get("return")):
        value["return"] = VERSION
    return value


class Player:
    """One client connection playing conversations chunk by chunk."""

    def __init__(self, path: Path) -> None:
        self.conn = QmpConnection(path, timeout=30.0)
        self.transcript: Transcript = [[self.conn.greeting]]
        self.negotiated = False
        self.sentinels = 0

    def close(self) -> None:
        self.conn.close()

    def send(self, data: bytes) -> None:
        self.conn.stream.write(data)
        self.conn.stream.flush()

    def receive(self) -> Any:
        """The next message, or EOF; a missing reply fails the test after the socket timeout
        (a hang is a bug, there is no waiting on purpose)."""
        try:
            line = self.conn.stream.readline()
        except TimeoutError:
            raise AssertionError(f"no reply; transcript so far: {self.transcript}") from None
        if not line:
            return EOF
        assert line.endswith(b"\r\n"), line
        try:
            return json.loads(line)
        except ValueError:
            return Unparsable(line.decode("ascii", "replace"))

    def play(self, chunk: Chunk) -> list[Any]:
        got: list[Any] = []
        self.transcript.append(got)
        if isinstance(chunk, Hold):
            self.send(chunk.data)
            return got
        if isinstance(chunk, Last | EndOfInput):
            self.send(chunk.data)
            if isinstance(chunk, EndOfInput):
                self.conn.sock.shutdown(socket.SHUT_WR)
            while (reply := self.receive()) != EOF:
                got.append(reply)
            got.append(EOF)
            return got
        self.sentinels += 1
        sentinel_id = f"sentinel-{self.sentinels}"
        sentinel = negotiated_sentinel if self.negotiated else greeting_sentinel
        self.send(chunk + sentinel(sentinel_id))
        while True:
            reply = self.receive()
            got.append(reply)
            if reply == EOF or (isinstance(reply, dict) and reply.get("id") == sentinel_id):
                return got
            # Before negotiation only qmp_capabilities can succeed, and it negotiates.
            if isinstance(reply, dict) and "return" in reply:
                self.negotiated = True


def play(daemon: DaemonProcess, conversation: Conversation) -> Transcript:
    """Play CONVERSATION on a new connection; the normalized transcript, one list per chunk
    (the greeting first)."""
    player = Player(daemon.socket_path)
    try:
        for chunk in conversation:
            player.play(chunk)
    finally:
        player.close()
    return [[normalize(m) for m in step] for step in player.transcript]


# -- the daemons -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """qmpjobd with its product schema, for the module's tests."""
    with start_qmpjobd(tmp_path_factory.mktemp("qmpjobd")) as daemon:
        yield daemon


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (1 == 1.0), but true is not 1.  Iterative, for
    values nested deeper than the recursion limit allows."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, bool) or isinstance(y, bool):
            if x is not y:
                return False
        elif isinstance(x, int | float) and isinstance(y, int | float):
            if x != y:
                return False
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif type(x) is not type(y) or x != y:
            return False
    return True


def assert_same(mine: Any, theirs: Any, context: str = "") -> None:
    if not same(mine, theirs):
        assert mine == theirs, context  # pytest's diff
        raise AssertionError(f"{context}: a boolean where the other has a number: "
                             f"{mine!r} != {theirs!r}")


def both(qsd: DaemonProcess, ours: DaemonProcess, conversation: Conversation) -> Transcript:
    """Play CONVERSATION on both; their transcripts must be equal.  Returns ours."""
    expected = play(qsd, conversation)
    got = play(ours, conversation)
    assert len(got) == len(expected)
    for step, (chunk, mine, theirs) in enumerate(
        zip([b"<greeting>", *conversation], got, expected, strict=True)
    ):
        assert_same(mine, theirs, f"chunk {step}: {chunk!r}")
    return got


# -- the conversations -------------------------------------------------------------------------


def ex(command: object, arguments: object = None, id: object = None, **extra: object) -> bytes:
    """A request line; `arguments`/`id` are left out when None (use NULL for JSON null)."""
    request: dict[str, object] = {"execute": command}
    if arguments is not None:
        request["arguments"] = arguments
    if id is not None:
        request["id"] = id
    request.update(extra)
    return message(request)


NEG = ex("qmp_capabilities")
NEG_OOB = ex("qmp_capabilities", {"enable": ["oob"]})
VERBS = ("pause", "resume", "cancel", "complete", "dismiss", "finalize")

CONVERSATIONS: list[Any] = []


def conv(name: str, *chunks: Chunk, xfail: str | None = None) -> None:
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    CONVERSATIONS.append(pytest.param(chunks, id=name, marks=marks))


# Negotiation.
conv("neg-plain", NEG)
conv("neg-with-id", ex("qmp_capabilities", id="n"))
conv("neg-empty-arguments", ex("qmp_capabilities", {}))
conv("neg-enable-empty", ex("qmp_capabilities", {"enable": []}, id=1))
conv("neg-enable-oob", NEG_OOB, ex("query-jobs", id=2))
conv("neg-enable-oob-twice", ex("qmp_capabilities", {"enable": ["oob", "oob"]}, id=1))
conv("neg-enable-bogus-then-plain", ex("qmp_capabilities", {"enable": ["bogus"]}, id=1), NEG)
conv("neg-enable-string", ex("qmp_capabilities", {"enable": "oob"}, id=1))
conv("neg-enable-null", ex("qmp_capabilities", {"enable": NULL}, id=1))
conv("neg-enable-object", ex("qmp_capabilities", {"enable": {"oob": True}}, id=1))
conv("neg-enable-nested", ex("qmp_capabilities", {"enable": [["oob"]]}, id=1))
conv("neg-enable-mixed", ex("qmp_capabilities", {"enable": ["oob", 1]}, id=1))
conv("neg-unexpected-argument", ex("qmp_capabilities", {"oob": True}, id=1))
conv("neg-arguments-null", ex("qmp_capabilities", NULL, id=1))
conv("neg-repeated", NEG, NEG, NEG_OOB, ex("qmp_capabilities", {"enable": ["bogus"]}))
conv("neg-oob-after-plain", NEG, NEG_OOB, message({"exec-oob": "query-jobs", "id": 1}))
conv(
    "before-negotiation",
    ex("query-jobs", id=1), ex("query-version", id=2), ex("job-pause", {"id": "j"}, id=3),
    ex("no-such-command", id=4), ex("quit", id=5), ex("query-commands", id=6),
    ex("job-pause", {"bogus": 1}, id=7), NEG, ex("query-jobs", id=8),
)
conv("before-negotiation-envelope-errors", b"[]\n", ex(1, id=1), b"{}\n", NEG)
conv("before-negotiation-exec-oob", message({"exec-oob": "qmp_capabilities", "id": 1}))
conv(
    "negotiate-and-query-in-one-chunk",
    b'{"execute": "qmp_capabilities", "id": 1}{"execute": "query-jobs", "id": 2}\n',
)

# Control commands (query-commands, query-qmp-schema and quit have tests of their own below).
conv("query-version", NEG, ex("query-version", id="v"), ex("query-version", {}))
conv("query-version-unexpected-argument", NEG, ex("query-version", {"verbose": True}, id=1))
conv("query-commands-unexpected-argument", NEG, ex("query-commands", {"x": 1}, id=1))
conv("query-qmp-schema-unexpected-argument", NEG, ex("query-qmp-schema", {"x": 1}, id=1))
conv("quit-unexpected-argument", NEG, ex("quit", {"now": True}, id=1), ex("query-jobs", id=2))
conv("unknown-command", NEG, ex("no-such-command", id=1), ex("query_jobs"), ex("Query-Jobs"))
conv("unknown-command-odd-names", NEG, ex(""), ex("qüery-jobs"), ex("query jobs\n"))

# Jobs on an empty registry.
conv("query-jobs", NEG, ex("query-jobs"), ex("query-jobs", {}, id=1))
conv("query-jobs-unexpected-argument", NEG, ex("query-jobs", {"id": "j"}, id=1))
for verb in VERBS:
    conv(
        f"job-{verb}-empty-registry", NEG,
        ex(f"job-{verb}", {"id": "j"}, id=1),
        ex(f"job-{verb}"),
        ex(f"job-{verb}", {}, id=2),
        ex(f"job-{verb}", {"id": "j", "extra": 1}, id=3),
        ex(f"job-{verb}", {"id": 1}, id=4),
        ex(f"job-{verb}", {"id": NULL}, id=5),
        ex(f"job-{verb}", NULL, id=6),
    )
conv(
    "job-pause-ill-typed-id", NEG,
    *(ex("job-pause", {"id": value}, id=n)
      for n, value in enumerate([1, 1.5, True, [], ["j"], {}, {"id": "j"}, 2**64, -(2**70)])),
    ex("job-pause", {"id": NULL}, id="null"),
)
conv("job-pause-odd-ids", NEG, *(ex("job-pause", {"id": v}) for v in ["", "1", "ü", "j" * 300]))
conv("job-pause-two-unexpected", NEG, ex("job-pause", {"id": "j", "a": 1, "b": 2, "c": 3}))
conv("job-pause-ill-typed-and-unexpected", NEG, ex("job-pause", {"id": 1, "x": 2}))
conv("job-pause-missing-and-unexpected", NEG, ex("job-pause", {"x": 2}))
conv(
    "job-pause-odd-parameter-names", NEG,
    ex("job-pause", {"id": "j", "": 1}), ex("job-pause", {"id": "j", "ïd": 1}),
    ex("job-pause", {"ID": "j"}), ex("job-pause", {"id": "j", "x": {"y": [1, {"z": []}]}}),
)
conv("job-cancel-has-no-force", NEG, ex("job-cancel", {"id": "j", "force": True}))

# The envelope.
conv(
    "envelope-not-an-object", NEG,
    b"[]\n", b'"query-jobs"\n', b"42\n", b"-1.5\n", b"true\n", b"null\n", b'["execute"]\n',
)
conv("envelope-empty-object", NEG, b"{}\n")
conv("envelope-only-id", NEG, message({"id": 1}))
conv("envelope-execute-not-a-string", NEG, *(ex(v, id=1) for v in [1, True, [], {}, 1.5]))
conv("envelope-execute-null", NEG, ex(NULL, id=1))
conv(
    "envelope-arguments-not-an-object", NEG,
    *(ex("query-jobs", v, id=1) for v in [[], NULL, "x", 1, True, [{}]]),
)
conv("envelope-unexpected-member", NEG, ex("query-jobs", id=1, foo=1), ex("query-jobs", control=1))
conv("envelope-exec-oob-without-oob", NEG, message({"exec-oob": "query-jobs", "id": 1}))
conv(
    "envelope-exec-oob-with-oob", NEG_OOB,
    message({"exec-oob": "query-jobs", "id": 1}),
    message({"exec-oob": "no-such-command", "id": 2}),
    message({"exec-oob": "qmp_capabilities", "id": 3}),
    message({"exec-oob": 1, "id": 4}),
    message({"exec-oob": "job-pause", "arguments": [], "id": 5}),
)
conv(
    "envelope-execute-and-exec-oob", NEG,
    message({"execute": "query-jobs", "exec-oob": "query-jobs", "id": 1}),
    message({"exec-oob": "query-jobs", "execute": "query-jobs", "id": 2}),
)
conv(
    "envelope-execute-and-exec-oob-with-oob", NEG_OOB,
    message({"execute": "query-jobs", "exec-oob": "query-jobs", "id": 1}),
    message({"exec-oob": "query-jobs", "execute": "query-jobs", "id": 2}),
)
conv(
    "envelope-two-problems", NEG,
    message({"execute": 1, "arguments": []}),
    message({"arguments": [], "execute": 1}),
    message({"arguments": [], "foo": 1}),
    message({"foo": 1, "bar": 2, "id": 3}),
    message({"execute": "query-jobs", "a": 1, "b": 2, "c": 3, "d": 4}),
    message({"execute": "no-such-command", "arguments": []}),
    message({"execute": "job-pause", "arguments": {"id": 1}, "x": 1}),
)
conv(
    "envelope-two-problems-before-negotiation",
    message({"execute": "query-jobs", "arguments": [], "id": 1}),
    message({"execute": "query-jobs", "foo": 1, "id": 2}),
)

# The id, echoed untouched.
IDS: list[tuple[str, object]] = [
    ("strings", ["", "x", "sentinel", " spaced ", 'quo"te', "back\\slash", "tab\tnew\nline"]),
    ("numbers", [0, 1, -1, 42, 2**31, -(2**31), 2**53 + 1]),
    ("floats", [1.5, -0.25, 1e-300, 1.7976931348623157e308, 1e22, 0.1, 5e-324]),
    ("int-valued-floats", [1.0, -0.0, 1e10, 2.0**70]),
    ("int64-uint64-edges", [2**63 - 1, -(2**63), 2**63, 2**64 - 1]),
    ("constants", [True, False, NULL]),
    ("containers", [[], {}, [1, [2, [3]]], {"a": {"b": [None, True, "c"]}}, [{}], {"": ""}]),
    ("unicode", ["é", "日本語", "😀", "\u00e9\u0301", "\u2028\ufeff", "\x7f"]),
]
for name, ids in IDS:
    assert isinstance(ids, list)
    conv(f"id-{name}", NEG, *(ex("query-jobs", id=v) for v in ids))
    conv(f"id-{name}-on-errors", NEG, *(ex("no-such-command", id=v) for v in ids))
conv("id-before-negotiation", *(ex("query-jobs", id=v) for v in ["x", 1, 1.5, [1], {"a": 1}]))
conv("id-deeply-nested", NEG, ex("query-jobs", id=[[[[[[[[[[{"a": [[[[[]]]]]}]]]]]]]]]]))
conv("id-nested-300", NEG, b'{"execute": "query-jobs", "id": ' + b"[" * 300 + b"]" * 300 + b"}\n")
# As deep as Python's json module (and == on the result) go under the default recursion limit.
conv("id-nested-900", NEG, b'{"execute": "query-jobs", "id": ' + b"[" * 900 + b"]" * 900 + b"}\n")
conv(
    "id-escaped-spellings", NEG,
    b'{"execute": "query-jobs", "id": "\\u00e9\\u00E9\\ud83d\\ude00"}\n',
    b'{"execute": "query-jobs", "id": "\\/\\b\\f\\n\\r\\t\\"\\\\"}\n',
    b'{"execute": "query-jobs", "id": "\xc3\xa9\xf0\x9f\x98\x80"}\n',
    b'{"execute": "query-jobs", "id": 1E2}\n',
    b'{"execute": "query-jobs", "id": -0}\n',
    b'{"execute": "query-jobs", "id": 0.5e-1}\n',
    b'{"execute": "query-jobs", "id": 1e-400}\n',
    b'{"execute": "query-jobs", "id": -1e-400}\n',
    b'{"execute": "query-jobs", "id": 0.000000000000000000000000000001}\n',
    b'{"execute": "query-jobs", "id": 123456789012345678901234567890.5}\n',
)

# Framing.
conv(
    "framing-several-objects-per-line", NEG,
    b'{"execute": "query-jobs", "id": 1}{"execute": "query-jobs", "id": 2} '
    b'{"execute": "no-such", "id": 3}\n',
)
conv(
    "framing-one-object-over-many-lines", NEG,
    b'{\n"execute"\n:\n"query-jobs"\n,\r\n"id"\n:\n\t1\n}\n',
)
conv(
    "framing-object-over-many-chunks", NEG,
    Hold(b'{"execute":'), Hold(b' "query-'), Hold(b'jobs", "id": '), b"7}\n",
)
conv(
    "framing-single-quoted", NEG,
    b"{'execute': 'query-jobs', 'id': 'single'}\n",
    b"{'execute': 'query-jobs', 'id': 'say \"hi\"'}\n",
    b"{'execute': 'query-jobs', 'id': 'it\\'s'}\n",
    b'{"execute": "query-jobs", "id": "it\\\'s"}\n',
    b"{'execute': 'query-jobs', 'id': 'it''s'}\n",
)
conv(
    "framing-unicode-escapes", NEG,
    b'{"\\u0065xecute": "query-\\u006Aobs", "id": 1}\n',
    b'{"execute": "query-jobs", "id": "\\u0000"}\n',
    b'{"execute": "query-jobs", "id": "\\u12"}\n',
    b'{"execute": "query-jobs", "id": "\\uzzzz"}\n',
    b'{"execute": "query-jobs", "id": "\\x41"}\n',
    b'{"execute": "query-jobs", "id": "\\uFFFF\\uFDD0"}\n',
)
conv(
    "framing-control-character-reset", NEG,
    b'{"execute": "query-jobs", \x1b{"execute": "query-jobs", "id": 2}\n',
    b'{"execute": "query-jobs", "id": "abc\x1b{"execute": "query-jobs", "id": 3}\n',
    b"\x1b\x1b\n",
    b'\x00{"execute": "query-jobs", "id": 4}\n',
    b'{"execute": "query-jobs", \xff{"execute": "query-jobs", "id": 5}\n',
)
conv(
    "framing-stray-characters", NEG,
    b"@\n", b"#!\n", b'{"execute": @}\n', b'{"execute": "query-jobs", "id": 1}x\n',
    b"<>\n", b'{"execute": "query-jobs" "id": 1}\n', b"\xfe\n",
)
conv(
    "framing-bad-keywords", NEG,
    b"tru\n", b"True\n", b"nul\n", b'{"execute": "query-jobs", "id": undefined}\n',
    b'{"execute": "query-jobs", "id": falsey}\n', b"nan\n", b"NaN\n",
)
conv(
    "framing-bad-numbers", NEG,
    *(b'{"execute": "query-jobs", "id": ' + n + b"}\n"
      for n in [b"01", b"1.", b"-", b"+1", b"1e", b".5", b"1e+", b"0x10", b"--1"]),
)
conv(
    "framing-unbalanced", NEG,
    b"}\n", b"]\n", b'{"execute": "query-jobs"}}\n', b"[}\n", b"{]\n",
    b'{"execute": "query-jobs", "id": [1}]\n',
    Hold(b'{"execute": "query-jobs", "id": [1, 2'), b"]}\n",
)
conv(
    "framing-separators", NEG,
    b'{"execute": "query-jobs",}\n', b'{"execute" "query-jobs"}\n',
    b'{"execute": "query-jobs" , , "id": 1}\n', b'{"execute": "query-jobs", "id": [1,]}\n',
    b'{: "query-jobs"}\n', b'{"execute":: "query-jobs"}\n', b"{1: 2}\n",
)
conv(
    "framing-duplicate-keys", NEG,
    b'{"execute": "query-jobs", "execute": "query-jobs"}\n',
    b'{"execute": "query-jobs", "id": 1, "id": 2}\n',
    b'{"execute": "job-pause", "arguments": {"id": "a", "id": "b"}}\n',
    b'{"execute": "query-jobs", "id": {"a": 1, "a": 1}}\n',
)
conv(
    "framing-lone-surrogates", NEG,
    b'{"execute": "query-jobs", "id": "\\ud800"}\n',
    b'{"execute": "query-jobs", "id": "\\udc00"}\n',
    b'{"execute": "query-jobs", "id": "\\ud800x"}\n',
    b'{"execute": "query-jobs", "id": "\\ud800\\u0041"}\n',
    b'{"execute": "query-jobs", "id": "\\ude00\\ud83d"}\n',
)
conv(
    "framing-invalid-utf8", NEG,
    b'{"execute": "query-jobs", "id": "\xc3\x28"}\n',
    b'{"execute": "query-jobs", "id": "\xc0\xaf"}\n',
    b'{"execute": "query-jobs", "id": "\xed\xa0\x80"}\n',
    b'{"execute": "query-jobs", "id": "\xf4\x90\x80\x80"}\n',
    b'{"execute": "query-jobs", "id": "\x80"}\n',
)
conv("framing-blank-lines", NEG, b"\n\n\r\n  \t \n", b"", b'\n{"execute": "query-jobs"}\n\n')
conv(
    "framing-trailing-garbage", NEG,
    b'{"execute": "query-jobs", "id": 1} garbage\n',
    b'{"execute": "query-jobs", "id": 2} 123\n',
    b'{"execute": "query-jobs", "id": 3} "str"\n',
    b'{"execute": "query-jobs", "id": 4}]\n',
)
conv("framing-nesting-limit", NEG, b"[" * 1025 + b"\n", b"{" * 1025 + b"\n")
conv("framing-crlf-and-tabs", NEG, b'\t{"execute":\t"query-jobs",\r\n"id":\t1}\r\n')
conv("framing-nesting-at-the-limit", NEG, b"[" * 1024 + b"]" * 1024 + b"\n")
conv(
    "framing-many-requests-in-one-chunk", NEG,
    b"".join(ex("query-jobs", id=n) for n in range(50)),
    b"".join([b"@", ex("query-jobs", id="a"), b"}", ex("no-such", id="b"), b"tru\n"] * 10),
)
conv(
    "framing-many-requests-in-one-chunk-with-oob", NEG_OOB,
    b"".join(ex("query-jobs", id=n) for n in range(50)),
    b"".join([b"@", ex("query-jobs", id="a"), b"}", ex("no-such", id="b"), b"tru\n"] * 10),
)
conv("framing-big-message", NEG, ex("query-jobs", id="x" * (1 << 17)))
conv("framing-split-everywhere", NEG, *(Hold(bytes([b])) for b in ex("query-jobs", id=1)), b"")
conv(
    "framing-raw-bytes-in-strings", NEG,
    b'{"execute": "query-jobs", "id": "a\tb"}\n',
    b'{"execute": "query-jobs", "id": "a\nb"}\n',
    b'{"execute": "query-jobs", "id": "\x7f\x80\xfd"}\n',
    b'{"execute": "query-jobs", "id": "\xfe"}\n',
    b'{"execute": "query-jobs", "id": \'\t\'}\n',
)
conv(
    "framing-odd-bytes-between-values", NEG,
    b'\xef\xbb\xbf{"execute": "query-jobs", "id": "bom"}\n',
    b'\x0c{"execute": "query-jobs", "id": "ff"}\n',
    b'\x0b\x7f{"execute": "query-jobs", "id": "vt"}\n',
    b'%d{"execute": "query-jobs", "id": "percent"}\n',
    b'{"execute": "query-jobs", "id": %s}\n',
    b'\x80\xc3\xa9{"execute": "query-jobs", "id": "high"}\n',
)
conv(
    "framing-recovery", NEG,
    b'{"a": {"b": @}}\n', b'{"execute": "query-jobs", "id": [@]}\n',
    b'@@@ x y z {"execute": "query-jobs", "id": 1}\n', b'@ "a" : , [1]\n',
)
conv("end-of-input-pending-number", NEG, EndOfInput(b"123"))
conv("end-of-input-pending-keyword", NEG, EndOfInput(b"tru"))
conv("end-of-input-mid-object", NEG, EndOfInput(b'{"execute": "query-jobs", "id": [1,'))
conv("end-of-input-mid-string", NEG, EndOfInput(b'{"execute": "query-jobs", "id": "ab'))
conv("end-of-input-before-negotiation", EndOfInput(b"{'execute'"))
conv("framing-before-negotiation", b"}\n", b"tru\n", b"@\n", b"{'execute': 'query-jobs'}\n")


@pytest.mark.parametrize("name", ["qsd", "ours"])
def test_the_sentinels_leave_the_session_alone(
    qsd: DaemonProcess, ours: DaemonProcess, name: str
) -> None:
    """The player's premise, on QSD first: before negotiation the greeting sentinel fails on its
    argument and the session stays un-negotiated; after it, the same.  query-jobs answers []."""
    daemon = qsd if name == "qsd" else ours
    conn = QmpConnection(daemon.socket_path)
    try:
        bad_enable = {"error": {
            "class": "GenericError",
            "desc": "Invalid parameter type for 'enable[0]', expected: string"}}
        for _ in range(2):
            conn.send({"execute": "qmp_capabilities", "arguments": {"enable": [1]}, "id": "s"})
            assert conn.receive() == {**bad_enable, "id": "s"}
        assert conn.execute("query-jobs") == {"error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
        assert conn.execute("qmp_capabilities") == {"return": {}}
        conn.send({"execute": "qmp_capabilities", "arguments": {"enable": [1]}, "id": "s"})
        assert conn.receive() == {**bad_enable, "id": "s"}
        assert conn.execute("query-jobs") == {"return": []}
    finally:
        conn.close()


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_conversation(qsd: DaemonProcess, ours: DaemonProcess, conversation: Conversation) -> None:
    both(qsd, ours, conversation)


# -- conversations that end the daemon ---------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """A QSD and a qmpjobd for one test (quit ends them)."""
    if shutil.which(QSD[0]) is None:
        missing("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
    with DaemonProcess.start(tmp_path) as qsd, start_qmpjobd(tmp_path) as ours:
        yield qsd, ours


def unterminated(request: bytes) -> bytes:
    """REQUEST without its newline.  QSD's monitor reads one byte at a time while it may take
    input, and none while a request is queued without oob: a newline after `quit` stays unread,
    and a Unix socket closed with unread input resets the connection instead of an EOF.  A
    closing brace ends a message by itself."""
    return request.rstrip(b"\n")


@pytest.mark.parametrize(
    "conversation",
    [
        pytest.param((NEG, Last(unterminated(ex("quit")))), id="quit"),
        pytest.param((NEG, Last(unterminated(ex("quit", {}, id="bye")))), id="quit-with-id"),
        pytest.param((NEG_OOB, Last(unterminated(ex("quit", id=[1])))), id="quit-with-oob"),
    ],
)
def test_quit(fresh: tuple[DaemonProcess, DaemonProcess], conversation: Conversation) -> None:
    qsd, ours = fresh
    assert both(qsd, ours, conversation)[-1][-1] == EOF
    for daemon in fresh:
        daemon.wait()  # both have exited
    assert not ours.socket_path.exists()


# -- replies compared by structure -------------------------------------------------------------


def ask(daemon: DaemonProcess, command: str) -> Any:
    with daemon.connect() as conn:
        reply = conn.execute(command)
    assert "return" in reply, reply
    return reply["return"]


@pytest.fixture(scope="module")
def qsd_schema(qsd: DaemonProcess) -> list[dict[str, Any]]:
    schema: list[dict[str, Any]] = ask(qsd, "query-qmp-schema")
    return schema


@pytest.fixture(scope="module")
def our_schema(ours: DaemonProcess) -> list[dict[str, Any]]:
    schema: list[dict[str, Any]] = ask(ours, "query-qmp-schema")
    return schema


def test_query_commands_names(qsd: DaemonProcess, ours: DaemonProcess) -> None:
    theirs = [c["name"] for c in ask(qsd, "query-commands")]
    mine = [c["name"] for c in ask(ours, "query-commands")]
    assert sorted(mine) == sorted(TABLES.commands)
    assert set(mine) - OWN <= set(theirs), set(mine) - OWN - set(theirs)


def test_query_commands_order_is_qsds_restricted_to_ours(
    qsd: DaemonProcess, ours: DaemonProcess
) -> None:
    theirs = [c["name"] for c in ask(qsd, "query-commands")]
    mine = [c["name"] for c in ask(ours, "query-commands") if c["name"] not in OWN]
    assert mine == [name for name in theirs if name in set(mine)]


def test_query_commands_entries(qsd: DaemonProcess, ours: DaemonProcess) -> None:
    """Each entry has the same members on both (just `name` in 7.2)."""
    theirs = {c["name"]: c for c in ask(qsd, "query-commands")}
    for entry in ask(ours, "query-commands"):
        if entry["name"] not in OWN:
            assert_same(entry, theirs[entry["name"]])


@pytest.mark.parametrize(
    "name",
    # The commands of SUBSETTED (blockdev-add, blockdev-create, transaction) take a subset of
    # QSD's drivers or actions by design: the next test compares them branch by branch.
    [name for name in [*TABLES.commands, *TABLES.events]
     if name not in SUBSETTED and name not in OWN],
)
def test_schema_entry_has_qsds_shape(
    qsd_schema: list[dict[str, Any]], our_schema: list[dict[str, Any]], name: str
) -> None:
    assert_same(shape(our_schema, name), shape(qsd_schema, name))


@pytest.mark.parametrize("name", sorted(SUBSETTED))
def test_subsetted_entry_has_qsds_branches(
    qsd_schema: list[dict[str, Any]], our_schema: list[dict[str, Any]], name: str
) -> None:
    """Each driver or action we have is described exactly as QSD describes it, and enum values
    and union branches are left out only where SUBSETTED says."""
    assert name in TABLES.commands
    assert subset_paths(shape(our_schema, name), shape(qsd_schema, name)) == SUBSETTED[name]


def test_schema_entries_are_ours(our_schema: list[dict[str, Any]]) -> None:
    assert our_schema == TABLES.schema_info
    metas = {e["meta-type"] for e in our_schema}
    named = {e["name"] for e in our_schema if e["meta-type"] in ("command", "event")}
    assert named == set(TABLES.commands) | set(TABLES.events)
    assert {"command", "event", "object", "builtin"} <= metas


# -- where qmpjobd deliberately differs (docs/compat.md) ---------------------------------------


def test_big_integer_ids_are_echoed_exactly(qsd: DaemonProcess, ours: DaemonProcess) -> None:
    """Integers beyond 64 bits: QSD echoes a double (`inf` beyond a double's range), qmpjobd the
    integer it was given."""
    ids = [2**64, -(2**63) - 1, 10**30, -(10**40), 2**1000, 10**400, -(10**4299)]
    conversation = [NEG, *(ex("query-jobs", id=v) for v in ids)]
    theirs = [step[0] for step in play(qsd, conversation)[2:]]
    mine = [step[0] for step in play(ours, conversation)[2:]]
    assert mine == [{"return": [], "id": v} for v in ids]
    for value, reply in zip(ids, theirs, strict=True):
        if abs(value) < 2**1024:
            assert reply == {"return": [], "id": float(value)}
            assert type(reply["id"]) is float
        else:
            sign = "-" if value < 0 else ""
            assert reply == Unparsable(f'{{"return": [], "id": {sign}inf}}\r\n')


@pytest.mark.parametrize(
    ("text", "qsd_says"),
    [
        pytest.param(b'{"execute": "query-jobs", "id": 1e400}', None, id="id"),
        pytest.param(b'{"execute": "query-jobs", "id": -1e400}', None, id="negative-id"),
        pytest.param(b'{"execute": "query-jobs", "id": 1' + b"0" * 400 + b".5}", None,
                     id="long-mantissa-id"),
        pytest.param(b'{"execute": "query-jobs", "id": ' + b"9" * 4301 + b"}", None,
                     id="integer-of-4301-digits"),
        pytest.param(b'{"execute": "query-jobs", "id": 1e400x}',
                     "JSON parse error, expected separator in dict", id="then-a-syntax-error"),
        pytest.param(b'{"execute": "query-jobs", "id": [1e400,]}',
                     "JSON parse error, expecting value", id="then-a-trailing-comma"),
        pytest.param(b'{"execute": 1e400}', "QMP input member 'execute' must be a string",
                     id="execute"),
        pytest.param(b'{"execute": "query-jobs", "bogus": 1e400}',
                     "QMP input member 'bogus' is unexpected", id="unexpected-member"),
        pytest.param(b"1e400", "QMP input must be a JSON object", id="not-an-object"),
        pytest.param(b'{"execute": "job-pause", "arguments": {"id": 1e400}}',
                     "Invalid parameter type for 'id', expected: string", id="argument"),
    ],
)
def test_infinite_numbers_are_a_parse_error(
    qsd: DaemonProcess, ours: DaemonProcess, text: bytes, qsd_says: str | None
) -> None:
    """Numbers that QSD turns into an infinite double: QSD goes on (and echoes an id as the
    invalid JSON `inf`); qmpjobd refuses the message at the number, whatever else is wrong
    with it (docs/compat.md, "QMP framing")."""
    conversation = [NEG, text + b"\n"]
    theirs = play(qsd, conversation)[2][0]
    mine = play(ours, conversation)[2][0]
    if qsd_says is None:
        assert isinstance(theirs, Unparsable)
        assert re.fullmatch(r'\{"return": \[\], "id": -?inf\}\r\n', theirs.text)
    else:
        assert theirs == {"error": {"class": "GenericError", "desc": qsd_says}}
    assert mine == {
        "error": {"class": "GenericError", "desc": "JSON parse error, number out of range"}
    }
