"""Split a QMP input byte stream into JSON values, the way QEMU 7.2's monitor does.

QEMU reads QMP input through three stages: a lexer (bytes -> tokens, with error recovery), a
"streamer" (tokens -> one message's worth of tokens, by counting brackets, with size limits) and a
recursive-descent parser.  Clients depend on their quirks: several values per line, single-quoted
strings, scalars as complete messages, an unbalanced `}` failing at once, and a control character
forcing the parser back into a known state.  `JsonSplitter` reproduces that behaviour, error texts
included, with two deliberate differences (see docs/compat.md, "QMP framing"): integers keep their
exact value, and numbers QEMU would turn into an infinite double are an error.

Speed: almost every message is a plain `{...}` object, mostly alone on its line.  orjson decodes
such a line as it stands, or a regular expression first finds where the object ends (at C speed);
a few cheap checks then make sure that orjson read the text as QEMU would (duplicate keys, huge
integers, "0e5", Unicode noncharacters, nesting).  Everything else goes through `_slow`: the three
stages reimplemented faithfully (the parser taking one token at a time, with an explicit stack,
so that nesting is bounded by the limit and not by Python's stack).  It is the authority on
boundaries and errors; the fast path only ever takes what it would have produced anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import orjson

__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_COUNT",
    "MAX_TOKEN_SIZE",
    "FramingError",
    "JsonSplitter",
]

# QEMU's limits (qobject/json-streamer.c, json-lexer.c).
MAX_TOKEN_SIZE: Final = 64 << 20  # bytes in one token, and in all tokens of one message
MAX_TOKEN_COUNT: Final = 2 << 20  # tokens in one message
MAX_NESTING: Final = 1 << 10  # open brackets and braces, added together

# Our own limit: Python refuses to convert longer digit strings (sys.int_info), and such a number
# is beyond the range of the double QEMU would have made of it anyway.
_MAX_INT_DIGITS: Final = 4300

_ERR_PREFIX: Final = "JSON parse error, "
_OUT_OF_RANGE: Final = "JSON parse error, number out of range"


@dataclass(frozen=True, slots=True)
class FramingError:
    """A syntax error or a limit hit; QMP answers it with a GenericError carrying `desc`."""

    desc: str


# ---------------------------------------------------------------------------------------------
# The lexer: a table-driven state machine fed one byte at a time, except that runs of bytes
# that leave the state unchanged (string bodies, digits, letters, whitespace, bytes skipped while
# recovering) are consumed by one regular-expression match.

(
    _START,
    _RECOVERY,
    _DQ,
    _DQ_ESC,
    _SQ,
    _SQ_ESC,
    _ZERO,
    _SIGN,
    _DIGITS,
    _FRAC_DOT,
    _FRAC,
    _EXP_MARK,
    _EXP_SIGN,
    _EXP,
    _WORD,
) = range(15)

_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COLON, _COMMA, _INT, _FLOAT, _KEYWORD, _STRING = range(10)

# A table entry is one of:
#   a state number        consume the byte (keeping it in the token, except in _START and
#                         _RECOVERY, which hold no token) and move to that state;
#   _EMIT + type          consume the byte, and the token (with it) is complete;
#   _ENDS + type          the token ended before this byte: emit it, then look at the byte
#                         again in _START;
#   _STRAY                consume the byte: the token so far, with it, is an error; recover;
#   _RESYNC               stop recovering: look at the byte again in _START.
_EMIT: Final = 16
_ENDS: Final = 32
_STRAY: Final = 48
_RESYNC: Final = 49


def _build_table() -> tuple[tuple[int, ...], ...]:
    rows = [[_STRAY] * 256 for _ in range(15)]

    def put(state: int, chars: bytes | range, action: int) -> None:
        for ch in chars:
            rows[state][ch] = action

    digits, nonzero, letters = b"0123456789", b"123456789", range(ord("a"), ord("z") + 1)
    # Bytes allowed in a string or after a backslash: not control characters, and not 0xFE
    # and 0xFF, which can never occur in UTF-8.
    text = range(0x20, 0xFE)

    put(_START, b" \t\r\n", _START)
    for ch, token in zip(b"{}[]:,", range(6), strict=True):
        put(_START, bytes([ch]), _EMIT + token)
    put(_START, b'"', _DQ)
    put(_START, b"'", _SQ)
    put(_START, b"0", _ZERO)
    put(_START, nonzero, _DIGITS)
    put(_START, b"-", _SIGN)
    put(_START, letters, _WORD)

    # After an error, skip to something a message could plausibly resume at: a structural
    # character, a line ending, or a control character (which clients send on purpose to get
    # the parser into a known state).  Tab is skipped like any other byte.
    put(_RECOVERY, range(256), _RECOVERY)
    put(_RECOVERY, range(0x20), _RESYNC)
    put(_RECOVERY, b"\t", _RECOVERY)
    put(_RECOVERY, b"\xfe\xff[]{}:,", _RESYNC)

    for body, escape, quote in ((_DQ, _DQ_ESC, b'"'), (_SQ, _SQ_ESC, b"'")):
        put(body, text, body)
        put(body, b"\\", escape)
        put(body, quote, _EMIT + _STRING)
        put(escape, text, body)  # the parser, not the lexer, judges the escaped character

    # Numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?, ending at the first byte that
    # cannot continue them; a byte that breaks one in the middle is part of the error token.
    put(_SIGN, b"0", _ZERO)
    put(_SIGN, nonzero, _DIGITS)
    put(_ZERO, range(256), _ENDS + _INT)
    put(_ZERO, digits, _STRAY)
    put(_ZERO, b".", _FRAC_DOT)
    put(_DIGITS, range(256), _ENDS + _INT)
    put(_DIGITS, digits, _DIGITS)
    put(_DIGITS, b".", _FRAC_DOT)
    put(_DIGITS, b"eE", _EXP_MARK)
    put(_FRAC_DOT, digits, _FRAC)
    put(_FRAC, range(256), _ENDS + _FLOAT)
    put(_FRAC, digits, _FRAC)
    put(_FRAC, b"eE", _EXP_MARK)
    put(_EXP_MARK, b"+-", _EXP_SIGN)
    put(_EXP_MARK, digits, _EXP)
    put(_EXP_SIGN, digits, _EXP)
    put(_EXP, range(256), _ENDS + _FLOAT)
    put(_EXP, digits, _EXP)

    # Any run of lowercase letters is a keyword token; the parser rejects unknown ones.
    put(_WORD, range(256), _ENDS + _KEYWORD)
    put(_WORD, letters, _WORD)
    return tuple(tuple(row) for row in rows)


_TABLE: Final = _build_table()


def _self_loop_runs() -> tuple[re.Pattern[bytes] | None, ...]:
    """For each state, a regex matching a run of bytes that keep the lexer in that state."""
    runs: list[re.Pattern[bytes] | None] = []
    for state, row in enumerate(_TABLE):
        chars = [ch for ch in range(256) if row[ch] == state]
        if not chars:
            runs.append(None)
            continue
        body = b"".join(re.escape(bytes([ch])) for ch in chars)
        runs.append(re.compile(b"[" + body + b"]+"))
    return tuple(runs)


_RUNS: Final = _self_loop_runs()

# ---------------------------------------------------------------------------------------------
# Text helpers: QEMU's "modified UTF-8" (U+0000 may be written as C0 80; noncharacters, surrogates
# and overlong forms are invalid), used both to validate strings and, in lossy form, to turn error
# messages holding raw input bytes into text as QEMU's JSON writer would (U+FFFD per bad sequence).

_NONCHARACTERS: Final = [*range(0xFDD0, 0xFDF0)] + [
    plane << 16 | low for plane in range(17) for low in (0xFFFE, 0xFFFF)
]
_NONCHAR_TEXT: Final = re.compile("[" + "".join(map(chr, _NONCHARACTERS)) + "]")
# The same in UTF-8, for text orjson has already checked to be valid UTF-8 (so these lead bytes
# start characters): U+FDD0..U+FDEF, U+FFFE/F and U+xFFFE/F in the other planes.
_NONCHAR_UTF8: Final = re.compile(
    rb"\xef\xb7[\x90-\xaf]|\xef\xbf[\xbe\xbf]|[\xf0-\xf4][\x8f\x9f\xaf\xbf]\xbf[\xbe\xbf]"
)
_SMALLEST: Final = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)  # by sequence length - 2


def _valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    return not (0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE)


def _mod_utf8(data: bytes, lossy: bool) -> str | None:
    """Decode modified UTF-8; None at the first bad sequence, or U+FFFD for each if `lossy`."""
    chars: list[str] = []
    i, n = 0, len(data)
    while i < n:
        lead = data[i]
        i += 1
        if lead < 0x80:
            chars.append(chr(lead))
            continue
        cp = -1
        if lead < 0xFE and lead & 0x40:
            length = 2
            while length < 7 and lead & (0x80 >> length):
                length += 1
            value = lead & ((1 << (7 - length)) - 1)
            for _ in range(length - 1):
                if i >= n or data[i] & 0xC0 != 0x80:
                    break  # a truncated sequence counts as one bad sequence, as far as it goes
                value = value << 6 | data[i] & 0x3F
                i += 1
            else:
                overlong = value < _SMALLEST[length - 2] and not (value == 0 and length == 2)
                if _valid_codepoint(value) and not overlong:
                    cp = value
        if cp < 0:
            if not lossy:
                return None
            cp = 0xFFFD
        chars.append(chr(cp))
    return "".join(chars)


def _message(raw: bytes) -> str:
    """An error message holding input bytes, as it reads once QEMU has written it as JSON."""
    if raw.isascii():
        return raw.decode("ascii")
    text = _mod_utf8(raw, lossy=True)
    assert text is not None
    return text


def _plain_text(raw: bytes) -> str | None:
    """A stretch of string body without escapes; None if QEMU would call it invalid UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _mod_utf8(raw, lossy=False)  # C0 80 is valid for QEMU, not for Python
    return None if _NONCHAR_TEXT.search(text) else text


