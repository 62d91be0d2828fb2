"""Block nodes by name, and which jobs hold them.

A job that uses a node blocks it for the operations that would disturb the job; QEMU reports
that as "Node 'dst' is busy: block device is in use by block job: backup". The node graph of
this milestone is flat: every node is a root, and a `raw` node's `file` child is not a root.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from ..jobs.errors import JobError

if TYPE_CHECKING:
    from .drivers.base import Node

log = logging.getLogger("qmpjobd.block")
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


class BlockError(JobError):
    """A block layer error; the dispatcher reports it like any JobError (GenericError)."""


class DeviceNotFound(BlockError):
    cls = "DeviceNotFound"


class BlockGraph:
    def __init__(self, max_nodes: int = 65536) -> None:
        self._nodes: dict[str, Node] = {}
        self.max_nodes = max_nodes  # limits.py

    def check_room(self, count: int) -> None:
        """Whether COUNT more nodes fit under the limit."""
        if len(self._nodes) + count > self.max_nodes:
            raise BlockError(
                f"Too many block nodes: the daemon holds at most {self.max_nodes}"
            )

    def check_new_name(self, name: str) -> None:
        if not _NODE_NAME.match(name):
            raise BlockError(f"Invalid node-name: '{name}'")
        if name in self._nodes:
            raise BlockError(f"Duplicate nodes with node-name='{name}'")
        if len(name) >= 32:  # QEMU keeps node names in 32-byte buffers
            raise BlockError("Node name too long")

    def add(self, node: Node) -> None:
        """Register NODE and, if it has one, its inline child; a child gains NODE as parent."""
        self.check_new_name(node.name)
        child = node.child
        self.check_room(2 if child is not None and not child.monitor_owned else 1)
        if child is not None:
            if not child.monitor_owned:
                if not child.name.startswith("#"):  # generated names are valid by making
                    self.check_new_name(child.name)
                self._nodes[child.name] = child
            child.parents.append(node)
        self._nodes[node.name] = node

    def lookup(self, name: str) -> Node:
        """By device or node name, for commands that take either (QSD has no devices)."""
        node = self._nodes.get(name)
        if node is None:
            raise BlockError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def find(self, name: str) -> Node:
        node = self._nodes.get(name)
        if node is None:
            raise BlockError(f"Failed to find node with node-name='{name}'")
        return node

    def remove(self, name: str) -> Node:
        node = self.find(name)
        node.check_removable()
        del self._nodes[name]
        child = node.child
        if child is not None:
            child.parents.remove(node)
            if not child.monitor_owned:
                del self._nodes[child.name]
        return node

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    async def close_all(self) -> None:
        """At exit, as QEMU does: flush every node, then close it. A flush that fails is
        logged; the node is closed all the same."""
        nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            try:
                await node.flush()
            except OSError as e:
                log.warning("flushing node %s at exit: %s", node.name, e.strerror)
            await node.close()
