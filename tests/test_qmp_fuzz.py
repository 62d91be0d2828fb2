"""Property tests over the sans-IO protocol core (qmpjobd.qmp): framing and session together.

Whatever bytes arrive, however the socket cuts them:
- the splitter gives the same values and errors as for the input in one piece (and as its
  faithful path, fast=False), whether fed bytes, bytearrays or memoryviews;
- nothing raises out of feed/eof/accept/reply/error_reply/encode;
- every error is a well-formed QMP error, and every reply, error and event is one line of ASCII
  JSON ending in CRLF that a strict parser reads back as what was encoded (an `"id": 1e400` is
  an error, never the `inf` QEMU writes).

scripts/fuzz.py runs the same checks coverage-guided and against a live daemon; these keep a
derandomised sample of them in the ordinary suite (a few seconds).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpjobd.qmp.errors import QmpError
from qmpjobd.qmp.framing import FramingError, JsonSplitter
from qmpjobd.qmp.session import NO_ID, Request, Session

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
)
ERROR_CLASSES = {"GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound"}


# -- helpers -----------------------------------------------------------------------------------


def same(a: object, b: object) -> bool:
    """Equal type for type (1 is not 1.0 nor True, -0.0 is not 0.0, key order counts);
    iterative, so that values nested 1024 deep compare."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict) and isinstance(y, dict):
            if list(x) != list(y):
                return False
            stack.extend(zip(x.values(), y.values(), strict=True))
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, float) and isinstance(y, float):
            if x.hex() != y.hex():
                return False
        elif x != y:
            return False
    return True


