"""A node's file name as QEMU gives it (query-named-block-nodes, a header naming a backing
file): the plain name of the image file, or a "json:" description.

QEMU rebuilds the name from the node's "strong" options (those that change the data: raw's
offset and size, null-co's size and read-zeroes, a qcow2 node's backing node when it is not the
one its header names). A node without any reuses its protocol child's plain name (the image
file's, or "null-co://"); one with some is described as "json:" and its strong options with its
children's, written as QEMU writes a QDict (keys in the QDict's hash order, ", " and ": "
between them).
"""

from __future__ import annotations

from typing import Any

from ...qobject import qdict_order, write_json
from .base import Node

# QEMU keeps a node's file name in a PATH_MAX buffer and marks a cut-off "json:" name with "...".
_PATH_MAX = 4096


def full_options(node: Node) -> dict[str, Any]:
    """The options that would open NODE again with the same data, children's included, in the
    order they enter QEMU's QDict (written out in the QDict's own order)."""
    options: dict[str, Any] = {}
    for key in ("driver", "filename", *node.strong_options):
        if key in node.options:
            options[key] = node.options[key]
    options.setdefault("driver", node.driver)
    if node.child is not None:
        options["file"] = full_options(node.child)
    if node.describes_backing():
        options["backing"] = None if node.backing is None else full_options(node.backing)
    return options


def filename(node: Node) -> str:
    exact = node.exact_filename()
    if exact:
        return exact
    name = "json:" + write_json(full_options(node), spaced=True, key_order=qdict_order)
    if len(name) >= _PATH_MAX:  # ASCII (non-ASCII is escaped), so characters are bytes
        name = name[: _PATH_MAX - 4] + "..."
    return name
