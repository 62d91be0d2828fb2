"""Does a value the daemon produced conform to a schema type? (Replies and event data.)

The input side has visit.py, with QEMU's messages; this is the output side, for the tests and
for the dispatcher's debug checks: it answers with the first problem found, or None.
"""

from __future__ import annotations

from .schema import (
    AlternateType,
    ArrayType,
    BuiltinType,
    EnumType,
    ObjectType,
    Type,
    TypeVisitor,
)

_INT_RANGES = {
    "int": (-(1 << 63), (1 << 63) - 1), "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1), "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1), "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1), "uint32": (0, (1 << 32) - 1), "uint64": (0, (1 << 64) - 1),
    "size": (0, (1 << 64) - 1),
}

# A value and its path in the reply ("" for the reply itself).
_At = tuple[object, str]


def problem(value: object, typ: Type, defines: frozenset[str], path: str = "") -> str | None:
    """Why VALUE is not a TYPE (under DEFINES), or None if it is."""
    return typ.accept(_Conform(defines), (value, path))


class _Conform(TypeVisitor[_At, "str | None"]):
    def __init__(self, defines: frozenset[str]) -> None:
        self.defines = defines

    def visit_builtin(self, typ: BuiltinType, at: _At) -> str | None:
        value, path = at
        name = typ.name
        if name == "any":
            return None
        if name == "str":
            ok = isinstance(value, str)
        elif name == "bool":
            ok = isinstance(value, bool)
        elif name == "null":
            ok = value is None
        elif name == "number":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            low, high = _INT_RANGES[name]
            ok = type(value) is int and low <= value <= high
        return None if ok else f"{path or 'value'}: {value!r} is not a {name}"

    def visit_enum(self, typ: EnumType, at: _At) -> str | None:
        value, path = at
        names = {v.name for v in typ.values if v.cond.holds(self.defines)}
        return None if value in names else f"{path or 'value'}: {value!r} is not a {typ.name}"

    def visit_array(self, typ: ArrayType, at: _At) -> str | None:
        value, path = at
        if not isinstance(value, list):
            return f"{path or 'value'}: not a list"
        for i, item in enumerate(value):
            found = typ.element.accept(self, (item, f"{path}[{i}]"))
            if found:
                return found
        return None

    def visit_alternate(self, typ: AlternateType, at: _At) -> str | None:
        for variant in typ.variants.variants:
            if variant.cond.holds(self.defines) and not variant.type.accept(self, at):
                return None
        return f"{at[1] or 'value'}: matches no branch of {typ.name}"

    def visit_object(self, typ: ObjectType, at: _At) -> str | None:
        value, path = at
        if not isinstance(value, dict):
            return f"{path or 'value'}: not an object"
        defines = self.defines
        members = [m for m in typ.members if m.cond.holds(defines)]
        if typ.variants is not None:
            tag = value.get(typ.variants.tag_member.name)
            for variant in typ.variants.variants:
                if variant.name == tag and variant.cond.holds(defines):
                    assert isinstance(variant.type, ObjectType)
                    members += [m for m in variant.type.members if m.cond.holds(defines)]
        known = {m.name for m in members}
        for key in value:
            if key not in known:
                return f"{path}{'.' if path else ''}{key}: not a member of {typ.name}"
        for member in members:
            where = f"{path}.{member.name}" if path else member.name
            if member.name not in value:
                if not member.optional:
                    return f"{where}: missing"
                continue
            found = member.type.accept(self, (value[member.name], where))
            if found:
                return found
        return None
