"""blockdev-add's options -> a node, with QEMU's checks and messages.

Options arrive as the checked BlockdevOptions object, keyed by the schema's member names.
"""

from __future__ import annotations

import itertools
import os
import random
from typing import Any

import trio

from .drivers.base import Node
from .drivers.file import FileNode, open_file
from .drivers.null import NullNode
from .drivers.raw import RawNode
from .graph import BlockError, BlockGraph

SECTOR = 512
# The largest length QEMU's block layer can address: INT64_MAX rounded down to a multiple of
# the largest request (2^31 - 512 bytes).
MAX_LENGTH = ((1 << 63) - 1) // (2147483136) * 2147483136
NULL_DEFAULT_SIZE = 1 << 30


def sectors_up(size: int) -> int:
    return -(-size // SECTOR) * SECTOR


# Inline children without a node-name get one as QEMU makes them: '#block', a counter of three
# or more digits and two random ones; tests normalise them.
_generated = itertools.count(1)


def generated_name() -> str:
    return f"#block{next(_generated):03d}{random.randrange(100):02d}"


async def open_node(graph: BlockGraph, options: dict[str, Any]) -> Node:
    """Create the node OPTIONS describe, checking its names against GRAPH (not adding it; the
    graph's add registers the node and its inline child)."""
    name = options.get("node-name")
    if name is None:
        raise BlockError("'node-name' must be specified for the root node")
    graph.check_new_name(name)
    graph.check_room(2 if isinstance(options.get("file"), dict) else 1)  # an inline child too
    return await _open(graph, name, options, {})


async def _open(
    graph: BlockGraph, name: str, options: dict[str, Any], inherited: dict[str, Any]
) -> Node:
    driver = options["driver"]
    node: Node
    if driver == "null-co":
        node = _null(name, options)
    elif driver == "file":
        node = await _file(name, options, inherited)
    elif driver == "raw":
        node = await _raw(graph, name, options, inherited)
    else:
        raise BlockError(f"Unknown driver '{driver}'")
    node.options = options
    return node


async def _file(name: str, options: dict[str, Any], inherited: dict[str, Any]) -> Node:
    discard = options.get("discard", "ignore") == "unmap"
    if options.get("detect-zeroes") == "unmap" and not discard:
        raise BlockError(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to "
            "unmap"
        )
    cache = {**inherited.get("cache", {}), **options.get("cache", {})}
    direct = cache.get("direct", False)
    if options.get("aio") == "native" and not direct:
        raise BlockError(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
        )
    filename = options["filename"]
    fd, read_only = await trio.to_thread.run_sync(
        lambda: open_file(
            name, filename, read_only=options.get("read-only", inherited.get("read-only", False)),
            auto_read_only=options.get("auto-read-only", False), direct=direct,
        )
    )
    try:
        # locking=auto: QEMU locks wherever the file system has OFD locks (every Linux one).
        return FileNode(
            name, fd, filename, read_only=read_only, no_flush=cache.get("no-flush", False),
            direct=direct, discard=discard, locking=options.get("locking", "auto") != "off",
        )
    except BaseException:
        os.close(fd)
        raise


async def _raw(
    graph: BlockGraph, name: str, options: dict[str, Any], inherited: dict[str, Any]
) -> Node:
    ref = options["file"]
    read_only = options.get("read-only", inherited.get("read-only", False))
    if isinstance(ref, str):
        child = graph.lookup(ref)
        inline = False
    else:
        child_name = ref.get("node-name")
        if child_name is None:
            child_name = generated_name()
        else:
            graph.check_new_name(child_name)
            if child_name == name:
                raise BlockError(f"Duplicate nodes with node-name='{child_name}'")
        # An inline child takes its parent's read-only and cache settings unless it has its own.
        cache = {**inherited.get("cache", {}), **options.get("cache", {})}
        child = await _open(graph, child_name, ref, {"read-only": read_only, "cache": cache})
        inline = True
    try:
        offset = options.get("offset", 0)
        if offset < 0:
            raise BlockError("Parameter 'offset' expects a non-negative number below 2^64")
        has_size = "size" in options
        size = options.get("size", 0)
        if size < 0:
            raise BlockError("Parameter 'size' expects a non-negative number below 2^64")
        real = child.size
        if offset > real:
            raise BlockError(
                f"Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )
        if has_size and real - offset < size:
            # QEMU's message has the double space.
            raise BlockError(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to "
                f"the  actual size of the containing file ({real})"
            )
        if has_size and size % SECTOR:
            raise BlockError(f"Specified size is not multiple of {SECTOR}")
    except BaseException:
        if inline:
            await child.close()
        raise
    node = RawNode(name, child, offset, sectors_up(size if has_size else real - offset), read_only)
    child.monitor_owned = not inline
    return node


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
