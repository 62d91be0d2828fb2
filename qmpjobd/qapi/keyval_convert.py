"""Command-line option values (keyval.parse's strings and dicts) -> arguments of a schema type.

`convert` turns the strings into what the schema type wants (integers, sizes, booleans), guided
by the type, so that the result can go through the same argument checks as a QMP command.
Messages are QEMU's.
"""

from __future__ import annotations

from typing import Any

from .errors import KeyvalError
from .schema import AlternateType, ArrayType, BuiltinType, EnumType, ObjectType, Type, TypeVisitor

_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                  "p": 1 << 50, "e": 1 << 60}


def convert(value: Any, typ: Type, defines: frozenset[str], path: str = "") -> Any:
    """VALUE (strings and dicts from `parse`) as the JSON value TYP wants."""
    return typ.accept(_Convert(defines), (value, path))


# A value from `parse` and its dotted path on the command line.
_At = tuple[Any, str]


class _Convert(TypeVisitor[_At, Any]):
    def __init__(self, defines: frozenset[str]) -> None:
        self.defines = defines

    def visit_builtin(self, typ: BuiltinType, at: _At) -> Any:
        return _scalar(at[0], typ.name, at[1])

    def visit_enum(self, typ: EnumType, at: _At) -> Any:
        return at[0]

    def visit_alternate(self, typ: AlternateType, at: _At) -> Any:
        value = at[0]
        if not isinstance(value, (str, dict)):
            return value
        for variant in typ.variants.variants:
            if not variant.cond.holds(self.defines):
                continue
            wants_object = isinstance(variant.type, ObjectType)
            if wants_object == isinstance(value, dict):
                return variant.type.accept(self, at)
        return value

    def visit_array(self, typ: ArrayType, at: _At) -> Any:
        value, path = at
        if isinstance(value, dict) and all(k.isdigit() for k in value):
            items = [value[k] for k in sorted(value, key=int)]
            return [typ.element.accept(self, (v, f"{path}.{i}")) for i, v in enumerate(items)]
        return value

    def visit_object(self, typ: ObjectType, at: _At) -> Any:
        value, path = at
        if not isinstance(value, dict):
            return value
        defines = self.defines
        members = {m.name: m for m in typ.members if m.cond.holds(defines)}
        if typ.variants is not None:
            tag = value.get(typ.variants.tag_member.name)
            for variant in typ.variants.variants:
                if variant.name == tag and isinstance(variant.type, ObjectType):
                    members.update(
                        (m.name, m) for m in variant.type.members if m.cond.holds(defines)
                    )
        out: dict[str, Any] = {}
        for key, item in value.items():
            member = members.get(key)
            where = f"{path}.{key}" if path else key
            out[key] = item if member is None else member.type.accept(self, (item, where))
        return out


def _scalar(value: Any, name: str, path: str) -> Any:
    if not isinstance(value, str):
        return value
    if name == "bool":
        if value in ("on", "yes", "true", "y"):
            return True
        if value in ("off", "no", "false", "n"):
            return False
        raise KeyvalError(f"Parameter '{path}' expects 'on' or 'off'")
    if name == "size":
        return _size(value, path)
    if name.startswith(("int", "uint")):
        try:
            return int(value, 0)
        except ValueError:
            raise KeyvalError(f"Parameter '{path}' expects integer") from None
    if name == "number":
        try:
            return float(value)
        except ValueError:
            raise KeyvalError(f"Parameter '{path}' expects a number") from None
    return value


def _size(text: str, path: str) -> int:
    error = KeyvalError(f"Parameter '{path}' expects a non-negative number below 2^64")
    digits = text.rstrip("bBkKmMgGtTpPeE")
    suffix = text[len(digits):].lower()
    if suffix not in _SIZE_SUFFIXES or not digits:
        raise error
    try:
        number = float(digits) if "." in digits else int(digits, 0)
    except ValueError:
        raise error from None
    if number < 0:
        raise error
    size = int(number * _SIZE_SUFFIXES[suffix])
    if size >= 1 << 64:
        raise error
    return size
