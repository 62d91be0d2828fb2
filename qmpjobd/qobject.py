"""QEMU's QObject conventions, as plain data: the order QEMU walks a QDict in, and QEMU's JSON.

The base module: pure functions over JSON values (dict with str keys, list or tuple, str, int,
float, bool, None), importing nothing of the project, so that any layer may use it (the QAPI
compiler, the protocol core, the block layer).

- `qdict_order`: QEMU keeps a JSON object in a QDict, a hash table of 512 buckets (tdb hash),
  and walks it bucket by bucket, the newest entry first. Wherever QEMU reports "the first" of
  several keys (an unexpected envelope member) or writes an object out (a node's "json:" file
  name), that walk decides the order.
- `write_json`: JSON text as QEMU's writer produces it: ASCII only, with \\uXXXX (upper-case
  hex) for control characters, DEL and everything beyond ASCII, surrogate pairs beyond U+FFFF.
  Three layouts: compact without spaces (what the daemon sends, as orjson would), QEMU's own
  compact layout (`", "` and `": "`), and QEMU's `pretty=on` layout. Iterative: nesting depth
  is limited by memory only. Non-finite floats are written as null (QEMU would write invalid
  JSON).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Final

__all__ = ["qdict_order", "quote", "write_json"]

_U32: Final = 0xFFFFFFFF


def _qdict_bucket(key: bytes) -> int:
    acc = (0x238F13AF * len(key)) & _U32
    for i, byte in enumerate(key):
        acc = (acc + (byte << (i * 5 % 24))) & _U32
    return ((1103515243 * acc + 12345) & _U32) % 512


def qdict_order(keys: list[str]) -> list[str]:
    """KEYS (in input order) in the order QEMU walks a QDict holding them: bucket by bucket,
    the newest entry first within a bucket."""
    raw = [k.encode("utf-8", "surrogatepass") for k in keys]
    order = sorted(range(len(keys)), key=lambda i: (_qdict_bucket(raw[i]), -i))
    return [keys[i] for i in order]


# -- JSON text -----------------------------------------------------------------------------------

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


def quote(text: str) -> str:
    """TEXT as a JSON string literal, escaped as QEMU escapes it."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, int):
        return int.__repr__(value)  # exact, whatever its size; plain digits for int subclasses
    if isinstance(value, float):
        return float.__repr__(value) if math.isfinite(value) else "null"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_Members = Iterator[tuple[str | None, object]]
KeyOrder = Callable[[list[str]], list[str]]


def _members(value: object, key_order: KeyOrder | None) -> _Members | None:
    """Iterate over a container's (key, value) pairs (key None in arrays); None for scalars."""
    if isinstance(value, dict):
        keys = list(value)
        for key in keys:
            if not isinstance(key, str):
                raise TypeError("JSON object keys must be strings")
        if key_order is not None:
            keys = key_order(keys)
        return ((key, value[key]) for key in keys)
    if isinstance(value, list | tuple):
        return ((None, item) for item in value)
    return None


def write_json(
    message: object, *, pretty: bool = False, spaced: bool = False,
    key_order: KeyOrder | None = None,
) -> str:
    """MESSAGE as JSON text: compact without spaces; with SPACED, QEMU's compact layout
    (`{"a": 1, "b": [2, 3]}`); with PRETTY, QEMU's pretty layout (CRLF line breaks, four-space
    indents, `"key": value`). KEY_ORDER reorders each object's keys (`qdict_order` writes an
    object as QEMU does); without it they keep their order."""
    parts: list[str] = []
    colon = ": " if pretty or spaced else ":"
    comma = ", " if spaced and not pretty else ","
    # One entry per open container: its member iterator, its closing bracket, and whether a
    # member has been written yet.
    stack: list[tuple[_Members, str, list[bool]]] = []
    key: str | None = None
    value = message
    while True:
        if stack:
            started = stack[-1][2]
            if started[0]:
                parts.append(comma)
            started[0] = True
            if pretty:
                parts.append(_CRLF + "    " * len(stack))
        if key is not None:
            parts.append(quote(key) + colon)
        members = _members(value, key_order)
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
