"""Check and convert QMP command arguments the way QEMU 7.2's QMP input visitor does.

`compile_command(command, defines)` turns a command's argument type into a checker once; the
checker then runs for every call. Errors carry QEMU's exact wording (always class GenericError).
What QEMU does, and so what this module reproduces:

- Members are visited in schema order, base members first, then the union branch selected by the
  discriminator. A missing member names its full path: 'a.b', 'a[0].b'. The unexpected-member
  check runs when an object's members are done, so a missing or mistyped member is reported
  before an unknown one. Only one unknown member is named, in the order of QEMU's hash tables
  (see leftover.py).
- JSON null for an optional member is not "absent": it is a value of the wrong type, unless the
  member's type admits null.
- Some messages use the full path, others only the member's own name, or 'null' for a list
  element: integer range errors ("Parameter 'to' expects uint16_t"), enum values, and
  alternates of the wrong JSON type ("Invalid parameter type for 'file', expected: BlockdevRef").
- int8..int64 take integers within int64 and then check their range. uint8..uint64 and size take
  integers from -2^63 to 2^64-1; negatives wrap around modulo 2^64 (QEMU keeps them for backward
  compatibility), so uint64 and size accept -1 as 2^64-1. Floats never pass as integers.

Conditions (`if`) are applied at compile time: members, enum values and branches whose condition
does not hold under `defines` do not exist.

Containers are visited by generators driven from an explicit stack (`_drive`), not by Python
recursion: a recursive type such as BlockdevOptions -> BlockdevRef -> BlockdevOptions may nest as
deep as the JSON parser allows, deeper than Python's recursion limit. `any` values are passed
through without being walked.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Iterable
from typing import TypeAlias

from .errors import ArgumentError
from .leftover import first_leftover
from .schema import (
    AlternateType,
    ArrayType,
    BuiltinType,
    Command,
    EnumType,
    ObjectMember,
    ObjectType,
    Type,
    TypeVisitor,
)

Checker: TypeAlias = Callable[[dict[str, object]], dict[str, object]]

# Every check takes (value, name, prefix). `name` is the member name in the enclosing object, or
# None for a list element; `prefix` is the path of the enclosing object with its trailing dot
# ('a.b.'), or, for a list element, the element's own path ('a[0]'). Paths are only formatted
# on the way to an error, so a successful check builds no strings for scalars.
Leaf: TypeAlias = Callable[[object, str | None, str], object]
Task: TypeAlias = "tuple[Node, object, str | None, str]"
Step: TypeAlias = Generator[Task, object, object]
Node: TypeAlias = Callable[[object, str | None, str], Step]
# One object member: wire name, key in the converted dict, optional?, then its check, either a
# leaf (a plain function) or a node (a generator to be driven).
Member: TypeAlias = tuple[str, str, bool, Leaf | None, Node | None]


def compile_command(command: Command, defines: frozenset[str]) -> Checker:
    """Return the checker for COMMAND's arguments under the build conditions DEFINES.

    The checker takes the `arguments` object as decoded from the wire and returns the keyword
    arguments for the handler: top-level member names with '-' turned into '_', absent optional
    members left out, nested objects and lists as plain dicts and lists keyed by wire names,
    enums as str, integers as int, `number` as float, `null` as None, `any` untouched. It raises
    ArgumentError with QEMU's message when QEMU would refuse the call.

    For a boxed command ('boxed': true) the result is instead the whole converted argument
    object, keyed by wire names (the dispatcher passes it to the handler as one positional dict).
    A command without 'data' accepts only {}.
    """
    arg_type = command.arg_type
    if arg_type is None:
        node = _object_node([], None)
    else:
        node = _compile_object(arg_type, defines, rename=not command.boxed)

    def check(arguments: dict[str, object]) -> dict[str, object]:
        result = _drive(node(arguments, None, ""))
        assert isinstance(result, dict)
        return result

    flat = _flat_members(arg_type, defines, rename=not command.boxed)
    if flat is None:
        return check
    return _flat_checker(flat, check)


def _flat_members(
    typ: ObjectType | None, defines: frozenset[str], rename: bool
) -> list[Member] | None:
    """The members of an argument type that has neither branches nor members to descend into
    (most commands'), or None."""
    if typ is None:
        return []
    if typ.variants is not None:
        return None
    members = _members(typ.members, defines, rename)
    return members if all(leaf is not None for _, _, _, leaf, _ in members) else None


def _flat_checker(members: list[Member], general: Checker) -> Checker:
    """The checker for flat arguments: one loop, no generators. Whatever is wrong is handed
    to the general checker, which finds the same problem QEMU reports first."""
    wanted = {wire for wire, _, _, _, _ in members}

    def check(arguments: dict[str, object]) -> dict[str, object]:
        out: dict[str, object] = {}
        for wire, key, optional, leaf, _ in members:
            if wire in arguments:
                assert leaf is not None
                try:
                    out[key] = leaf(arguments[wire], wire, "")
                except ArgumentError:
                    return general(arguments)
            elif not optional:
                return general(arguments)
        if not wanted.issuperset(arguments):
            return general(arguments)
        return out

    return check


def _drive(first: Step) -> object:
    """Run a node and the nodes it asks for, depth first, on a list instead of the call stack."""
    stack = [first]
    sent: object = None
    while True:
        try:
            node, value, name, prefix = stack[-1].send(sent)
        except StopIteration as done:
            stack.pop()
            if not stack:
                return done.value
            sent = done.value
        else:
            stack.append(node(value, name, prefix))
            sent = None


# -- messages --------------------------------------------------------------------------------


def _path(name: str | None, prefix: str) -> str:
    return prefix if name is None else prefix + name


def _bare(name: str | None) -> str:
    # Where QEMU reports only the member's own name, a list element (no name) shows as 'null'.
    return "null" if name is None else name


def _wrong_type(name: str | None, prefix: str, expected: str) -> ArgumentError:
    path = _path(name, prefix)
    return ArgumentError(f"Invalid parameter type for '{path}', expected: {expected}")


# -- built-in types --------------------------------------------------------------------------

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1


def _exactly(kind: type, expected: str) -> Leaf:
    """str, bool and null: one JSON type, passed through. (bool is not an int here.)"""

    def check(value: object, name: str | None, prefix: str) -> object:
        if type(value) is kind:
            return value
        raise _wrong_type(name, prefix, expected)

    return check


def _any(value: object, name: str | None, prefix: str) -> object:
    return value


def _number(value: object, name: str | None, prefix: str) -> object:
    if type(value) is float:
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:  # QEMU's parser reads such a literal as an infinite double
            return float("inf") if value > 0 else float("-inf")
    raise _wrong_type(name, prefix, "number")


def _int64(value: object, name: str | None, prefix: str) -> object:
    # QEMU's parser keeps integers beyond int64 as uint64 or double: never an int64.
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return value
    raise _wrong_type(name, prefix, "integer")


def _uint64(value: object, name: str | None, prefix: str) -> object:
    if type(value) is int and _INT64_MIN <= value <= _UINT64_MAX:
        return value & _UINT64_MAX
    raise ArgumentError(f"Parameter '{_path(name, prefix)}' expects uint64")


def _bounded(wide: Leaf, low: int, high: int, c_type: str) -> Leaf:
    """An int8..int32 or uint8..uint32 check: the 64-bit check, then the range."""

    def check(value: object, name: str | None, prefix: str) -> object:
        number = wide(value, name, prefix)
        assert isinstance(number, int)
        if low <= number <= high:
            return number
        raise ArgumentError(f"Parameter '{_bare(name)}' expects {c_type}")

    return check


_BUILTINS: dict[str, Leaf] = {
    "str": _exactly(str, "string"), "bool": _exactly(bool, "boolean"),
    "null": _exactly(type(None), "null"), "any": _any, "number": _number,
    "int": _int64, "int64": _int64, "uint64": _uint64, "size": _uint64,
    "int8": _bounded(_int64, -(1 << 7), (1 << 7) - 1, "int8_t"),
    "int16": _bounded(_int64, -(1 << 15), (1 << 15) - 1, "int16_t"),
    "int32": _bounded(_int64, -(1 << 31), (1 << 31) - 1, "int32_t"),
    "uint8": _bounded(_uint64, 0, (1 << 8) - 1, "uint8_t"),
    "uint16": _bounded(_uint64, 0, (1 << 16) - 1, "uint16_t"),
    "uint32": _bounded(_uint64, 0, (1 << 32) - 1, "uint32_t"),
}

# The Python types of the JSON values that select an alternate's branch, by branch kind.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "int": (int, float), "number": (int, float), "boolean": (bool,),
    "null": (type(None),), "object": (dict,), "array": (list,),
}


