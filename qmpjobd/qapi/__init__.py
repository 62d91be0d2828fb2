"""The QAPI schema compiler.

Pure: it reads schema files and answers questions about them; it imports nothing else from
qmpjobd, opens no sockets and runs no event loop. `load_schema()` is the entry point.
"""

from .errors import QapiError
from .schema import Schema, load_schema

__all__ = ["QapiError", "Schema", "load_schema"]
