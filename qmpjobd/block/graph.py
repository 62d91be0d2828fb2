"""Block nodes by name: the monitor's, and those the daemon opened for itself.

A job that uses a node blocks it for the operations that would disturb the job; QEMU reports
that as "Node 'dst' is busy: block device is in use by block job: backup". A node uses its
children (a format's `file`, a qcow2 node's backing node); those it opened itself (inline
definitions, backing files named by an image header) are its own, registered and closed with
it.
Besides the nodes the monitor added (and their inline children), the graph holds the nodes the
daemon opened for a job (drive-* targets, named '#blockNNN'): listed while their job lasts,
never the monitor's to delete.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from typing import TYPE_CHECKING

from .errors import BlockError

if TYPE_CHECKING:
    from ..jobs.job import Job
    from .drivers.base import Node

log = logging.getLogger("qmpjobd.block")
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


class BlockGraph:
    def __init__(self, max_nodes: int = 65536) -> None:
        self._nodes: dict[str, Node] = {}
        self.max_nodes = max_nodes  # limits.py
        # The daemon's own nodes, each with the job it was opened for (None until the job is
        # made). A job that has finished holds its node no more, even before it is closed.
        self._internal: dict[Node, Job | None] = {}
        self._generated = itertools.count(1)

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
        """Register NODE and the nodes it owns (inline children, backing files opened from
        its header); each child gains its parent."""
        self.check_new_name(node.name)
        owned = node.owned()
        self.check_room(1 + len(owned))
        for below in owned:
            if not below.name.startswith("#"):  # generated names are valid by making
                self.check_new_name(below.name)
        for parent in (node, *owned):
            for child in parent.children():
                child.parents.append(parent)
        for below in owned:
            self._nodes[below.name] = below
        self._nodes[node.name] = node

    def replace_backing(self, node: Node, new: Node | None) -> list[Node]:
        """NODE falls through to NEW from now on (a stream or commit dropped the images
        between). The dropped images NODE's chain owned leave the graph (with what they own);
        they are returned, for the caller to close. NEW, if it was owned by one of them, is
        NODE's now."""
        dropped = []
        current = node.backing
        while current is not None and current is not new:
            dropped.append(current)
            current = current.backing
        old = node.backing
        if old is not None:
            old.parents.remove(node)
        node.attach_backing(new)
        if new is not None:
            new.parents.append(node)
            if new.owner in dropped:
                new.owner = node
        closing = []
        for image in dropped:
            if image.owner is None or image.parents:
                continue  # the monitor's (or still another's): it stays, with its backing
            for gone in (image, *image.owned()):
                if gone is new:
                    continue
                if self._nodes.get(gone.name) is gone:
                    del self._nodes[gone.name]
                for child in gone.children():
                    if gone in child.parents:
                        child.parents.remove(gone)
                closing.append(gone)
        return closing

    def generated_name(self) -> str:
        """A name for a node opened without one (an inline child, a drive-* target), made as
        QEMU makes them: '#block', a counter of three or more digits and two random ones."""
        return f"#block{next(self._generated):03d}{random.randrange(100):02d}"

    def lookup(self, name: str) -> Node:
        """By device or node name, for commands that take either (QSD has no devices)."""
        return self._get(name, "Cannot find device='{0}' nor node-name='{0}'")

    def lookup_node(self, name: str) -> Node:
        """By node name only, for the arguments that name a node (base-node, top-node)."""
        return self._get(name, "Cannot find device='' nor node-name='{0}'")

    def find(self, name: str) -> Node:
        """By node name, for the commands that take one (blockdev-del)."""
        return self._get(name, "Failed to find node with node-name='{0}'")

    def _get(self, name: str, missing: str) -> Node:
        """The node NAME, or BlockError with MISSING (NAME in place of {0})."""
        node = self._nodes.get(name)
        if node is None:
            raise BlockError(missing.format(name))
        return node

    def remove(self, name: str) -> Node:
        node = self.find(name)
        node.check_removable()
        del self._nodes[name]
        owned = node.owned()
        for parent in (node, *owned):
            for child in parent.children():
                child.parents.remove(parent)
        for below in owned:
            del self._nodes[below.name]
        return node

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    # -- the daemon's own nodes ------------------------------------------------------------------

    def add_internal(self, node: Node) -> None:
        """A node the daemon opened for itself (with the nodes it owns)."""
        if node.child is not None and node.child.owner is None:
            node.child.monitor_owned = False
            node.child.owner = node
        for parent in (node, *node.owned()):
            for child in parent.children():
                child.parents.append(parent)
        node.monitor_owned = False
        self._internal[node] = None

    def hold(self, node: Node, job: Job) -> None:
        """NODE is JOB's (a drive-* target): it is listed until JOB has finished."""
        self._internal[node] = job

    def remove_internal(self, node: Node) -> None:
        """The daemon lets go of NODE: it is no longer its children's parent (a backing node
        it was given, the nodes it owns)."""
        self._internal.pop(node, None)
        for parent in (node, *node.owned()):
            for child in parent.children():
                if parent in child.parents:
                    child.parents.remove(parent)

    def internal_nodes(self) -> list[Node]:
        """The daemon's own nodes whose job has not finished, with their children."""
        found = []
        for node, job in self._internal.items():
            if job is None or not job.finished:
                found.append(node)
                found.extend(node.owned())
        return found

    def all_nodes(self) -> list[Node]:
        """Every node there is, newest first (the order QEMU lists them in)."""
        nodes = self.nodes() + self.internal_nodes()
        return sorted(nodes, key=lambda node: node.serial, reverse=True)

    async def close_all(self) -> None:
        """At exit, as QEMU does: flush every node, then close it, newest first, so that a
        parent is flushed while its child is still open. A flush that fails is logged; the
        node is closed all the same."""
        nodes, self._nodes = list(self._nodes.values()), {}
        for node in sorted(nodes, key=lambda node: node.serial, reverse=True):
            try:
                await node.flush()
            except OSError as e:
                log.warning("flushing node %s at exit: %s", node.name, e.strerror)
            await node.close()
