"""The errors of the schema compiler: an invalid schema, arguments QEMU's input visitor refuses,
and a command-line option value (key=value syntax) that cannot be converted."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .source import SourceInfo


class QapiError(Exception):
    """An invalid schema. str() gives the complete message, location first, as QEMU words it."""

    def __init__(self, info: SourceInfo | None, msg: str, col: int | None = None) -> None:
        super().__init__(msg)
        self.info = info
        self.msg = msg
        self.col = col

    def __str__(self) -> str:
        if self.info is None:
            return self.msg
        loc = str(self.info)
        if self.col is not None:
            loc += f":{self.col}"
        return f"{loc}: {self.msg}"


class ArgumentError(Exception):
    """Arguments that QEMU's input visitor rejects; `desc` is its message (GenericError)."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class KeyvalError(ValueError):
    """A key=value option that QEMU's keyval parser refuses; str() is its message."""
