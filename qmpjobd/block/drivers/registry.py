"""The drivers a node may be opened with, by name: blockdev-add's `driver`.

A driver is a module (or package) with its node class and its open function, declared by a
`Driver` and listed here; nothing else switches on driver names.
"""

from __future__ import annotations

from typing import Final

from ..errors import BlockError
from . import file, null, raw
from .base import Driver
from .qcow2 import node as qcow2
from .qcow2.node import probe_format as probe_format

DRIVERS: Final[dict[str, Driver]] = {
    d.name: d for d in (file.DRIVER, raw.DRIVER, null.DRIVER, qcow2.DRIVER)
}


def driver(name: str) -> Driver:
    found = DRIVERS.get(name)
    if found is None:
        raise BlockError(f"Unknown driver '{name}'")
    return found
