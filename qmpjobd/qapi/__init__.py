"""The QAPI schema compiler.

Pure: it reads schema files and answers questions about them; it imports nothing else from
qmpjobd (but the base module, qobject.py), opens no sockets and runs no event loop.
`load_schema()` is the entry point. The names below load on first use, so that a light module
of the package (keyval.py, errors.py) can be imported without the schema model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import QapiError
    from .schema import Schema, load_schema

__all__ = ["QapiError", "Schema", "load_schema"]
_HOMES = {"QapiError": ".errors", "Schema": ".schema", "load_schema": ".schema"}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home, __name__), name)
