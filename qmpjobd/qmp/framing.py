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

The stages' parts live apart: the lexer's tables in lexer.py, what each token means in
tokens.py, the fast path's patterns in fastpath.py; here are the streamer and the parser that
assemble messages from them.
"""

from __future__ import annotations

import re
from typing import Final

import orjson

from .errors import FramingError
from .fastpath import (
    FAST_DEPTH,
    FAST_PENDING_MAX,
    FAST_WAITS,
    WS_RUN,
    ZERO_EXPONENT,
    closers_pair_up,
    compiled_patterns,
    fast_patterns,
    long_digit_run,
    nests_deeper,
)
from .lexer import (
    COLON,
    COMMA,
    EMIT,
    ENDS,
    FLOAT,
    INT,
    KEYWORD,
    LCURLY,
    LSQUARE,
    RCURLY,
    RECOVERY,
    RSQUARE,
    RUNS,
    START,
    STRAY,
    STRING,
    TABLE,
)
from .tokens import ERR_PREFIX, KEYWORDS, NONCHAR_UTF8, message_text, number_value, string_value

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
        compile_patterns: bool = True,
    ) -> None:
        """The limits are QEMU's unless given (tests use small ones).  `fast=False` sends all
        input through the faithful path, so that tests can compare the two.
        `compile_patterns=False`: the fast path's patterns are used once someone else has
        compiled them (fastpath.fast_patterns); until then whole lines still take the fast
        path, and the rest the faithful one, which reads everything alike."""
        self._max_size = max_token_size
        self._max_count = max_token_count
        self._max_nesting = max_nesting
        # The fast path must never meet a limit: its candidates are shorter than the size limit
        # and than the token count limit (a token takes a byte at least), and `_take` checks
        # their nesting.
        self._fast_len = min(max_token_size - 1, max_token_count)
        depth = min(FAST_DEPTH, max_nesting)
        self._complete: re.Pattern[bytes] | None = None
        self._prefix: re.Pattern[bytes] | None = None
        self._line = fast
        self._awaited = 0  # the depth of patterns not compiled yet, to look for at each feed
        if fast and depth >= 1:
            found = fast_patterns(depth) if compile_patterns else compiled_patterns(depth)
            if found is None:
                self._awaited = depth
            else:
                self._complete, self._prefix = found
        self._pending = b""  # an incomplete fast-path candidate
        self._waits = 0
        # lexer
        self._state = START
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
        self._state = START
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
        if self._state != START or self._count:
            pos = self._slow(buf, 0, out)
        if self._awaited:
            found = compiled_patterns(self._awaited)
            if found is not None:
                self._complete, self._prefix = found
                self._awaited = 0
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
            blank = WS_RUN.match(buf, pos)
            assert blank is not None  # it matches the empty string too
            pos = blank.end()
            if pos == n:
                break
            # A candidate cut off by the end of the input waits for the rest, for a few feeds
            # (each one scans it again from the start); after that, or if it cannot be a
            # candidate, the faithful path takes the bytes as they come.
            if (
                prefix is not None
                and self._waits < FAST_WAITS
                and n - pos <= min(self._fast_len, FAST_PENDING_MAX)
                and prefix.match(buf, pos) is not None
                and closers_pair_up(buf[pos:])
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
        if long_digit_run(span):  # orjson turns integers beyond 64 bits into floats
            return False
        # JSON allows an exponent right after a leading 0 ("0e5"); QEMU's lexer does not.
        if (span.find(b"0e") >= 0 or span.find(b"0E") >= 0) and ZERO_EXPONENT.search(span):
            return False
        try:
            value = orjson.loads(span)
        except orjson.JSONDecodeError:
            return False
        if not span.isascii() and NONCHAR_UTF8.search(span) is not None:
            return False
        # Nesting: a text of length L nests at most L/2 deep, and no deeper than it has
        # opening brackets; else measure the value.
        if (
            len(span) > 2 * self._max_nesting
            and span.count(b"{") + span.count(b"[") > self._max_nesting
            and nests_deeper(value, self._max_nesting)
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
            if state == START and not self._count and not first:
                return pos
            first = False
            run = RUNS[state]
            if run is not None:
                match = run.match(buf, pos)
                if match is not None:
                    end = match.end()
                    if state <= RECOVERY:
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
            action = TABLE[state][byte]
            if action < EMIT:
                pos += 1
                self._state = action
                if action > RECOVERY:
                    text.append(byte)
                    if len(text) > self._max_size:
                        self._oversized(out)
            elif action < ENDS:
                pos += 1
                text.append(byte)
                token = bytes(text)
                text.clear()
                self._state = START
                self._token(action - EMIT, token, out)
            elif action < STRAY:
                token = bytes(text)
                text.clear()
                self._state = START
                self._token(action - ENDS, token, out)
            elif action == STRAY:
                pos += 1
                text.append(byte)
                shown = bytes(text).split(b"\0", 1)[0]  # QEMU formats it as a C string
                text.clear()
                self._state = RECOVERY
                self._fail(FramingError(message_text(b"JSON parse error, stray '%s'" % shown)), out)
            else:  # RESYNC
                self._state = START
        return pos

    def _oversized(self, out: list[object | FramingError]) -> None:
        """A token in progress outgrew the limit: drop it and the message, lex on afresh."""
        self._token_text.clear()
        self._state = START
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
        if kind <= RSQUARE:
            if kind == LCURLY:
                self._braces += 1
            elif kind == RCURLY:
                self._braces -= 1
            elif kind == LSQUARE:
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
            result = FramingError(ERR_PREFIX + "premature EOI")
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
                if kind == COLON:
                    frame[1] = _OBJ_VALUE
                else:
                    self._error = FramingError(ERR_PREFIX + "missing : in object pair")
                return
            if phase in (_OBJ_NEXT, _ARR_NEXT):
                in_object = phase == _OBJ_NEXT
                if kind == COMMA:
                    frame[1] = _OBJ_KEY if in_object else _ARR_VALUE
                elif kind == (RCURLY if in_object else RSQUARE):
                    self._close()
                else:
                    where = "dict" if in_object else "list"
                    self._error = FramingError(f"{ERR_PREFIX}expected separator in {where}")
                return
            if (phase == _OBJ_OPEN and kind == RCURLY) or (
                phase == _ARR_OPEN and kind == RSQUARE
            ):
                self._close()
                return
        # A value (or an object key, which is parsed as any value and then checked) starts.
        value: object
        if kind == LCURLY:
            stack.append([{}, _OBJ_OPEN, None])
            return
        if kind == LSQUARE:
            stack.append([[], _ARR_OPEN, None])
            return
        if kind == STRING:
            value = string_value(token)
        elif kind in (INT, FLOAT):
            value = number_value(token, kind)
        elif kind == KEYWORD:
            if token in KEYWORDS:
                value = KEYWORDS[token]
            else:
                # QEMU formats the complaint into 1024 bytes, NUL included.
                complaint = f"invalid keyword '{token.decode('ascii')}'"[:1023]
                value = FramingError(ERR_PREFIX + complaint)
        else:
            value = FramingError(ERR_PREFIX + "expecting value")
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
                self._error = FramingError(ERR_PREFIX + "key is not a string in object")
                return
            frame[2] = value
            frame[1] = _OBJ_COLON
        elif phase == _OBJ_VALUE:
            members = frame[0]
            assert type(members) is dict
            if frame[2] in members:
                self._error = FramingError(ERR_PREFIX + "duplicate key")
                return
            members[frame[2]] = value
            frame[1] = _OBJ_NEXT
        else:
            items = frame[0]
            assert type(items) is list
            items.append(value)
            frame[1] = _ARR_NEXT
