"""A command's signature, readable, from what query-qmp-schema returns (QEMU's introspection:
entities named by numbers, objects with members and variants, enums, arrays, alternates)."""

from __future__ import annotations

from typing import Any

from ..qmp.client import CommandFailed

MAX_DEPTH = 3  # nested objects shown this deep, then by their meta-type alone
MAX_VALUES = 12  # an enum's values shown, then how many more


def command_names(entities: list[dict[str, Any]]) -> list[str]:
    return sorted(e["name"] for e in entities if e["meta-type"] == "command")


def describe(entities: list[dict[str, Any]], name: str) -> str:
    """NAME's arguments and reply, one member a line, nested objects indented."""
    by_name = {e["name"]: e for e in entities}
    command = by_name.get(name)
    if command is None or command["meta-type"] != "command":
        raise CommandFailed("CommandNotFound", f"no command '{name}'")
    lines = [name + ("  (may run out of band)" if command.get("allow-oob") else "")]
    arguments = _members(by_name, command["arg-type"], 2, 0)
    lines += ["  arguments:", *arguments] if arguments else ["  arguments: none"]
    reply = by_name[command["ret-type"]]
    if reply["meta-type"] == "object" and not reply.get("members") and not reply.get("variants"):
        lines.append("  returns: nothing")
    else:
        nested: list[str] = []
        lines.append(f"  returns: {_type(by_name, reply['name'], 2, 1, nested)}")
        lines += nested
    return "\n".join(lines)


def _members(by_name: dict[str, Any], type_name: str, indent: int, depth: int) -> list[str]:
    """An object type's members, as lines: 'name: type', '(optional)' for those with '*'."""
    entity = by_name[type_name]
    out: list[str] = []
    pad = " " * (indent + 2)
    for member in entity.get("members", []):
        nested: list[str] = []
        shown = _type(by_name, member["type"], indent + 2, depth + 1, nested)
        optional = "  (optional)" if "default" in member else ""
        out.append(f"{pad}{member['name']}: {shown}{optional}")
        out += nested
    for variant in entity.get("variants", []):
        out.append(f"{pad}when {entity['tag']} is {variant['case']}:")
        out += _members(by_name, variant["type"], indent + 2, depth + 1)
    return out


def _type(by_name: dict[str, Any], type_name: str, indent: int, depth: int,
          nested: list[str]) -> str:
    """How TYPE_NAME reads on one line; an object's members go into NESTED."""
    entity = by_name[type_name]
    meta = entity["meta-type"]
    if meta == "builtin":
        return str(entity["name"])
    if meta == "enum":
        values = list(entity["values"])
        more = f" (and {len(values) - MAX_VALUES} more)" if len(values) > MAX_VALUES else ""
        return "one of " + ", ".join(values[:MAX_VALUES]) + more
    if meta == "array":
        return "list of " + _type(by_name, entity["element-type"], indent, depth, nested)
    if meta == "alternate":
        return " or ".join(_type(by_name, m["type"], indent, depth, []) for m in
                           entity["members"])
    if depth > MAX_DEPTH:
        return "object"
    nested += _members(by_name, type_name, indent, depth)
    return "object"
