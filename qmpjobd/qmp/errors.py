"""The protocol's errors: the QMP error every handler and protocol check raises (a class and its
description), and the framing error a malformed input becomes."""

from __future__ import annotations

from typing import NamedTuple


class QmpError(Exception):
    """Becomes `{"error": {"class": cls, "desc": desc}}` on the wire.

    The classes are QEMU's: GenericError for nearly everything, CommandNotFound,
    DeviceNotActive, DeviceNotFound, KVMMissingCap.
    """

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc

    def to_wire(self) -> dict[str, str]:
        return {"class": self.cls, "desc": self.desc}

    def __repr__(self) -> str:
        return f"QmpError({self.cls!r}, {self.desc!r})"


def generic(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


class FramingError(NamedTuple):
    """A syntax error or a limit hit in the input: a value the splitter yields in place of a
    message. QMP answers it with a GenericError carrying `desc`."""

    desc: str