def _refuse(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def strict_json(line: bytes) -> Any:
    """Parse as strictly as orjson (RFC 8259), exactly (big integers stay integers).  orjson
    stops at depth 1024 and at integers beyond a double; there the stdlib parser, with NaN and
    Infinity refused, stands in."""
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError as error:
        if "depth limit" not in str(error) and "infinity" not in str(error):
            raise AssertionError(f"invalid JSON ({error}): {line[:200]!r}") from None
    return json.loads(line, parse_constant=_refuse)


def one_message(data: bytes, *, pretty: bool = False) -> dict[str, Any]:
    assert data.endswith(b"\r\n"), data[-40:]
    assert data.isascii(), data[:200]
    if not pretty:
        assert b"\n" not in data[:-2] and b"\r" not in data[:-2], data[:200]
    message = strict_json(data)
    assert type(message) is dict, message
    return message


def check_error(message: dict[str, Any]) -> None:
    assert set(message) <= {"error", "id"}, message
    error = message["error"]
    assert type(error) is dict and set(error) == {"class", "desc"}, message
    assert error["class"] in ERROR_CLASSES, message
    assert type(error["desc"]) is str and error["desc"], message


def feed_all(pieces: list[bytes | bytearray | memoryview], **options: Any) -> list[object]:
    splitter = JsonSplitter(**options)
    out: list[object] = []
    for piece in pieces:
        out += splitter.feed(piece)  # type: ignore[arg-type]  # (any buffer)
    assert splitter.eof() == []
    assert splitter.buffered == 0
    return out


def cut(data: bytes, cuts: list[int], kind: type = bytes) -> list[bytes | bytearray | memoryview]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [kind(data[a:b]) for a, b in itertools.pairwise(bounds)]


def session(*, pretty: bool = False, offer_oob: bool = True) -> Session:
    return Session(version=(7, 2, 0), package="fuzz", offer_oob=offer_oob, pretty=pretty)


class AnyCommand(Mapping[str, bool]):
    """A command table where every name is a command (none out of band), so that arbitrary
    input reaches the stand-in dispatcher once negotiated."""

    def __getitem__(self, name: str) -> bool:
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def converse(items: list[object], *, pretty: bool = False) -> None:
    """Run ITEMS through a session whose stand-in dispatcher echoes each request's arguments
    back (so that every parsed value is also encoded), checking every message written."""
    s = Session(version=(7, 2, 0), package="fuzz", pretty=pretty, commands=AnyCommand())
    greeting = one_message(s.greeting(), pretty=pretty)
    assert set(greeting) == {"QMP"}
    for item in items:
        s.queues(item)
        request = s.receive(item)
        sent_id = item.get("id", NO_ID) if type(item) is dict else NO_ID
        if isinstance(request, bytes):
            message = one_message(request, pretty=pretty)
            check_error(message)
        else:
            assert type(request) is Request and type(request.arguments) is dict
            expected: object = None
            try:
                if request.command == "qmp_capabilities":
                    enable = request.arguments.get("enable", [])
                    if type(enable) is not list or not all(type(c) is str for c in enable):
                        raise QmpError("GenericError", "Invalid parameter type")
                    s.negotiate(enable)
                    expected = {}
                elif not s.negotiated:
                    raise AssertionError(f"{request.command} admitted before negotiation")
                elif len(request.command) % 2:
                    raise QmpError("GenericError", request.command)  # input text in an error
                else:
                    expected = {"echo": request.arguments}
                    event = one_message(
                        s.encode({"event": "X", "data": request.arguments,
                                  "timestamp": {"seconds": 0, "microseconds": 0}}),
                        pretty=pretty,
                    )
                    assert same(event["data"], request.arguments)
                out = s.reply(request, expected)
            except QmpError as error:
                out = s.error_reply(request.id, error)
                expected = None
            message = one_message(out, pretty=pretty)
            if expected is None:
                check_error(message)
            else:
                assert set(message) <= {"return", "id"}, message
                assert same(message["return"], expected)
        if sent_id is NO_ID:
            assert "id" not in message, message
        else:
            assert same(message["id"], sent_id) or message["id"] == sent_id, message


def check_everything(data: bytes, cuts: list[int], kind: type, pretty: bool) -> None:
    whole = feed_all([data])
    assert same(feed_all(cut(data, cuts, kind)), whole)
    assert same(feed_all([data], fast=False), whole)
    small = {"max_token_size": 48, "max_token_count": 24, "max_nesting": 3}
    assert same(feed_all(cut(data, cuts, kind), **small), feed_all([data], **small))
    assert same(feed_all([data], fast=False, **small), feed_all([data], **small))
    for item in whole:
        if type(item) is FramingError:
            assert type(item.desc) is str and item.desc
    converse(whole, pretty=pretty)


# -- strategies --------------------------------------------------------------------------------

_atoms = st.sampled_from(
    [
        b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b"\r\n", b"\t", b"\x00", b"\x1b",
        b"\x7f", b"\xff", b"\xfe", b"'", b'"', b"\\", b"true", b"false", b"null", b"tru",
        b"1e400", b"-1e400", b"0e5", b"1.5", b"-0", b"01", b"1" + b"0" * 30, b"9" * 4301,
        b'"\\ud800"', b'"\\udc00"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'"\\uffff"', b'"\\u12"',
        b'"\xc0\x80"', b'"\xed\xa0\x80"', b'"\xc3\xa9"', b'"\\x"', b"'\\''",
        b'"execute"', b'"exec-oob"', b'"arguments"', b'"id"', b'"qmp_capabilities"',
        b'"enable"', b'["oob"]', b'"query-jobs"', b'{"execute": "qmp_capabilities"}',
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}',
    ]
)
_near_json_noise = st.lists(_atoms | st.binary(max_size=4), max_size=40).map(b"".join)

_keys = st.sampled_from(['"execute"', '"exec-oob"', '"arguments"', '"id"', '"a"', "'a'",
                         '"\\u0061"', '"\\ud800"', '"k\\"q"', "1", "null"])
