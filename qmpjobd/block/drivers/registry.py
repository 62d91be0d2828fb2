"""The drivers a node may be opened with, by name: blockdev-add's `driver`.

A driver is a module (or package) with its node class and its open function, declared by a
`Driver` and listed here; nothing else switches on driver names.

A driver's module is imported the first time the driver is asked for: most daemons never open
a qcow2 image, and the qcow2 driver's import was an eighth of the daemon's own start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Final

from ..errors import BlockError
from .base import Driver

# Name -> the module whose DRIVER it is.
_MODULES: Final = {
    "file": ".file", "raw": ".raw", "null-co": ".null", "qcow2": ".qcow2.node",
}


class _Drivers(Mapping[str, Driver]):
    def __getitem__(self, name: str) -> Driver:
        declared: Driver = importlib.import_module(_MODULES[name], __package__).DRIVER
        return declared

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


DRIVERS: Final[Mapping[str, Driver]] = _Drivers()


def driver(name: str) -> Driver:
    if name not in _MODULES:
        raise BlockError(f"Unknown driver '{name}'")
    return DRIVERS[name]


def probe_format(path: str) -> str:
    """The format of the image at PATH, as its first bytes say: qcow2 or raw. Blocking."""
    from .qcow2.node import probe_format as probe

    return probe(path)
