"""blockdev-add's options -> a node, through the driver registry, with QEMU's checks.

Options arrive as the checked BlockdevOptions object, keyed by the schema's member names. The
driver's own checks and messages are in its module (drivers/); what is common to every node is
here: the node name, the room left under the node limit, and the names of inline children.
"""

from __future__ import annotations

from typing import Any

import trio

from .drivers.base import Node, Opener
from .drivers.registry import driver
from .errors import BlockError
from .graph import BlockGraph


async def open_node(graph: BlockGraph, options: dict[str, Any]) -> Node:
    """Create the node OPTIONS describe, checking its names against GRAPH (not adding it; the
    graph's add registers the node and its inline child)."""
    name = options.get("node-name")
    if name is None:
        raise BlockError("'node-name' must be specified for the root node")
    graph.check_new_name(name)
    graph.check_room(2 if isinstance(options.get("file"), dict) else 1)  # an inline child too
    return await _GraphOpener(graph).open(name, options, {})


async def open_internal(graph: BlockGraph, options: dict[str, Any]) -> Node:
    """A node the daemon opens for itself (a drive-* target): generated names, not added."""
    return await _GraphOpener(graph).open(graph.generated_name(), options, {})


def graph_opener(graph: BlockGraph) -> Opener:
    """The drivers' view of GRAPH, for a driver that opens nodes outside blockdev-add
    (blockdev-create's `file`)."""
    return _GraphOpener(graph)


class _GraphOpener:
    """The drivers' view of the graph while they open a node (drivers/base.py's Opener)."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph

    async def open(self, name: str, options: dict[str, Any], inherited: dict[str, Any]) -> Node:
        node = await driver(options["driver"]).open(self, name, options, inherited)
        node.options = options
        return node

    def lookup(self, name: str) -> Node:
        return self.graph.lookup(name)

    async def open_child(
        self, parent: str, options: dict[str, Any], inherited: dict[str, Any]
    ) -> Node:
        name = options.get("node-name")
        if name is None:
            name = self.graph.generated_name()
        else:
            self.graph.check_new_name(name)
            if name == parent:
                raise BlockError(f"Duplicate nodes with node-name='{name}'")
        return await self.open(name, options, inherited)


async def add_node(graph: BlockGraph, options: dict[str, Any]) -> None:
    """blockdev-add: open the node and add it to GRAPH."""
    node = await open_node(graph, options)
    try:
        graph.add(node)  # the name may have been taken while the node opened
    except BlockError:
        with trio.CancelScope(shield=True):
            await node.close()
        raise


async def delete_node(graph: BlockGraph, name: str) -> None:
    """blockdev-del: QEMU flushes a node before it lets go of it; the nodes it owns go with
    it. Once the node has left the graph it is closed whatever happens (a failed
    flush, a cancelled call)."""
    node = graph.remove(name)
    try:
        await node.flush()
    finally:
        with trio.CancelScope(shield=True):
            await close_with_owned(node)


async def close_with_owned(node: Node) -> None:
    """Close NODE, then the nodes it owns, parents before children."""
    owned = node.owned()
    await node.close()
    for below in owned:
        await below.close()