_SIMPLE_ESCAPES: Final = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


def _hex4(token: bytes, at: int) -> int:
    digits = token[at : at + 4]
    if len(digits) < 4 or not all(ch in _HEX for ch in digits):
        return -1
    return int(digits, 16)


def _string(token: bytes) -> str | FramingError:
    """The value of a string token (quotes included), or QEMU's complaint about it."""
    body = token[1:-1]
    if b"\\" not in body:
        if body.isascii():
            return body.decode("ascii")
        plain = _plain_text(body)
        return _INVALID_UTF8 if plain is None else plain
    parts: list[str] = []
    i, end = 1, len(token) - 1
    while i < end:
        slash = token.find(b"\\", i, end)
        stop = end if slash < 0 else slash
        if stop > i:
            plain = _plain_text(token[i:stop])
            if plain is None:
                return _INVALID_UTF8
            parts.append(plain)
        if slash < 0:
            break
        kind = token[slash + 1]
        if kind != ord("u"):
            simple = _SIMPLE_ESCAPES.get(kind)
            if simple is None:
                return FramingError(_ERR_PREFIX + "invalid escape sequence in string")
            parts.append(simple)
            i = slash + 2
            continue
        # \uXXXX, where a high surrogate followed by an escaped low surrogate makes one
        # character.  QEMU steps over four bytes even when they are not hex digits, and quotes
        # the bytes it stepped over (clipped at the token's end) when it rejects the result.
        i = slash + 6
        cp = _hex4(token, slash + 2)
        if 0xD800 <= cp <= 0xDBFF and token[i : i + 2] == b"\\u":
            low = _hex4(token, i + 2)
            if 0xDC00 <= low <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10 | low & 0x3FF)
                i += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            quoted = token[slash : min(i, len(token))]
            complaint = _message(quoted) + " is not a valid Unicode character"
            return FramingError(_ERR_PREFIX + complaint)
        parts.append(chr(cp))
    return "".join(parts)