# -- compiled types --------------------------------------------------------------------------

Compiled: TypeAlias = tuple[Leaf | None, Node | None]

# Compiled types, per schema type object and condition set; an entry is made before the type's
# parts are compiled, so that recursive types refer to themselves. Weak keys: a schema that is
# dropped takes its compiled checks with it.
_cache: weakref.WeakKeyDictionary[Type, dict[tuple[frozenset[str], bool], Compiled]] = (
    weakref.WeakKeyDictionary()
)


def _compile(typ: Type, defines: frozenset[str]) -> Compiled:
    return typ.accept(_Compiler(defines), None)


class _Compiler(TypeVisitor[None, Compiled]):
    """A type's check under DEFINES. Enums, arrays and alternates are cached, each entry made
    before the type's parts are compiled, so that recursive types refer to themselves."""

    def __init__(self, defines: frozenset[str]) -> None:
        self.defines = defines

    def visit_builtin(self, typ: BuiltinType, arg: None) -> Compiled:
        return _BUILTINS[typ.name], None

    def visit_object(self, typ: ObjectType, arg: None) -> Compiled:
        return None, _compile_object(typ, self.defines, rename=False)

    def visit_enum(self, typ: EnumType, arg: None) -> Compiled:
        per_type = _cache.setdefault(typ, {})
        found = per_type.get((self.defines, False))
        if found is None:
            per_type[self.defines, False] = found = _enum_leaf(typ, self.defines), None
        return found

    def visit_array(self, typ: ArrayType, arg: None) -> Compiled:
        per_type = _cache.setdefault(typ, {})
        found = per_type.get((self.defines, False))
        if found is None:
            element: list[Compiled] = []
            per_type[self.defines, False] = found = None, _array_node(element)
            element.append(typ.element.accept(self, None))
        return found

    def visit_alternate(self, typ: AlternateType, arg: None) -> Compiled:
        per_type = _cache.setdefault(typ, {})
        found = per_type.get((self.defines, False))
        if found is None:
            branches: dict[type, Compiled] = {}
            per_type[self.defines, False] = found = None, _alternate_node(typ.name, branches)
            for variant in typ.variants.variants:
                if variant.cond.holds(self.defines):
                    kind = (
                        "object" if isinstance(variant.type, ObjectType)
                        else variant.type.json_type
                    )
                    for json_type in _JSON_TYPES[kind]:
                        branches[json_type] = variant.type.accept(self, None)
        return found


