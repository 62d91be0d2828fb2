"""Backing chains: finding a command's top, base and bottom nodes in the chain below a device,
with QEMU's checks in QEMU's order and words; and what the layers of a chain hold.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import trio

from .drivers.base import Node
from .drivers.filenames import filename
from .errors import BlockError, DeviceNotFound
from .graph import BlockGraph


def _filename(node: Node) -> str | None:
    """The name of the image file below NODE, if its bytes live in one."""
    host = node.host_extent(0, 0)
    return host.file.filename if host is not None else None


class CommitPlan(NamedTuple):
    """What block-commit merges: TOP and the images below it down to BASE_OVERLAY (included)
    into BASE. OVERLAY is the image whose backing file TOP is, whose header then names BASE
    (by BACKING_FILE, or the base's file name); None for an active commit (TOP is the device's
    own image), which mirrors instead and stays READY until completed."""

    top: Node
    base: Node
    base_overlay: Node
    overlay: Node | None
    backing_file: str | None


def plan_commit(
    graph: BlockGraph, device: str, *, top: str | None, top_node: str | None,
    base: str | None, base_node: str | None, backing_file: str | None,
) -> CommitPlan:
    """block-commit's checks of its nodes against the device's chain, in QEMU's order and
    words (blockdev.c, qmp_block_commit)."""
    try:
        node = graph.find(device)
    except BlockError:
        raise DeviceNotFound(f"Device '{device}' not found") from None
    if node.parents:
        raise BlockError("Need a root block node")
    node.check_mirror_source()
    chain = [node, *below(node)]
    top_bs: Node | None = node
    if top_node is not None and top is not None:
        raise BlockError("'top-node' and 'top' are mutually exclusive")
    if top_node is not None:
        top_bs = graph.lookup_node(top_node)
        if top_bs not in chain:
            raise BlockError(f"'{top_node}' is not in this backing file chain")
    elif top and top != filename(node):
        top_bs = find_backing_image(node, top)
    if top_bs is None:
        raise BlockError(f"Top image file {top} not found")
    top_chain = chain[chain.index(top_bs):]
    if base_node is not None and base is not None:
        raise BlockError("'base-node' and 'base' are mutually exclusive")
    if base_node is not None:
        base_bs = graph.lookup_node(base_node)
        if base_bs not in top_chain:
            raise BlockError(f"'{base_node}' is not in this backing file chain")
    elif base:
        found = find_backing_image(top_bs, base)
        if found is None:
            raise BlockError(f"Can't find '{base}' in the backing chain")
        base_bs = found
    else:
        base_bs = top_chain[-1]
    for image in top_chain[: top_chain.index(base_bs) + 1]:
        image.check_target()
    if top_bs is base_bs:
        raise BlockError("cannot commit an image into itself")
    base_overlay = top_chain[top_chain.index(base_bs) - 1]
    if top_bs is node:
        if backing_file is not None:
            raise BlockError("'backing-file' specified, but 'top' is the active layer")
        return CommitPlan(top_bs, base_bs, base_overlay, None, None)
    overlay = chain[chain.index(top_bs) - 1]
    overlay.check_target()
    return CommitPlan(top_bs, base_bs, base_overlay, overlay, backing_file)


def below(node: Node) -> list[Node]:
    """The backing chain under NODE, nearest first (NODE not included)."""
    found = []
    current = node.backing
    while current is not None:
        found.append(current)
        current = current.backing
    return found


def find_backing_image(node: Node, name: str) -> Node | None:
    """The image in NODE's chain that NAME designates (QEMU's bdrv_find_backing_image): the
    name its overlay's header gives it, or a path to the same file."""
    overlay = node
    for image in below(node):
        named = getattr(getattr(overlay, "image", None), "header", None)
        if named is not None and named.backing_file == name:
            return image
        own = _filename(image) or image.exact_filename()
        if own and (own == name or os.path.realpath(own) == os.path.realpath(name)):
            return image
        overlay = image
    return None


