"""QEMU's JSON lexer as tables: bytes -> tokens, with QEMU's error recovery.

A table-driven state machine fed one byte at a time (framing.py drives it), except that runs of
bytes that leave the state unchanged (string bodies, digits, letters, whitespace, bytes skipped
while recovering) are consumed by one regular-expression match: RUNS has one for each state.
Only the table lives here; what a token means is tokens.py's, where a message ends framing.py's.
"""

from __future__ import annotations

import re
from typing import Final

(
    START,
    RECOVERY,
    DQ,
    DQ_ESC,
    SQ,
    SQ_ESC,
    ZERO,
    SIGN,
    DIGITS,
    FRAC_DOT,
    FRAC,
    EXP_MARK,
    EXP_SIGN,
    EXP,
    WORD,
) = range(15)

LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, INT, FLOAT, KEYWORD, STRING = range(10)

# A table entry is one of:
#   a state number        consume the byte (keeping it in the token, except in START and
#                         RECOVERY, which hold no token) and move to that state;
#   EMIT + type          consume the byte, and the token (with it) is complete;
#   ENDS + type          the token ended before this byte: emit it, then look at the byte
#                         again in START;
#   STRAY                consume the byte: the token so far, with it, is an error; recover;
#   RESYNC               stop recovering: look at the byte again in START.
EMIT: Final = 16
ENDS: Final = 32
STRAY: Final = 48
RESYNC: Final = 49


def _build_table() -> tuple[tuple[int, ...], ...]:
    rows = [[STRAY] * 256 for _ in range(15)]

    def put(state: int, chars: bytes | range, action: int) -> None:
        for ch in chars:
            rows[state][ch] = action

    digits, nonzero, letters = b"0123456789", b"123456789", range(ord("a"), ord("z") + 1)
    # Bytes allowed in a string or after a backslash: not control characters, and not 0xFE
    # and 0xFF, which can never occur in UTF-8.
    text = range(0x20, 0xFE)

    put(START, b" \t\r\n", START)
    for ch, token in zip(b"{}[]:,", range(6), strict=True):
        put(START, bytes([ch]), EMIT + token)
    put(START, b'"', DQ)
    put(START, b"'", SQ)
    put(START, b"0", ZERO)
    put(START, nonzero, DIGITS)
    put(START, b"-", SIGN)
    put(START, letters, WORD)

    # After an error, skip to something a message could plausibly resume at: a structural
    # character, a line ending, or a control character (which clients send on purpose to get
    # the parser into a known state).  Tab is skipped like any other byte.
    put(RECOVERY, range(256), RECOVERY)
    put(RECOVERY, range(0x20), RESYNC)
    put(RECOVERY, b"\t", RECOVERY)
    put(RECOVERY, b"\xfe\xff[]{}:,", RESYNC)

    for body, escape, quote in ((DQ, DQ_ESC, b'"'), (SQ, SQ_ESC, b"'")):
        put(body, text, body)
        put(body, b"\\", escape)
        put(body, quote, EMIT + STRING)
        put(escape, text, body)  # the parser, not the lexer, judges the escaped character

    # Numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?, ending at the first byte that
    # cannot continue them; a byte that breaks one in the middle is part of the error token.
    put(SIGN, b"0", ZERO)
    put(SIGN, nonzero, DIGITS)
    put(ZERO, range(256), ENDS + INT)
    put(ZERO, digits, STRAY)
    put(ZERO, b".", FRAC_DOT)
    put(DIGITS, range(256), ENDS + INT)
    put(DIGITS, digits, DIGITS)
    put(DIGITS, b".", FRAC_DOT)
    put(DIGITS, b"eE", EXP_MARK)
    put(FRAC_DOT, digits, FRAC)
    put(FRAC, range(256), ENDS + FLOAT)
    put(FRAC, digits, FRAC)
    put(FRAC, b"eE", EXP_MARK)
    put(EXP_MARK, b"+-", EXP_SIGN)
    put(EXP_MARK, digits, EXP)
    put(EXP_SIGN, digits, EXP)
    put(EXP, range(256), ENDS + FLOAT)
    put(EXP, digits, EXP)

    # Any run of lowercase letters is a keyword token; the parser rejects unknown ones.
    put(WORD, range(256), ENDS + KEYWORD)
    put(WORD, letters, WORD)
    return tuple(tuple(row) for row in rows)


TABLE: Final = _build_table()


def _self_loop_runs() -> tuple[re.Pattern[bytes] | None, ...]:
    """For each state, a regex matching a run of bytes that keep the lexer in that state."""
    runs: list[re.Pattern[bytes] | None] = []
    for state, row in enumerate(TABLE):
        chars = [ch for ch in range(256) if row[ch] == state]
        if not chars:
            runs.append(None)
            continue
        body = b"".join(re.escape(bytes([ch])) for ch in chars)
        runs.append(re.compile(b"[" + body + b"]+"))
    return tuple(runs)


RUNS: Final = _self_loop_runs()
