"""QMP output encoding (qmpjobd.qmp.encode): one message, ASCII JSON, CRLF."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpjobd.qmp.encode import encode, encode_pretty
from qmpjobd.qmp.framing import JsonSplitter
from tests.conftest import missing
from tests.daemons import QsdProcess


def test_compact_with_crlf() -> None:
    assert encode({"return": {}}) == b'{"return":{}}\r\n'
    assert encode({"return": [], "id": "x"}) == b'{"return":[],"id":"x"}\r\n'
    assert encode(("a", 1, 1.5, True, False, None)) == b'["a",1,1.5,true,false,null]\r\n'


def test_non_ascii_is_escaped_as_qemu_does() -> None:
    assert encode({"a": "é"}) == b'{"a":"\\u00E9"}\r\n'
    assert encode("😀") == b'"\\uD83D\\uDE00"\r\n'  # a surrogate pair beyond U+FFFF
    # Once off orjson's path, every string is escaped the way QEMU's writer does it.
    assert encode(["é", '\x7f\x1b\n\t"\\/']) == b'["\\u00E9","\\u007F\\u001B\\n\\t\\"\\\\/"]\r\n'


def test_integers_of_any_size_are_exact() -> None:
    assert encode({"id": 2**64}) == b'{"id":18446744073709551616}\r\n'
    assert encode({"id": -(2**63) - 1}) == b'{"id":-9223372036854775809}\r\n'
    assert encode([10**300, "é"]) == b"[1" + b"0" * 300 + b',"\\u00E9"]\r\n'


def test_floats() -> None:
    assert encode([1.0, -0.0, 1e100, 0.1]) == b"[1.0,-0.0,1e+100,0.1]\r\n"
    assert json.loads(encode([1.0, -0.0, 1e100, 0.1, "é"])) == [1.0, -0.0, 1e100, 0.1, "é"]
    # Not JSON at all: written as null on both paths (QEMU would write invalid JSON).
    nonfinite = [float("inf"), float("-inf"), float("nan")]
    assert encode(nonfinite) == b"[null,null,null]\r\n"
    assert encode([*nonfinite, "é"]) == b'[null,null,null,"\\u00E9"]\r\n'


def test_deep_nesting_beyond_orjson() -> None:
    depth = 5000
    value: object = {}
    for _ in range(depth):
        value = [value]
    assert encode(value) == b"[" * depth + b"{}" + b"]" * depth + b"\r\n"
    out = JsonSplitter(max_nesting=depth + 1).feed(encode(value))
    assert len(out) == 1


@pytest.mark.parametrize("bad", [{1: 2}, {"a": {1, 2}}, [object()], {"a": ["é", b"x"]}])
def test_not_json(bad: object) -> None:
    with pytest.raises(TypeError):
        encode(bad)
    with pytest.raises(TypeError):
        encode_pretty(bad)


def test_pretty_layout() -> None:
    # As QSD 7.2 prints it with --monitor chardev=m0,pretty=on: four-space indents, CRLF line
    # breaks, and empty containers broken over two lines.
    message = {"return": [], "id": [1, {"a": {}, "b": []}, "é"]}
    assert encode_pretty(message) == (
        b'{\r\n    "return": [\r\n    ],\r\n    "id": [\r\n        1,\r\n        {\r\n'
        b'            "a": {\r\n            },\r\n            "b": [\r\n            ]\r\n'
        b'        },\r\n        "\\u00E9"\r\n    ]\r\n}\r\n'
    )
    assert encode_pretty({}) == b"{\r\n}\r\n"
    assert encode_pretty("x") == b'"x"\r\n'
    assert encode_pretty(2**70) == b"1180591620717411303424\r\n"


# -- properties --------------------------------------------------------------------------------

_NONCHARACTERS = {*range(0xFDD0, 0xFDF0)} | {
    plane << 16 | low for plane in range(17) for low in (0xFFFE, 0xFFFF)
}
# What the framing layer can produce: no surrogates or noncharacters in strings, finite floats.
_texts = st.text(
    st.characters(blacklist_categories=["Cs"]).filter(lambda c: ord(c) not in _NONCHARACTERS),
    max_size=10,
)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(value=_values)
def test_round_trip(value: object) -> None:
    for encoded in (encode(value), encode_pretty(value)):
        assert encoded.isascii()
        assert encoded.endswith(b"\r\n")
        assert repr(JsonSplitter().feed(encoded)) == repr([value])
    assert b"\n" not in encode(value)[:-2]


# -- against qemu-storage-daemon ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pretty_monitor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A qemu-storage-daemon with a second monitor, pretty=on."""
    if shutil.which("qemu-storage-daemon") is None:
        missing("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
    workdir = tmp_path_factory.mktemp("qsd-pretty")
    path = workdir / "pretty.sock"
    extra = ["--chardev", f"socket,id=m1,path={path},server=on,wait=off"]
    extra += ["--monitor", "chardev=m1,pretty=on"]
    with QsdProcess.start(workdir, *extra):
        yield path


def _read_message(sock: socket.socket, buffered: bytearray) -> bytes:
    """One pretty-printed message: it ends with a closing brace alone at the line start."""
    while True:
        end = buffered.find(b"\r\n}\r\n")
        if end >= 0:
            message = bytes(buffered[: end + 5])
            del buffered[: end + 5]
            return message
        chunk = sock.recv(65536)
        assert chunk, "qemu-storage-daemon closed the connection"
        buffered += chunk


def test_pretty_same_as_qsd(pretty_monitor: Path) -> None:
    """QSD's raw bytes, parsed (keeping QSD's key order) and encoded again, are the same."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)  # a guard only
        sock.connect(str(pretty_monitor))
        buffered = bytearray()
        greeting = _read_message(sock, buffered)
        assert encode_pretty(json.loads(greeting)) == greeting
        sock.sendall(b'{"execute":"qmp_capabilities"}')
        negotiated = _read_message(sock, buffered)
        assert negotiated == encode_pretty({"return": {}})
        ident = {"a": [1, -2, True, None, {}, [], {"b": [[]]}], "s": "é😀\x7f\x1b\n\"\\/'"}
        sock.sendall(b'{"execute":"query-jobs","id":' + encode(ident)[:-2] + b"}")
        reply = _read_message(sock, buffered)
        assert json.loads(reply) == {"return": [], "id": ident}
        assert encode_pretty(json.loads(reply)) == reply
