"""block-commit on a node without a backing file: QEMU's checks, in QEMU's order. Without a
backing chain every commit that gets past them would commit an image into itself."""

from __future__ import annotations

from ..drivers.base import Node
from ..graph import BlockError, BlockGraph, DeviceNotFound


def _find_node(graph: BlockGraph, name: str) -> Node:
    try:
        return graph.find(name)
    except BlockError:
        raise BlockError(f"Cannot find device='' nor node-name='{name}'") from None


def _filename(node: Node) -> str | None:
    while node is not None:
        name = getattr(node, "filename", None)
        if isinstance(name, str):
            return name
        if node.child is None:
            return None
        node = node.child
    return None


def check_commit(
    graph: BlockGraph, device: str, *, top: str | None, top_node: str | None,
    base: str | None, base_node: str | None,
) -> None:
    """Raise the error QSD gives for this block-commit (there is always one here)."""
    try:
        node = graph.find(device)
    except BlockError:
        raise DeviceNotFound(f"Device '{device}' not found") from None
    node.check_mirror_source()
    if top_node is not None and top is not None:
        raise BlockError("'top-node' and 'top' are mutually exclusive")
    if top_node is not None:
        top_bs = _find_node(graph, top_node)
    elif top is not None:
        if top != _filename(node):
            raise BlockError(f"Top image file {top} not found")
        top_bs = node
    else:
        top_bs = node
    if top_bs is not node:
        raise BlockError(f"'{top_bs.name}' is not in this backing file chain")
    if base_node is not None and base is not None:
        raise BlockError("'base-node' and 'base' are mutually exclusive")
    if base_node is not None:
        base_bs = _find_node(graph, base_node)
        if base_bs is not node:
            raise BlockError(f"'{base_bs.name}' is not in this backing file chain")
    elif base is not None:
        raise BlockError(f"Can't find '{base}' in the backing chain")
    raise BlockError("cannot commit an image into itself")
