"""QEMU's key=value option syntax: `split` and `parse`. Messages are QEMU's.

`--blockdev driver=raw,node-name=a,file.driver=file,file.filename=a.img` is a flat list of
dotted keys with string values; `parse` nests them into dicts. Turning the strings into what a
schema type wants is keyval_convert.py's. This module needs nothing of the schema model, so
the command line uses it before anything heavy is loaded.
"""

from __future__ import annotations

from typing import Any

from .errors import KeyvalError


def split(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """'a=1,b.c=x,,y' -> [('a', '1'), ('b.c', 'x,y')]; a doubled comma is a comma."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    pairs = []
    for index, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if index == 0 and implied:
                key, value = implied, item
            else:
                raise KeyvalError(f"Expected '=' after parameter '{item}'")
        pairs.append((key, value))
    return pairs


def parse(text: str, implied: str | None = None) -> dict[str, Any]:
    """Nest dotted keys: 'file.driver=file' -> {'file': {'driver': 'file'}}."""
    root: dict[str, Any] = {}
    for key, value in split(text, implied):
        parts = key.split(".")
        node = root
        for depth, part in enumerate(parts):
            if not part:
                raise KeyvalError(f"Invalid parameter '{key}'")
            if depth == len(parts) - 1:
                if part in node:
                    raise KeyvalError(f"Parameter '{key}' is set more than once")
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise KeyvalError(f"Parameters '{'.'.join(parts[:depth + 1])}.*' conflict")
                node = child
    return root
