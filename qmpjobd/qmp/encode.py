"""Write one QMP message: ASCII-only JSON and a CRLF, as QEMU's monitor sends it.

`encode` is on every reply's path, so it lets orjson do the work whenever orjson's output is
already what QMP needs (ASCII, which is nearly always).  orjson cannot write integers beyond 64
bits, nesting deeper than 255, or escape non-ASCII characters; those messages go through the
project's JSON writer (qobject.py), which also produces `encode_pretty`'s layout (QEMU's
`pretty=on`) and escapes strings as QEMU does.

Values are JSON values as the framing layer produces them: dict (str keys), list (or tuple), str,
int, float, bool and None.  On orjson's path the few control characters are escaped as orjson
does; the text is the same JSON either way.
"""

from __future__ import annotations

import orjson

from ..qobject import write_json

__all__ = ["encode", "encode_pretty"]


def encode(message: object) -> bytes:
    """One message as ASCII JSON followed by CRLF."""
    try:
        text = orjson.dumps(message)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, deep nesting, or not JSON
        pass
    else:
        if text.isascii():
            return text + b"\r\n"
    return (write_json(message) + "\r\n").encode("ascii")


def encode_pretty(message: object) -> bytes:
    """One message laid out as QEMU's `--monitor ...,pretty=on` does, followed by CRLF."""
    return (write_json(message, pretty=True) + "\r\n").encode("ascii")
