"""query-named-block-nodes: what QSD 7.2 says about each node (a BlockDeviceInfo).

Most members are constants for the drivers qmpjobd has (no I/O limits, write thresholds,
encryption or backing files). The ones that are not:

- the file name, which QEMU rebuilds from the node's "strong" options (those that change the
  data: raw's offset and size, null-co's size and read-zeroes). A node without any reuses its
  protocol child's plain name (the image file's, or "null-co://"); one with some is described
  as "json:" and its strong options with its children's, written as QEMU writes a QDict (keys in
  the QDict's hash order, ", " and ": " between them);
- options an inline child takes from its parent when it does not set them (read-only,
  cache.direct, cache.no-flush; detect-zeroes is not inherited);
- the dirty bitmaps that jobs keep on their source: a backup's copy bitmap (the bytes not yet
  copied, not recording) and a mirror's dirty bitmap (recording) until the job is finalized.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import trio

from ..jobs.job import Job
from ..qobject import qdict_order, write_json
from .drivers.base import Node
from .drivers.file import FileNode
from .jobs.backup import CLUSTER, BackupJob
from .jobs.mirror import MirrorJob

# The options that change a node's data (QEMU's strong runtime options), by driver, besides
# "driver" and "filename" (which every node's description has, when given).
_STRONG = {"file": (), "raw": ("offset", "size"), "null-co": ("size", "read-zeroes")}
# Drivers QEMU opens as protocols: a format node over one may take its plain file name.
_PROTOCOLS = ("file", "null-co")
# QEMU keeps a node's file name in a PATH_MAX buffer and marks a cut-off "json:" name with "...".
_PATH_MAX = 4096
# Jobs whose bitmaps are gone: QEMU drops them when the job is finalized.
_ENDED = ("concluded", "null")


async def named_block_nodes(
    nodes: list[Node], jobs: list[Job], detect_zeroes: dict[Node, str]
) -> list[dict[str, Any]]:
    """A BlockDeviceInfo for each of NODES (newest first, the order QEMU lists them in).

    JOBS are the daemon's jobs, newest first; DETECT_ZEROES overrides the setting of nodes that
    were opened without blockdev-add options (drive-backup's target: "unmap")."""
    sizes = await _allocated_sizes(nodes)
    bitmaps = _job_bitmaps(jobs)
    return [_info(node, sizes, bitmaps.get(node), detect_zeroes) for node in nodes]


def _info(
    node: Node,
    sizes: dict[Node, int],
    bitmaps: list[dict[str, Any]] | None,
    detect_zeroes: dict[Node, str],
) -> dict[str, Any]:
    filename = _filename(node)
    image: dict[str, Any] = {
        "filename": filename,
        "format": node.driver,
        "virtual-size": node.size,
        "actual-size": _allocated(node, sizes),
    }
    if isinstance(_bottom(node), FileNode):
        # Only the file driver answers QEMU's get-info (raw passes it down); null-co does not,
        # and then the image has no dirty flag at all.
        image["dirty-flag"] = False
    info: dict[str, Any] = {
        "file": filename,
        "node-name": node.name,
        "ro": _read_only(node),
        "drv": node.driver,
        "backing_file_depth": 0,
        "encrypted": False,
        "detect_zeroes": detect_zeroes.get(node, node.options.get("detect-zeroes", "off")),
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
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


# -- options an inline child inherits -----------------------------------------------------------


def _owner(node: Node) -> Node | None:
    """The parent that opened NODE as its inline child (given as a dict, not a reference)."""
    if node.monitor_owned:
        return None
    for parent in node.parents:
        if parent.child is node and isinstance(parent.options.get("file"), dict):
            return parent
    return None


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


def _read_only(node: Node) -> bool:
    if isinstance(node, FileNode):
        return node.read_only  # after auto-read-only's fallback
    return node.read_only or bool(_inherited(node, ("read-only",), False))


# -- file names -------------------------------------------------------------------------------


def _bottom(node: Node) -> Node:
    while node.child is not None:
        node = node.child
    return node


def _full_options(node: Node) -> dict[str, Any]:
    """The options that would open NODE again with the same data, children's included, in the
    order they enter QEMU's QDict (written out in the QDict's own order)."""
    options: dict[str, Any] = {}
    given = dict(node.options)
    if isinstance(node, FileNode):
        given.setdefault("filename", node.filename)  # drive-* targets have no options
    for key in ("driver", "filename", *_STRONG.get(node.driver, ())):
        if key in given:
            options[key] = given[key]
    options.setdefault("driver", node.driver)
    if node.child is not None:
        options["file"] = _full_options(node.child)
    return options


def _exact_filename(node: Node) -> str:
    """The plain name that opens NODE again, or "" if it takes a "json:" description."""
    strong = any(key in node.options for key in _STRONG.get(node.driver, ()))
    if isinstance(node, FileNode):
        return node.filename
    if node.driver == "null-co":
        return "" if strong else "null-co://"
    child = node.child
    if child is not None and child.driver in _PROTOCOLS and not strong:
        return _exact_filename(child)
    return ""


def _filename(node: Node) -> str:
    exact = _exact_filename(node)
    if exact:
        return exact
    name = "json:" + write_json(_full_options(node), spaced=True, key_order=qdict_order)
    if len(name) >= _PATH_MAX:  # ASCII (non-ASCII is escaped), so characters are bytes
        name = name[: _PATH_MAX - 4] + "..."
    return name


# -- sizes and bitmaps ------------------------------------------------------------------------


async def _allocated_sizes(nodes: Iterable[Node]) -> dict[Node, int]:
    """Each file node's allocated bytes (st_blocks * 512), from one worker thread."""
    files = [(node, node.fd) for node in nodes if isinstance(node, FileNode) and node.fd >= 0]

    def stat_all() -> dict[Node, int]:
        sizes: dict[Node, int] = {}
        for node, fd in files:
            try:
                sizes[node] = os.fstat(fd).st_blocks * 512
            except OSError:
                sizes[node] = 0  # closed meanwhile: it will not be listed again
        return sizes

    return await trio.to_thread.run_sync(stat_all) if files else {}


def _allocated(node: Node, sizes: dict[Node, int]) -> int:
    # A format node's image takes what its file takes; null-co takes nothing.
    return sizes.get(_bottom(node), 0)


def _job_bitmaps(jobs: list[Job]) -> dict[Node, list[dict[str, Any]]]:
    """The bitmaps jobs keep on their sources, newest first on each node (as QEMU lists them)."""
    bitmaps: dict[Node, list[dict[str, Any]]] = {}
    for job in jobs:
        if job.status in _ENDED:
            continue
        if isinstance(job, BackupJob):
            # What is left to copy (cluster-aligned, like the job's progress).
            count = max(job.progress_total - job.progress_current, 0)
            bitmap = _bitmap(count, CLUSTER, recording=False)
        elif isinstance(job, MirrorJob):
            # QEMU clears a dirty range as soon as it issues its copy, and issues up to the
            # job's buffer at once: nothing is left dirty here without writes by others.
            bitmap = _bitmap(0, job.granularity, recording=True)
        else:
            continue
        bitmaps.setdefault(job.source, []).append(bitmap)
    return bitmaps


def _bitmap(count: int, granularity: int, *, recording: bool) -> dict[str, Any]:
    return {"busy": False, "count": count, "granularity": granularity, "persistent": False,
            "recording": recording}