def _compile_object(typ: ObjectType, defines: frozenset[str], *, rename: bool) -> Node:
    """A struct or union; RENAME turns '-' into '_' in the converted keys (handler keywords)."""
    per_type = _cache.setdefault(typ, {})
    found = per_type.get((defines, rename))
    if found is not None:
        assert found[1] is not None
        return found[1]
    members: list[Member] = []
    variants: tuple[str, dict[str, list[Member]]] | None = None
    if typ.variants is not None:
        variants = (_key(typ.variants.tag_member.name, rename), {})
    node = _object_node(members, variants)
    per_type[defines, rename] = None, node
    members.extend(_members(typ.members, defines, rename))
    if typ.variants is not None and variants is not None:
        for variant in typ.variants.variants:
            if variant.cond.holds(defines):
                assert isinstance(variant.type, ObjectType)
                variants[1][variant.name] = _members(variant.type.members, defines, rename)
    return node


def _key(name: str, rename: bool) -> str:
    return name.replace("-", "_") if rename else name


def _members(
    members: Iterable[ObjectMember], defines: frozenset[str], rename: bool
) -> list[Member]:
    table: list[Member] = []
    for member in members:
        if member.cond.holds(defines):
            leaf, node = _compile(member.type, defines)
            table.append((member.name, _key(member.name, rename), member.optional, leaf, node))
    return table


