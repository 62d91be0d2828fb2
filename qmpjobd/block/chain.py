"""Backing chains: finding a command's top, base and bottom nodes in the chain below a device.

No driver here has backing files yet, so every chain is one node long: QEMU's checks
still run, in QEMU's order, with QEMU's messages, and decide which error a command gets
(block-commit always gets one: it would commit an image into itself).
"""

from __future__ import annotations

from .drivers.base import Node
from .errors import BlockError, DeviceNotFound
from .graph import BlockGraph


def _filename(node: Node) -> str | None:
    """The name of the image file below NODE, if its bytes live in one."""
    host = node.host_extent(0, 0)
    return host.file.filename if host is not None else None


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
        top_bs = graph.lookup_node(top_node)
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
        base_bs = graph.lookup_node(base_node)
        if base_bs is not node:
            raise BlockError(f"'{base_bs.name}' is not in this backing file chain")
    elif base is not None:
        raise BlockError(f"Can't find '{base}' in the backing chain")
    raise BlockError("cannot commit an image into itself")


def check_stream(
    graph: BlockGraph, node: Node, device: str, *, base: str | None, base_node: str | None,
    bottom: str | None, backing_file: str | None,
) -> None:
    """block-stream's checks of its base, bottom and backing file against NODE's chain (with
    no backing file, the whole chain is NODE: only a stream of all of it gets through)."""
    if base is not None and base_node is not None:
        raise BlockError("'base' and 'base-node' cannot be specified at the same time")
    if base is not None and bottom is not None:
        raise BlockError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise BlockError("'bottom' and 'base-node' cannot be specified at the same time")
    if base is not None:
        raise BlockError(f"Can't find '{base}' in the backing chain")
    if base_node is not None:
        graph.lookup_node(base_node)
        raise BlockError(f"Node '{base_node}' is not a backing image of '{device}'")
    if bottom is not None and graph.lookup_node(bottom) is not node:
        raise BlockError(f"Node '{bottom}' is not in a chain starting from '{device}'")
    if backing_file is not None:
        raise BlockError("backing file specified, but streaming the entire chain")
