"""The values of QEMU's JSON tokens: strings, numbers, keywords, and the complaints about them.

Strings are QEMU's "modified UTF-8" (U+0000 may be written as C0 80; noncharacters, surrogates
and overlong forms are invalid); the same decoding, in lossy form, turns error messages holding
raw input bytes into text as QEMU's JSON writer would (U+FFFD per bad sequence). Integers keep
their exact value; numbers QEMU would turn into an infinite double are an error (docs/compat.md).
"""

from __future__ import annotations

import re
from typing import Final

from .errors import FramingError
from .lexer import INT

# Our own limit: Python refuses to convert longer digit strings (sys.int_info), and such a number
# is beyond the range of the double QEMU would have made of it anyway.
MAX_INT_DIGITS: Final = 4300

ERR_PREFIX: Final = "JSON parse error, "
OUT_OF_RANGE: Final = "JSON parse error, number out of range"

_NONCHARACTERS: Final = [*range(0xFDD0, 0xFDF0)] + [
    plane << 16 | low for plane in range(17) for low in (0xFFFE, 0xFFFF)
]
_NONCHAR_TEXT: Final = re.compile("[" + "".join(map(chr, _NONCHARACTERS)) + "]")
# The same in UTF-8, for text orjson has already checked to be valid UTF-8 (so these lead bytes
# start characters): U+FDD0..U+FDEF, U+FFFE/F and U+xFFFE/F in the other planes.
NONCHAR_UTF8: Final = re.compile(
    rb"\xef\xb7[\x90-\xaf]|\xef\xbf[\xbe\xbf]|[\xf0-\xf4][\x8f\x9f\xaf\xbf]\xbf[\xbe\xbf]"
)
_SMALLEST: Final = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)  # by sequence length - 2


def valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    return not (0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE)


def mod_utf8(data: bytes, lossy: bool) -> str | None:
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
                if valid_codepoint(value) and not overlong:
                    cp = value
        if cp < 0:
            if not lossy:
                return None
            cp = 0xFFFD
        chars.append(chr(cp))
    return "".join(chars)


def message_text(raw: bytes) -> str:
    """An error message holding input bytes, as it reads once QEMU has written it as JSON."""
    if raw.isascii():
        return raw.decode("ascii")
    text = mod_utf8(raw, lossy=True)
    assert text is not None
    return text


def plain_text(raw: bytes) -> str | None:
    """A stretch of string body without escapes; None if QEMU would call it invalid UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return mod_utf8(raw, lossy=False)  # C0 80 is valid for QEMU, not for Python
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


def string_value(token: bytes) -> str | FramingError:
    """The value of a string token (quotes included), or QEMU's complaint about it."""
    body = token[1:-1]
    if b"\\" not in body:
        if body.isascii():
            return body.decode("ascii")
        plain = plain_text(body)
        return INVALID_UTF8 if plain is None else plain
    parts: list[str] = []
    i, end = 1, len(token) - 1
    while i < end:
        slash = token.find(b"\\", i, end)
        stop = end if slash < 0 else slash
        if stop > i:
            plain = plain_text(token[i:stop])
            if plain is None:
                return INVALID_UTF8
            parts.append(plain)
        if slash < 0:
            break
        kind = token[slash + 1]
        if kind != ord("u"):
            simple = _SIMPLE_ESCAPES.get(kind)
            if simple is None:
                return FramingError(ERR_PREFIX + "invalid escape sequence in string")
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
        if not valid_codepoint(cp):
            quoted = token[slash : min(i, len(token))]
            complaint = message_text(quoted) + " is not a valid Unicode character"
            return FramingError(ERR_PREFIX + complaint)
        parts.append(chr(cp))
    return "".join(parts)


INVALID_UTF8: Final = FramingError(ERR_PREFIX + "invalid UTF-8 sequence in string")


def number_value(token: bytes, kind: int) -> int | float | FramingError:
    if kind == INT:
        if len(token) - (token[0] == ord("-")) > MAX_INT_DIGITS:
            return FramingError(OUT_OF_RANGE)
        try:
            return int(token)
        except ValueError:  # the interpreter's digit limit was lowered below ours
            return FramingError(OUT_OF_RANGE)
    value = float(token)
    if value in (float("inf"), float("-inf")):
        return FramingError(OUT_OF_RANGE)
    return value


KEYWORDS: Final[dict[bytes, object]] = {b"true": True, b"false": False, b"null": None}
