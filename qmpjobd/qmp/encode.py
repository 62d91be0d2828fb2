"""Write one QMP message: ASCII-only JSON and a CRLF, as QEMU's monitor sends it.

`encode` is on every reply's path, so it lets orjson do the work whenever orjson's output is
already what QMP needs (ASCII, which is nearly always).  orjson cannot write integers beyond 64
bits, nesting deeper than 255, or escape non-ASCII characters; those messages go through `_write`,
an iterative writer that also produces `encode_pretty`'s layout (QEMU's `pretty=on`).

Values are JSON values as the framing layer produces them: dict (str keys), list (or tuple), str,
int, float, bool and None.  Non-finite floats are written as null (orjson's choice; QEMU would
write invalid JSON).  Strings are escaped as QEMU escapes them on the slow path: \\uXXXX with
upper-case hex for control characters, DEL and everything beyond ASCII, surrogate pairs beyond
U+FFFF.  On orjson's path the few control characters are escaped as orjson does; the text is
the same JSON either way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Final

import orjson

__all__ = ["encode", "encode_pretty"]

_CRLF: Final = "\r\n"
_SHORT_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
# Everything but printable ASCII other than '"' and '\\'. (Spelled as a negated class: a class
# spanning all of Unicode costs some 10 ms to compile, on every start-up.)
_NEEDS_ESCAPE: Final = re.compile('[^\\x20\\x21\\x23-\\x5b\\x5d-\\x7e]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    cp = ord(char)
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def _quote(text: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int):
        return int.__repr__(value)  # exact, whatever its size; plain digits for int subclasses
    if isinstance(value, float):
        return float.__repr__(value) if math.isfinite(value) else "null"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_Members = Iterator[tuple[str | None, object]]


def _members(value: object) -> _Members | None:
    """Iterate over a container's (key, value) pairs (key None in arrays); None for scalars."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError("JSON object keys must be strings")
        return iter(value.items())
    if isinstance(value, list | tuple):
        return ((None, item) for item in value)
    return None


def _write(message: object, pretty: bool) -> str:
    """QEMU's layout when `pretty` (CRLF line breaks, four-space indents, `"key": value`),
    else compact like orjson.  Iterative: nesting depth is limited by memory only."""
    parts: list[str] = []
    colon = ": " if pretty else ":"
    # One entry per open container: its member iterator, its closing bracket, and whether a
    # member has been written yet.
    stack: list[tuple[_Members, str, list[bool]]] = []
    key: str | None = None
    value = message
    while True:
        if stack:
            started = stack[-1][2]
            if started[0]:
                parts.append(",")
            started[0] = True
            if pretty:
                parts.append(_CRLF + "    " * len(stack))
        if key is not None:
            parts.append(_quote(key) + colon)
        members = _members(value)
        if members is None:
            parts.append(_scalar(value))
        else:
            is_object = isinstance(value, dict)
            parts.append("{" if is_object else "[")
            stack.append((members, "}" if is_object else "]", [False]))
        # Find the next value to write, closing every container that has run out.
        while stack:
            following = next(stack[-1][0], None)
            if following is not None:
                key, value = following
                break
            _, closer, _ = stack.pop()
            if pretty:
                parts.append(_CRLF + "    " * len(stack))
            parts.append(closer)
        else:
            return "".join(parts)


def encode(message: object) -> bytes:
    """One message as ASCII JSON followed by CRLF."""
    try:
        text = orjson.dumps(message)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, deep nesting, or not JSON
        pass
    else:
        if text.isascii():
            return text + b"\r\n"
    return (_write(message, pretty=False) + _CRLF).encode("ascii")


def encode_pretty(message: object) -> bytes:
    """One message laid out as QEMU's `--monitor ...,pretty=on` does, followed by CRLF."""
    return (_write(message, pretty=True) + _CRLF).encode("ascii")
