"""The splitter's fast path: where a plain `{...}` message ends, found at C speed.

A regex for a `{...}` object nested at most `depth` deep whose strings use no \\u escapes and
no control characters, and with no single quotes or odd bytes between tokens. It only finds
candidates; orjson and the checks in JsonSplitter._take decide, and the faithful path
(framing.py) is the authority on everything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

WS: Final = rb"[ \t\r\n]*+"
STR_BODY: Final = rb'"(?:[^"\\\x00-\x1f\xfe\xff]++|\\[^u\x00-\x1f\xfe\xff])*+'
OTHER: Final = rb"[^\"'{}\[\]\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\xff]++"
# Between tokens of a candidate cut off by the end of the input, only what QEMU's lexer takes
# without complaint (a complaint would be due at once, not when the rest arrives): whitespace,
# colons, commas, keywords, and numbers not followed by a byte that would break them.
LEXES: Final = (
    rb"[ \t\r\n:,]++|[a-z]++"
    rb"|-?+(?:0(?:\.[0-9]++(?:[eE][-+]?+[0-9]++)?+)?+"  # (QEMU takes no exponent after "0")
    rb"|[1-9][0-9]*+(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+)(?![0-9.eE])"
)
# Where a number may start: "0e" there is QEMU's "0", then a keyword.
ZERO_EXPONENT: Final = re.compile(rb"[:,\[ \t\r\n]-?0[eE]")
FAST_DEPTH: Final = 8
FAST_WAITS: Final = 8  # feeds a fast candidate may stay incomplete before _slow takes over
# The longest incomplete candidate that waits for the rest: each wait scans it again with one
# regular-expression call, which holds the GIL throughout (a daemon thread parsing a large
# message would stall the event loop). Larger messages take the faithful path as they come.
FAST_PENDING_MAX: Final = 1 << 16
DIGITS_TO_ZERO: Final = bytes(0x30 if 0x30 <= ch <= 0x39 else 0x20 for ch in range(256))
WS_RUN: Final = re.compile(WS)
STRING_OR_CUT: Final = re.compile(rb'"(?:[^"\\]|\\.)*+\\?(?:"|\Z)', re.DOTALL)
NOT_BRACKETS: Final = bytes(ch for ch in range(256) if ch not in b"{}[]")


def _items(between: bytes, depth: int) -> list[bytes]:
    """items[k]: a string, a run of `between`, or (k > 0) a bracketed run of items[k - 1].
    Brackets are not paired by kind: that would double the pattern at every level."""
    string = STR_BODY + b'"'
    items = [b"(?:" + string + b"|" + between + b")"]
    for _ in range(depth - 1):
        nested = rb"[{\[]" + items[-1] + rb"*+[}\]]"
        items.append(b"(?:" + string + b"|" + between + b"|" + nested + b")")
    return items


# The patterns compiled so far, by depth: what a splitter may use without compiling them.
_COMPILED: dict[int, tuple[re.Pattern[bytes], re.Pattern[bytes]]] = {}


def compiled_patterns(depth: int) -> tuple[re.Pattern[bytes], re.Pattern[bytes]] | None:
    """fast_patterns(DEPTH) if they have been compiled, else None (never compiles)."""
    return _COMPILED.get(depth)


@lru_cache(maxsize=8)
def fast_patterns(depth: int) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """(complete, prefix): one whole candidate object, and a candidate cut off by the end.
    Compiling them at depth 8 takes about 15 ms (re's compiler is Python): the daemon does it
    in a worker thread once it serves (server.py), not on its way to the first reply."""
    items = _items(OTHER, depth)
    complete = re.compile(WS + rb"(\{" + items[depth - 1] + rb"*+\})" + WS)
    # An unfinished string, or an unfinished container at some level, must reach the end.
    items = _items(LEXES, depth)
    cut_string = STR_BODY + rb"\\?\Z"
    tail = b"(?:" + cut_string + rb"|\Z)"
    for level in range(depth - 1):
        tail = b"(?:" + cut_string + rb"|\Z|[{\[]" + items[level] + b"*+" + tail + b")"
    prefix = re.compile(WS + rb"\{" + items[depth - 1] + b"*+" + tail)
    _COMPILED[depth] = complete, prefix
    return complete, prefix


def long_digit_run(span: bytes) -> bool:
    """Whether 19 digits stand in a row: only then can an integer exceed 64 bits.  (Counting
    all digits first is cheaper than searching for a run with a regex.)"""
    if len(span) - len(span.translate(None, b"0123456789")) < 19:
        return False
    return b"0" * 19 in span.translate(DIGITS_TO_ZERO)


def nests_deeper(value: dict[str, object], limit: int) -> bool:
    """Whether containers in `value` nest more than `limit` deep (the value itself is 1)."""
    stack: list[tuple[Iterable[object], int]] = [(value.values(), 1)]
    while stack:
        children, depth = stack.pop()
        for child in children:
            inner: Iterable[object]
            if isinstance(child, dict):
                inner = child.values()
            elif isinstance(child, list):
                inner = child
            else:
                continue
            if depth >= limit:
                return True
            stack.append((inner, depth + 1))
    return False


def closers_pair_up(prefix: bytes) -> bool:
    """Whether every closing bracket in a prefix candidate closes an opening one of its kind.
    QEMU counts braces and brackets apart and ends a message as soon as either count goes
    negative, so `{]` is already a (bad) message that must not wait for more input."""
    skeleton = STRING_OR_CUT.sub(b"", prefix).translate(None, NOT_BRACKETS)
    while True:
        shorter = skeleton.replace(b"{}", b"").replace(b"[]", b"")
        if shorter == skeleton:
            return b"}" not in skeleton and b"]" not in skeleton
        skeleton = shorter