_scalars = st.sampled_from(
    ['"query-jobs"', '"qmp_capabilities"', '"x"', "'single'", '"\\ud83d\\ude00"', '"\\ud800"',
     '"\\u00e9\\n\\t"', '"\u00e9\U0001f600"', "1e400", "-1e400", "1e308", "5e-324", "-0.0",
     "18446744073709551616", "-" + "9" * 400, "0", "-0", "1.0", "true", "false", "null", "nul",
     '"\\/"', '"\x01"', "[]", "{}"]
)
_near_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(st.tuples(_keys, inner), max_size=4).map(
            lambda pairs: "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
        )
        | st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]")
    ),
    max_leaves=12,
)
_messages = st.lists(
    st.tuples(_near_json, st.sampled_from(["\n", "\r\n", "", " ", "\x1b", "}"]),
              st.integers(0, 3)),
    max_size=6,
).map(
    # Some messages are truncated: the rest of the stream must recover the same way in pieces.
    lambda parts: "".join(
        (text[: len(text) * 2 // 3] if trunc == 0 else text) + sep for text, sep, trunc in parts
    ).encode("utf-8", "surrogatepass")
)


def _deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + b"1" + closer * depth


_deep_inputs = st.sampled_from(
    [
        b'{"execute": "qmp_capabilities"}{"execute": "x", "arguments": {"a": '
        + _deep(1022, b"[", b"]") + b"}}",
        _deep(1024, b"[", b"]"),
        _deep(1025, b"[", b"]"),
        b'{"execute": "qmp_capabilities"}{"execute": "xy", "arguments": '
        + _deep(1023, b'{"a": ', b"}") + b"}",
    ]
)
_cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=8)
_kinds = st.sampled_from([bytes, bytearray, memoryview])


# -- the properties ----------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=200), cuts=_cuts, kind=_kinds, pretty=st.booleans())
def test_arbitrary_bytes(data: bytes, cuts: list[int], kind: type, pretty: bool) -> None:
    check_everything(data, cuts, kind, pretty)


@FUZZ
@given(data=_near_json_noise, cuts=_cuts, kind=_kinds, pretty=st.booleans())
def test_near_json_noise(data: bytes, cuts: list[int], kind: type, pretty: bool) -> None:
    check_everything(data, cuts, kind, pretty)


@FUZZ
@given(
    data=_messages, cuts=_cuts, kind=_kinds, pretty=st.booleans(),
    prefix=st.sampled_from([b"", b'{"execute": "qmp_capabilities"}',
                            b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}']),
)
def test_structured_messages(
    data: bytes, cuts: list[int], kind: type, pretty: bool, prefix: bytes
) -> None:
    check_everything(prefix + data, cuts, kind, pretty)


@settings(FUZZ, max_examples=12)
@given(data=_deep_inputs, cuts=_cuts, pretty=st.booleans())
def test_deep_nesting(data: bytes, cuts: list[int], pretty: bool) -> None:
    check_everything(data, cuts, bytes, pretty)


@FUZZ
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**500),
                                                            max_value=10**500)
    | st.floats() | st.text(),  # NaN, infinities, lone surrogates: whatever a handler returns
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
), pretty=st.booleans(), request_id=st.sampled_from([NO_ID, 1, None, "x", 10**400, [1.5]]))
def test_reply_always_encodes_valid_json(value: object, pretty: bool, request_id: object) -> None:
    """Whatever a handler returns, the reply is valid JSON: non-finite floats become null (QEMU
    would write `inf`), big integers stay exact.  Lone surrogates cannot be written as UTF-8
    text: the reply must still be one ASCII JSON line (escaped), whatever parsers make of it."""
    s = session(pretty=pretty)
    data = s.reply(Request("x", {}, request_id, False), value)
    assert data.endswith(b"\r\n") and data.isascii()
    has_surrogate = "\\ud8" in data.decode().lower() or "\\udc" in data.decode().lower()
    message = (
        json.loads(data, parse_constant=_refuse) if has_surrogate
        else one_message(data, pretty=pretty)
    )
    assert set(message) == ({"return"} if request_id is NO_ID else {"return", "id"})


@pytest.mark.parametrize(
    "text",
    [b"1e400", b"-1e400", b"1" + b"0" * 400, b"-" + b"9" * 4300, b"1e-400", b"[1e400]"],
)
@pytest.mark.parametrize("pretty", [False, True])
def test_extreme_ids(text: bytes, pretty: bool) -> None:
    """QEMU answers `"id": 1e400` with invalid JSON (`inf`); here it is an error without id
    (the number is out of range), and integers of any length come back exactly."""
    data = b'{"execute": "qmp_capabilities"}{"execute": "query-jobs", "id": ' + text + b"}"
    items = feed_all([data])
    converse(items, pretty=pretty)
    request = session().accept(items[1])
    if isinstance(request, bytes):
        message = one_message(request)
        check_error(message)
        assert "id" not in message and "number out of range" in message["error"]["desc"]
    else:
        message = one_message(session(pretty=pretty).reply(request, {}), pretty=pretty)
        assert message["id"] == request.id
