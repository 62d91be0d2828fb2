"""query-named-block-nodes: what QSD 7.2 says about each node (a BlockDeviceInfo).

Most members are constants for the drivers qmpjobd has (no I/O limits, write thresholds or
encryption). The ones that are not:

- the file name (filenames.py);
- options an inline child takes from its parent when it does not set them (read-only,
  cache.direct, cache.no-flush; detect-zeroes is not inherited);
- a qcow2 node's backing file: its node's file name, and (unless `flat`) the depth of the
  chain and each backing node's image nested in its parent's (`backing-image`);
- the dirty bitmaps that jobs keep on their source: a backup's copy bitmap (the bytes not yet
  copied, not recording) and a mirror's dirty bitmap (recording) until the job is finalized.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import trio

from ..jobs.job import Job
from .drivers.base import Node
from .drivers.filenames import filename
from .jobs.blockjob import BlockJob


async def named_block_nodes(
    nodes: list[Node], jobs: list[Job], *, flat: bool = False
) -> list[dict[str, Any]]:
    """A BlockDeviceInfo for each of NODES (newest first, the order QEMU lists them in).
    JOBS are the daemon's jobs, newest first. FLAT leaves out each image's backing chain (its
    `backing-image`s, and the depth of the chain)."""
    sizes = await trio.to_thread.run_sync(_allocated_sizes, nodes, not flat)
    bitmaps = _job_bitmaps(jobs)
    return [_info(node, sizes, bitmaps.get(node), flat) for node in nodes]


def _image(node: Node, sizes: dict[Node, int], flat: bool) -> dict[str, Any]:
    image: dict[str, Any] = {
        "filename": filename(node),
        "format": node.driver,
        "virtual-size": node.size,
        "actual-size": sizes[node],
        # What the driver answers to QEMU's get-info (the file driver: a dirty flag; raw
        # passes it down; null-co has nothing to say, and then there is no dirty flag at all).
        **node.format_info(),
    }
    if not flat and node.backing is not None:
        image["backing-image"] = _image(node.backing, sizes, flat)
    return image


def _depth(node: Node) -> int:
    depth = 0
    below = node.backing
    while below is not None:
        depth += 1
        below = below.backing
    return depth


def _info(
    node: Node, sizes: dict[Node, int], bitmaps: list[dict[str, Any]] | None, flat: bool
) -> dict[str, Any]:
    image = _image(node, sizes, flat)
    info: dict[str, Any] = {
        "file": image["filename"],
        "node-name": node.name,
        "ro": node.read_only,  # inherited by an inline child, and after auto-read-only
        "drv": node.driver,
        "backing_file_depth": 0 if flat else _depth(node),
        "encrypted": False,
        "detect_zeroes": node.options.get("detect-zeroes", "off"),
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image,
        "cache": {
            # Write-back is a property of a device's BlockBackend; nodes by themselves report it on.
            "writeback": True,
            "direct": bool(_inherited(node, ("cache", "direct"), False)),
            "no-flush": bool(_inherited(node, ("cache", "no-flush"), False)),
        },
        "write_threshold": 0,
    }
    if node.backing is not None:
        info["backing_file"] = filename(node.backing)
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


# -- options an inline child inherits -----------------------------------------------------------


def _owner(node: Node) -> Node | None:
    """The parent that opened NODE as part of itself (an inline child, a backing file)."""
    return node.owner


def _inherited(node: Node, path: tuple[str, ...], default: object) -> object:
    """The option at PATH in NODE's options, else in its owner's (recursively), else DEFAULT."""
    current: Node | None = node
    while current is not None:
        value: Any = current.options
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
        current = _owner(current)
    return default


# -- sizes and bitmaps ------------------------------------------------------------------------


def _allocated_sizes(nodes: Iterable[Node], chains: bool) -> dict[Node, int]:
    """Each node's allocated bytes on the host (and, with CHAINS, those of the nodes in its
    backing chain), in one worker thread: they stat files."""
    sizes: dict[Node, int] = {}
    for node in nodes:
        below: Node | None = node
        while below is not None and below not in sizes:
            sizes[below] = below.allocated_size()
            below = below.backing if chains else None
    return sizes


def _job_bitmaps(jobs: list[Job]) -> dict[Node, list[dict[str, Any]]]:
    """The bitmaps jobs keep on their sources, newest first on each node (as QEMU lists them)."""
    bitmaps: dict[Node, list[dict[str, Any]]] = {}
    for job in jobs:
        # QEMU drops a job's bitmap when the job is finalized.
        if not isinstance(job, BlockJob) or job.finished:
            continue
        bitmap = job.source_bitmap()
        if bitmap is not None:
            bitmaps.setdefault(job.source, []).append(bitmap)
    return bitmaps
