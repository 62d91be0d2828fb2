"""Compare SchemaInfo lists by structure, whatever names the types were given."""

from __future__ import annotations

from typing import Any

SchemaInfo = dict[str, Any]


def shape(entries: list[SchemaInfo], name: str) -> Any:
    """The entry NAME with every type reference replaced by the referenced entry, recursively.

    Masked type names ("0", "17") differ between two schemas; what they stand for must not.
    A type that refers back to itself is shown as ("recursive", meta-type).
    """
    by_name = {e["name"]: e for e in entries}

    def expand(ref: str, stack: tuple[str, ...]) -> Any:
        if ref in stack:
            return ("recursive", by_name[ref]["meta-type"])
        entry = by_name[ref]
        return {k: sub(k, v, (*stack, ref)) for k, v in entry.items() if k != "name"}

    def sub(key: str, value: Any, stack: tuple[str, ...]) -> Any:
        if key in ("arg-type", "ret-type", "type", "element-type") and isinstance(value, str):
            return expand(value, stack)
        if isinstance(value, list):
            return [sub(key, v, stack) for v in value]
        if isinstance(value, dict):
            return {k: sub(k, v, stack) for k, v in value.items()}
        return value

    entry = by_name[name]
    return {"name": name, **{k: sub(k, v, (name,)) for k, v in entry.items() if k != "name"}}
