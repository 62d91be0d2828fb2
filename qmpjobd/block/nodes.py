"""blockdev-add's options -> a node, with QEMU's checks and messages.

Options arrive as the checked BlockdevOptions object, keyed by the schema's member names.
"""

from __future__ import annotations

from typing import Any

from .drivers.base import Node
from .drivers.null import NullNode
from .graph import BlockError, BlockGraph

SECTOR = 512
# The largest length QEMU's block layer can address: INT64_MAX rounded down to a multiple of
# the largest request (2^31 - 512 bytes).
MAX_LENGTH = ((1 << 63) - 1) // (2147483136) * 2147483136
NULL_DEFAULT_SIZE = 1 << 30


def sectors_up(size: int) -> int:
    return -(-size // SECTOR) * SECTOR


def open_node(graph: BlockGraph, options: dict[str, Any]) -> Node:
    """Create the node OPTIONS describe, checking its name against GRAPH (not adding it)."""
    name = options.get("node-name")
    if name is None:
        raise BlockError("'node-name' must be specified for the root node")
    graph.check_new_name(name)
    driver = options["driver"]
    if driver == "null-co":
        return _null(name, options)
    raise BlockError(f"Unknown driver '{driver}'")


def _null(name: str, options: dict[str, Any]) -> Node:
    size = options.get("size", NULL_DEFAULT_SIZE)
    if size < 0:
        # QSD 7.2 aborts here (docs/compat.md); this is the message it prints as it dies.
        raise BlockError("Parameter 'size' expects a non-negative number below 2^64")
    latency = options.get("latency-ns", 0)
    if latency < 0:
        raise BlockError("latency-ns is invalid")
    length = sectors_up(size)
    if length > MAX_LENGTH:
        raise BlockError("Could not refresh total sector count: File too large")
    node = NullNode(name, length, options.get("read-zeroes", False), latency)
    node.read_only = options.get("read-only", False)
    return node
