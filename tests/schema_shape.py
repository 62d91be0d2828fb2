"""Compare SchemaInfo lists by structure, whatever names the types were given."""

from __future__ import annotations

import os
from typing import Any

SchemaInfo = dict[str, Any]

# qmpjobd's own definitions, which QEMU does not have (docs/compat.md): the comparisons with
# qemu-storage-daemon leave out what these schema files define.
OWN_SCHEMA_FILES = ("task.json",)


def own_names(schema: Any) -> frozenset[str]:
    """The names of the commands and events of SCHEMA (a qapi Schema) that OWN_SCHEMA_FILES
    define."""
    return frozenset(
        entity.name for entity in [*schema.commands(), *schema.events()]
        if entity.info is not None and os.path.basename(entity.info.fname) in OWN_SCHEMA_FILES
    )


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


# qmpjobd has a subset of QEMU's block drivers and transaction actions (docs/compat.md, "Block
# nodes and drivers"), so these commands' argument types are QSD's with enum values and union
# branches left out. For each command: the places in its shape where that is allowed, as paths
# of the form subset_paths() reports. Everything else in them must be identical to QSD's.
SUBSETTED: dict[str, frozenset[str]] = {
    # BlockdevOptions (branches) and its tag BlockdevDriver (values)
    "blockdev-add": frozenset({"arg-type", "arg-type.members[driver].type"}),
    # BlockdevCreateOptions and BlockdevDriver
    "blockdev-create": frozenset(
        {"arg-type.members[options].type", "arg-type.members[options].type.members[driver].type",
         # and the qcow2 branch's references to a node and to a driver
         *(f"arg-type.members[options].type.variants[qcow2].type.members[{member}].type{rest}"
           for member, rest in (("backing-fmt", ""), ("file", ".members[0].type"),
                                ("file", ".members[0].type.members[driver].type"),
                                ("data-file", ".members[0].type"),
                                ("data-file", ".members[0].type.members[driver].type")))}
    ),
    # TransactionAction and its tag TransactionActionKind
    "transaction": frozenset(
        {
            "arg-type.members[actions].type.element-type",
            "arg-type.members[actions].type.element-type.members[type].type",
        }
    ),
}


def subset_paths(mine: Any, theirs: Any, path: str = "") -> set[str]:
    """Where shape MINE leaves out enum values or union branches that shape THEIRS has.

    Raises AssertionError, naming the path, on any other difference: every value and branch
    MINE has must be THEIRS's, identical and in the same relative order.
    """
    if isinstance(mine, dict) and isinstance(theirs, dict):
        found: set[str] = set()
        enums = mine.get("meta-type") == "enum" == theirs.get("meta-type")
        if enums and mine["values"] != theirs["values"]:
            _assert_subsequence(mine["values"], theirs["values"], f"{path}.values")
            kept = [m for m in theirs["members"] if m["name"] in set(mine["values"])]
            assert mine["members"] == kept, f"{path}.members"
            assert mine.keys() == theirs.keys(), path
            found.add(path)
            return found
        if "variants" in mine and "variants" in theirs:
            ours = [v["case"] for v in mine["variants"]]
            cases = [v["case"] for v in theirs["variants"]]
            if ours != cases:
                _assert_subsequence(ours, cases, f"{path}.variants")
                by_case = {v["case"]: v for v in theirs["variants"]}
                for variant in mine["variants"]:
                    found |= subset_paths(
                        variant, by_case[variant["case"]], f"{path}.variants[{variant['case']}]"
                    )
                found.add(path)
                mine = {k: v for k, v in mine.items() if k != "variants"}
                theirs = {k: v for k, v in theirs.items() if k != "variants"}
        assert mine.keys() == theirs.keys(), f"{path}: {sorted(mine)} != {sorted(theirs)}"
        for key in mine:
            found |= subset_paths(mine[key], theirs[key], f"{path}.{key}" if path else key)
        return found
    if isinstance(mine, list) and isinstance(theirs, list):
        assert len(mine) == len(theirs), f"{path}: {len(mine)} items != {len(theirs)}"
        found = set()
        for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            label = a["name"] if isinstance(a, dict) and "name" in a else index
            found |= subset_paths(a, b, f"{path}[{label}]")
        return found
    assert type(mine) is type(theirs) and mine == theirs, f"{path}: {mine!r} != {theirs!r}"
    return set()


def _assert_subsequence(part: list[Any], whole: list[Any], path: str) -> None:
    rest = iter(whole)
    assert all(item in rest for item in part), f"{path}: {part} is not a subsequence of {whole}"