_INVALID_UTF8: Final = FramingError(_ERR_PREFIX + "invalid UTF-8 sequence in string")


def _number(token: bytes, kind: int) -> int | float | FramingError:
    if kind == _INT:
        if len(token) - (token[0] == ord("-")) > _MAX_INT_DIGITS:
            return FramingError(_OUT_OF_RANGE)
        try:
            return int(token)
        except ValueError:  # the interpreter's digit limit was lowered below ours
            return FramingError(_OUT_OF_RANGE)
    value = float(token)
    if value in (float("inf"), float("-inf")):
        return FramingError(_OUT_OF_RANGE)
    return value


_KEYWORDS: Final[dict[bytes, object]] = {b"true": True, b"false": False, b"null": None}

# ---------------------------------------------------------------------------------------------
# The fast path: a regex for a `{...}` object nested at most `depth` deep whose strings use no
# \u escapes and no control characters, and with no single quotes or odd bytes between tokens.
# It only finds candidates; orjson and the checks in `_take` decide.

_WS: Final = rb"[ \t\r\n]*+"
_STR_BODY: Final = rb'"(?:[^"\\\x00-\x1f\xfe\xff]++|\\[^u\x00-\x1f\xfe\xff])*+'
_OTHER: Final = rb"[^\"'{}\[\]\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\xff]++"
# Between tokens of a candidate cut off by the end of the input, only what QEMU's lexer takes
# without complaint (a complaint would be due at once, not when the rest arrives): whitespace,
# colons, commas, keywords, and numbers not followed by a byte that would break them.
_LEXES: Final = (
    rb"[ \t\r\n:,]++|[a-z]++"
    rb"|-?+(?:0(?:\.[0-9]++(?:[eE][-+]?+[0-9]++)?+)?+"  # (QEMU takes no exponent after "0")
    rb"|[1-9][0-9]*+(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+)(?![0-9.eE])"
)
# Where a number may start: "0e" there is QEMU's "0", then a keyword.
_ZERO_EXPONENT: Final = re.compile(rb"[:,\[ \t\r\n]-?0[eE]")
_FAST_DEPTH: Final = 8
_FAST_WAITS: Final = 8  # feeds a fast candidate may stay incomplete before _slow takes over
# The longest incomplete candidate that waits for the rest: each wait scans it again with one
# regular-expression call, which holds the GIL throughout (a daemon thread parsing a large
# message would stall the event loop). Larger messages take the faithful path as they come.
_FAST_PENDING_MAX: Final = 1 << 16
_DIGITS_TO_ZERO: Final = bytes(0x30 if 0x30 <= ch <= 0x39 else 0x20 for ch in range(256))
_WS_RUN: Final = re.compile(_WS)
_STRING_OR_CUT: Final = re.compile(rb'"(?:[^"\\]|\\.)*+\\?(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS: Final = bytes(ch for ch in range(256) if ch not in b"{}[]")


def _items(between: bytes, depth: int) -> list[bytes]:
    """items[k]: a string, a run of `between`, or (k > 0) a bracketed run of items[k - 1].
    Brackets are not paired by kind: that would double the pattern at every level."""
    string = _STR_BODY + b'"'
    items = [b"(?:" + string + b"|" + between + b")"]
    for _ in range(depth - 1):
        nested = rb"[{\[]" + items[-1] + rb"*+[}\]]"
        items.append(b"(?:" + string + b"|" + between + b"|" + nested + b")")
    return items


@lru_cache(maxsize=8)
def _fast_patterns(depth: int) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """(complete, prefix): one whole candidate object, and a candidate cut off by the end."""
    items = _items(_OTHER, depth)
    complete = re.compile(_WS + rb"(\{" + items[depth - 1] + rb"*+\})" + _WS)
    # An unfinished string, or an unfinished container at some level, must reach the end.
    items = _items(_LEXES, depth)
    cut_string = _STR_BODY + rb"\\?\Z"
    tail = b"(?:" + cut_string + rb"|\Z)"
    for level in range(depth - 1):
        tail = b"(?:" + cut_string + rb"|\Z|[{\[]" + items[level] + b"*+" + tail + b")"
    prefix = re.compile(_WS + rb"\{" + items[depth - 1] + b"*+" + tail)
    return complete, prefix


def _long_digit_run(span: bytes) -> bool:
    """Whether 19 digits stand in a row: only then can an integer exceed 64 bits.  (Counting
    all digits first is cheaper than searching for a run with a regex.)"""
    if len(span) - len(span.translate(None, b"0123456789")) < 19:
        return False
    return b"0" * 19 in span.translate(_DIGITS_TO_ZERO)


def _nests_deeper(value: dict[str, object], limit: int) -> bool:
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


def _closers_pair_up(prefix: bytes) -> bool:
    """Whether every closing bracket in a prefix candidate closes an opening one of its kind.
    QEMU counts braces and brackets apart and ends a message as soon as either count goes
    negative, so `{]` is already a (bad) message that must not wait for more input."""
    skeleton = _STRING_OR_CUT.sub(b"", prefix).translate(None, _NOT_BRACKETS)
    while True:
        shorter = skeleton.replace(b"{}", b"").replace(b"[]", b"")
        if shorter == skeleton:
            return b"}" not in skeleton and b"]" not in skeleton
        skeleton = shorter


# ---------------------------------------------------------------------------------------------
# Parser phases: where we are inside the innermost open object or array.
_OBJ_OPEN, _OBJ_KEY, _OBJ_COLON, _OBJ_VALUE, _OBJ_NEXT = range(5)
_ARR_OPEN, _ARR_VALUE, _ARR_NEXT = range(5, 8)


class JsonSplitter:
    """Bytes in, complete top-level JSON values (or `FramingError`s) out, in order.

    Sans-IO: feed it whatever the socket returned, in pieces of any size.  Values are dict,
    list, str, int, float, bool or None; integers keep their exact value.
    """

    def __init__(
        self,
        *,
        max_token_size: int = MAX_TOKEN_SIZE,
        max_token_count: int = MAX_TOKEN_COUNT,
        max_nesting: int = MAX_NESTING,
        fast: bool = True,
    ) -> None:
        """The limits are QEMU's unless given (tests use small ones).  `fast=False` sends all
        input through the faithful path, so that tests can compare the two."""
        self._max_size = max_token_size
        self._max_count = max_token_count
        self._max_nesting = max_nesting
        # The fast path must never meet a limit: its candidates are shorter than the size limit
        # and than the token count limit (a token takes a byte at least), and `_take` checks
        # their nesting.
        self._fast_len = min(max_token_size - 1, max_token_count)
        depth = min(_FAST_DEPTH, max_nesting)
        self._complete: re.Pattern[bytes] | None = None
        self._prefix: re.Pattern[bytes] | None = None
        self._line = fast
        if fast and depth >= 1:
            self._complete, self._prefix = _fast_patterns(depth)
        self._pending = b""  # an incomplete fast-path candidate
        self._waits = 0
        # lexer
        self._state = _START
        self._token_text = bytearray()
        # streamer and parser: the message being assembled
        self._braces = 0
        self._brackets = 0
        self._count = 0  # tokens
        self._size = 0  # their bytes
        self._stack: list[list[object]] = []  # [container, phase, key] per open container
        self._error: FramingError | None = None
        self._done = False
        self._value: object = None

    @property
    def buffered(self) -> int:
        """Bytes held for a message not complete yet."""
        return len(self._pending) + len(self._token_text) + self._size

    def eof(self) -> list[object | FramingError]:
        """End of input.  QEMU drops an unfinished message (even a number that only lacks the
        byte after it) when the connection closes, so nothing comes out; the splitter is reset."""
        self._pending = b""
        self._waits = 0
        self._state = _START
        self._token_text.clear()
        self._reset_message()
        return []

    def feed(self, data: bytes) -> list[object | FramingError]:
        """Take more input; return the values and errors it completes."""
        out: list[object | FramingError] = []
        if type(data) is not bytes:
            data = bytes(data)  # a bytearray or memoryview
        buf = self._pending + data if self._pending else data
        self._pending = b""
        n = len(buf)
        pos = 0
        if self._state != _START or self._count:
            pos = self._slow(buf, 0, out)
        complete, prefix = self._complete, self._prefix
        tried = 0  # the end of the last line that was not one message
        while pos < n:
            # Most clients send one message per line: try the line as it stands.
            if pos >= tried and buf[pos] == 0x7B and self._line:  # "{"
                newline = buf.find(b"\n", pos)
                end = n if newline < 0 else newline + 1
                if self._take(buf[pos:end], out):
                    self._waits = 0
                    pos = end
                    continue
                tried = end
            # Else look for a whole candidate object, possibly one of several on the line.
            if complete is not None:
                match = complete.match(buf, pos)
                if match is not None:
                    start, end = match.span(1)
                    self._waits = 0
                    if self._take(buf[start:end], out):
                        pos = match.end()
                    else:
                        pos = self._slow(buf, start, out)
                    continue
            blank = _WS_RUN.match(buf, pos)
            assert blank is not None  # it matches the empty string too
            pos = blank.end()
            if pos == n:
                break
            # A candidate cut off by the end of the input waits for the rest, for a few feeds
            # (each one scans it again from the start); after that, or if it cannot be a
            # candidate, the faithful path takes the bytes as they come.
            if (
                prefix is not None
                and self._waits < _FAST_WAITS
                and n - pos <= min(self._fast_len, _FAST_PENDING_MAX)
                and prefix.match(buf, pos) is not None
                and _closers_pair_up(buf[pos:])
            ):
                self._waits += 1
                self._pending = buf[pos:]
                break
            self._waits = 0
            pos = self._slow(buf, pos, out)
        return out

    def _take(self, span: bytes, out: list[object | FramingError]) -> bool:
        """Decode `span`, which starts with "{", if it is one object that orjson reads exactly
        as QEMU would (give or take whitespace around it)."""
        if len(span) > self._fast_len or span.find(b"\\u") >= 0:  # (faster than `in`)
            return False
        if _long_digit_run(span):  # orjson turns integers beyond 64 bits into floats
            return False
        # JSON allows an exponent right after a leading 0 ("0e5"); QEMU's lexer does not.
        if (span.find(b"0e") >= 0 or span.find(b"0E") >= 0) and _ZERO_EXPONENT.search(span):
            return False
        try:
            value = orjson.loads(span)
        except orjson.JSONDecodeError:
            return False
        if not span.isascii() and _NONCHAR_UTF8.search(span) is not None:
            return False
        # Nesting: a text of length L nests at most L/2 deep, and no deeper than it has
        # opening brackets; else measure the value.
        if (
            len(span) > 2 * self._max_nesting
            and span.count(b"{") + span.count(b"[") > self._max_nesting
            and _nests_deeper(value, self._max_nesting)
        ):
            return False
        # orjson keeps the last of duplicate keys, dropping a member and its colon.  Without
        # \u escapes no colon is written in any other way, in the input or in orjson's output,
        # so the colons are as many in both exactly when nothing was dropped.  (A flat object
        # without colons in its strings has as many colons as members: no need to serialize.)
        colons = span.count(b":")
        if colons != len(value):
            try:
                if colons != orjson.dumps(value).count(b":"):
                    return False
            except orjson.JSONEncodeError:  # nested deeper than orjson writes
                return False
        out.append(value)
        return True

    # -- the faithful path ------------------------------------------------------------------

    def _slow(self, buf: bytes, pos: int, out: list[object | FramingError]) -> int:
        """Lex from `pos` until the end of `buf`, or until the splitter is between messages
        again (after at least one step), so that the fast path can have the rest."""
        n = len(buf)
        text = self._token_text
        first = True
        while pos < n:
            state = self._state
            if state == _START and not self._count and not first:
                return pos
            first = False
            run = _RUNS[state]
            if run is not None:
                match = run.match(buf, pos)
                if match is not None:
                    end = match.end()
                    if state <= _RECOVERY:
                        pos = end
                    else:
                        room = self._max_size + 1 - len(text)
                        if end - pos >= room:  # the token would outgrow the limit
                            pos += room
                            self._oversized(out)
                        else:
                            text += buf[pos:end]
                            pos = end
                    continue
            byte = buf[pos]
            action = _TABLE[state][byte]
            if action < _EMIT:
                pos += 1
                self._state = action
                if action > _RECOVERY:
                    text.append(byte)
                    if len(text) > self._max_size:
                        self._oversized(out)
            elif action < _ENDS:
                pos += 1
                text.append(byte)
                token = bytes(text)
                text.clear()
                self._state = _START
                self._token(action - _EMIT, token, out)
            elif action < _STRAY:
                token = bytes(text)
                text.clear()
                self._state = _START
                self._token(action - _ENDS, token, out)
            elif action == _STRAY:
                pos += 1
                text.append(byte)
                shown = bytes(text).split(b"\0", 1)[0]  # QEMU formats it as a C string
                text.clear()
                self._state = _RECOVERY
                self._fail(FramingError(_message(b"JSON parse error, stray '%s'" % shown)), out)
            else:  # _RESYNC
                self._state = _START
        return pos

    def _oversized(self, out: list[object | FramingError]) -> None:
        """A token in progress outgrew the limit: drop it and the message, lex on afresh."""
        self._token_text.clear()
        self._state = _START
        self._fail(FramingError("JSON token size limit exceeded"), out)

    def _fail(self, error: FramingError, out: list[object | FramingError]) -> None:
        self._reset_message()
        out.append(error)

    def _reset_message(self) -> None:
        self._braces = self._brackets = 0
        self._count = self._size = 0
        self._stack = []
        self._error = None
        self._done = False
        self._value = None

    def _token(self, kind: int, token: bytes, out: list[object | FramingError]) -> None:
        """The streamer: gather a message's tokens, enforce the limits, finish the message
        when its brackets balance (or a closing one has no partner)."""
        if kind <= _RSQUARE:
            if kind == _LCURLY:
                self._braces += 1
            elif kind == _RCURLY:
                self._braces -= 1
            elif kind == _LSQUARE:
                self._brackets += 1
            else:
                self._brackets -= 1
        if self._size + len(token) + 1 > self._max_size:
            return self._fail(FramingError("JSON token size limit exceeded"), out)
        if self._count + 1 > self._max_count:
            return self._fail(FramingError("JSON token count limit exceeded"), out)
        if self._braces + self._brackets > self._max_nesting:
            return self._fail(FramingError("JSON nesting depth limit exceeded"), out)
        self._count += 1
        self._size += len(token)
        if self._error is None:
            self._parse(kind, token)
        braces, brackets = self._braces, self._brackets
        if (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0:
            return None
        if self._error is not None:
            result: object = self._error
        elif self._done:
            result = self._value
        else:  # only reachable when input ends early, which QMP never signals
            result = FramingError(_ERR_PREFIX + "premature EOI")
        self._reset_message()
        out.append(result)
        return None

    def _parse(self, kind: int, token: bytes) -> None:
        """The parser, one token at a time.  The first error wins; the streamer still decides
        where the message ends."""
        stack = self._stack
        if stack:
            frame = stack[-1]
            phase = frame[1]
            if phase == _OBJ_COLON:
                if kind == _COLON:
                    frame[1] = _OBJ_VALUE
                else:
                    self._error = FramingError(_ERR_PREFIX + "missing : in object pair")
                return
            if phase in (_OBJ_NEXT, _ARR_NEXT):
                in_object = phase == _OBJ_NEXT
                if kind == _COMMA:
                    frame[1] = _OBJ_KEY if in_object else _ARR_VALUE
                elif kind == (_RCURLY if in_object else _RSQUARE):
                    self._close()
                else:
                    where = "dict" if in_object else "list"
                    self._error = FramingError(f"{_ERR_PREFIX}expected separator in {where}")
                return
            if (phase == _OBJ_OPEN and kind == _RCURLY) or (
                phase == _ARR_OPEN and kind == _RSQUARE
            ):
                self._close()
                return
        # A value (or an object key, which is parsed as any value and then checked) starts.
        value: object
        if kind == _LCURLY:
            stack.append([{}, _OBJ_OPEN, None])
            return
        if kind == _LSQUARE:
            stack.append([[], _ARR_OPEN, None])
            return
        if kind == _STRING:
            value = _string(token)
        elif kind in (_INT, _FLOAT):
            value = _number(token, kind)
        elif kind == _KEYWORD:
            if token in _KEYWORDS:
                value = _KEYWORDS[token]
            else:
                # QEMU formats the complaint into 1024 bytes, NUL included.
                complaint = f"invalid keyword '{token.decode('ascii')}'"[:1023]
                value = FramingError(_ERR_PREFIX + complaint)
        else:
            value = FramingError(_ERR_PREFIX + "expecting value")
        if type(value) is FramingError:
            self._error = value
            return
        self._deliver(value)

    def _close(self) -> None:
        self._deliver(self._stack.pop()[0])

    def _deliver(self, value: object) -> None:
        """A complete value: the message itself, an object key or member, or a list item."""
        stack = self._stack
        if not stack:
            self._value = value
            self._done = True
            return
        frame = stack[-1]
        phase = frame[1]
        if phase in (_OBJ_OPEN, _OBJ_KEY):
            if type(value) is not str:
                self._error = FramingError(_ERR_PREFIX + "key is not a string in object")
                return
            frame[2] = value
            frame[1] = _OBJ_COLON
        elif phase == _OBJ_VALUE:
            members = frame[0]
            assert type(members) is dict
            if frame[2] in members:
                self._error = FramingError(_ERR_PREFIX + "duplicate key")
                return
            members[frame[2]] = value
            frame[1] = _OBJ_NEXT
        else:
            items = frame[0]
            assert type(items) is list
            items.append(value)
            frame[1] = _ARR_NEXT