# -- the checks themselves -------------------------------------------------------------------


def _enum_leaf(typ: EnumType, defines: frozenset[str]) -> Leaf:
    values = frozenset(v.name for v in typ.values if v.cond.holds(defines))

    def check(value: object, name: str | None, prefix: str) -> object:
        if type(value) is not str:
            raise _wrong_type(name, prefix, "string")
        if value in values:
            return value
        raise ArgumentError(f"Parameter '{_bare(name)}' does not accept value '{value}'")

    return check


def _visit_members(
    members: list[Member], value: dict[str, object], inner: str, out: dict[str, object]
) -> Generator[Task, object, None]:
    for wire, key, optional, leaf, node in members:
        if wire not in value:
            if optional:
                continue
            raise ArgumentError(f"Parameter '{inner}{wire}' is missing")
        if leaf is not None:
            out[key] = leaf(value[wire], wire, inner)
        else:
            assert node is not None
            out[key] = yield node, value[wire], wire, inner


def _object_node(
    members: list[Member], variants: tuple[str, dict[str, list[Member]]] | None
) -> Node:
    def node(value: object, name: str | None, prefix: str) -> Step:
        if type(value) is not dict:
            raise _wrong_type(name, prefix, "object")
        path = _path(name, prefix)
        inner = path + "." if path else ""
        out: dict[str, object] = {}
        yield from _visit_members(members, value, inner, out)
        branch: list[Member] = []
        if variants is not None:
            tag = out[variants[0]]
            assert isinstance(tag, str)
            # A tag value without a branch under these conditions has no members (QEMU has no
            # such value either: the branch and its enum value share their condition).
            branch = variants[1].get(tag, [])
            yield from _visit_members(branch, value, inner, out)
        # Each member present in the input made exactly one entry in `out`.
        if len(out) != len(value):
            consumed = [m[0] for m in (*members, *branch) if m[0] in value]
            known = set(consumed)
            left = [k for k in value if k not in known]
            first = left[0] if len(left) == 1 else first_leftover(list(value), consumed)
            raise ArgumentError(f"Parameter '{inner}{first}' is unexpected")
        return out

    return node


def _array_node(element: list[Compiled]) -> Node:
    def node(value: object, name: str | None, prefix: str) -> Step:
        if type(value) is not list:
            raise _wrong_type(name, prefix, "array")
        leaf, sub = element[0]
        path = _path(name, prefix)
        out: list[object] = []
        for index, item in enumerate(value):
            where = f"{path}[{index}]"
            if leaf is not None:
                out.append(leaf(item, None, where))
            else:
                assert sub is not None
                out.append((yield sub, item, None, where))
        return out

    return node


def _alternate_node(type_name: str, branches: dict[type, Compiled]) -> Node:
    def node(value: object, name: str | None, prefix: str) -> Step:
        branch = branches.get(type(value))
        if branch is None:
            raise ArgumentError(
                f"Invalid parameter type for '{_bare(name)}', expected: {type_name}"
            )
        leaf, sub = branch
        if leaf is not None:
            return leaf(value, name, prefix)
        assert sub is not None
        return (yield sub, value, name, prefix)

    return node
