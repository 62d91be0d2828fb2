"""The error every handler and protocol check raises: a QMP error class and its description."""

from __future__ import annotations


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