class StreamPlan(NamedTuple):
    """What block-stream copies: into TOP, what the chain holds down to BASE_OVERLAY (included);
    BASE is what TOP's backing file becomes (None: no backing file)."""

    top: Node
    base_overlay: Node
    base: Node | None
    backing_file: str | None


def plan_stream(
    graph: BlockGraph, node: Node, device: str, *, base: str | None, base_node: str | None,
    bottom: str | None, backing_file: str | None,
) -> StreamPlan:
    """block-stream's checks of its base, bottom and backing file against NODE's chain, in
    QEMU's order and words."""
    if base is not None and base_node is not None:
        raise BlockError("'base' and 'base-node' cannot be specified at the same time")
    if base is not None and bottom is not None:
        raise BlockError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise BlockError("'bottom' and 'base-node' cannot be specified at the same time")
    chain = below(node)
    base_bs: Node | None = None
    if base is not None:
        base_bs = find_backing_image(node, base)
        if base_bs is None:
            raise BlockError(f"Can't find '{base}' in the backing chain")
    if base_node is not None:
        base_bs = graph.lookup_node(base_node)
        if base_bs not in chain:
            raise BlockError(f"Node '{base_node}' is not a backing image of '{device}'")
    bottom_bs: Node | None = None
    if bottom is not None:
        bottom_bs = graph.lookup_node(bottom)
        if bottom_bs is not node and bottom_bs not in chain:
            raise BlockError(f"Node '{bottom}' is not in a chain starting from '{device}'")
    # The nodes the stream reads from must not be written by a job.
    end = bottom_bs.backing if bottom_bs is not None else base_bs
    for image in [node, *chain]:
        if image is end:
            break
        image.check_backup_source()
    if base_bs is None and backing_file is not None:
        raise BlockError("backing file specified, but streaming the entire chain")
    if bottom_bs is not None:
        return StreamPlan(node, bottom_bs, bottom_bs.backing, None)
    overlay = node
    for image in chain:
        if image is base_bs:
            break
        overlay = image
    return StreamPlan(node, overlay, base_bs, backing_file)


def allocated_above(top: Node, bottom: Node, offset: int, length: int) -> tuple[bool, int]:
    """Whether the first bytes of [OFFSET, OFFSET+LENGTH) are allocated in a layer from TOP
    down to BOTTOM (included), and for how many bytes that holds: QEMU's
    bdrv_is_allocated_above. A layer that ends before OFFSET counts as allocated (it reads as
    zeroes there). Blocking: a worker thread's."""
    layer: Node | None = top
    while layer is not None:
        if offset >= layer.size:
            return True, length
        held, n = layer.allocation(offset, min(length, layer.size - offset))
        if held:
            return True, n
        length = n
        if layer is bottom:
            break
        layer = layer.backing
    return False, length


async def drop_intermediate(
    graph: BlockGraph, overlay: Node, base: Node | None, backing_file: str | None
) -> None:
    """OVERLAY falls through to BASE from now on, and its header says so (QEMU's
    bdrv_drop_intermediate, after a stream or a commit): BACKING_FILE, or the base's file name,
    and the base's format; no backing file if BASE is None. An overlay opened read-only is
    written for the time it takes, as QEMU reopens it. The images between, if the chain
    opened them from headers, are closed."""
    name = fmt = None
    if base is not None:
        name = backing_file or filename(base)
        fmt = base.driver

    def rewrite() -> None:
        was_read_only = overlay.read_only
        if was_read_only:
            overlay.reopen(False)
        try:
            overlay.set_backing_file(name, fmt)
        finally:
            if was_read_only:
                overlay.reopen(True)

    if base is not None and not base.read_only:
        # What a commit wrote into the base is on disk before the overlay's header makes the
        # base what the chain reads: a crash between the two must not lose it.
        await base.flush()
    await trio.to_thread.run_sync(rewrite)
    with trio.CancelScope(shield=True):
        for node in graph.replace_backing(overlay, base):
            await node.close()
