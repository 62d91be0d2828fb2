"""The language's rules for a single expression: keys, names, flags, conditions, type syntax.

Rules that need more than one expression (types that must exist, member clashes, union and
alternate shapes) are schema.py's. This pass also normalizes the short forms in place, so that
later stages see one shape: `'member': 'type'` becomes `'member': {'type': 'type'}`, and an enum
value or feature given as a string becomes `{'name': ...}`. Messages are QEMU's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import QapiError
from .source import SourceInfo

if TYPE_CHECKING:
    from .parser import TopLevel

METAS = ("enum", "struct", "union", "alternate", "command", "event")

# Optional downstream prefix `__vendor.domain_`, optional `x-`, then the stem.
_VALID_NAME = re.compile(r"(__[a-z0-9.-]+_)?(x-)?([a-z][a-z0-9_-]*)$", re.IGNORECASE)
_CAMEL = re.compile(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")
_IF_IDENTIFIER = re.compile(r"[A-Z][A-Z0-9_]*")
_NON_C = re.compile(r"[^A-Za-z0-9_]")

# Keys each meta requires, and keys it may have besides.
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "enum": (("enum", "data"), ("if", "features", "prefix")),
    "struct": (("struct", "data"), ("base", "if", "features")),
    "union": (("union", "base", "discriminator", "data"), ("if", "features")),
    "alternate": (("alternate", "data"), ("if", "features")),
    "command": (
        ("command",),
        (
            "data", "returns", "boxed", "if", "features", "gen", "success-response",
            "allow-oob", "allow-preconfig", "coroutine",
        ),
    ),
    "event": (("event",), ("data", "boxed", "if", "features")),
}


def c_name(name: str) -> str:
    """The identifier a name maps to; two members that map to the same one clash."""
    return _NON_C.sub("_", name)


# -- names ---------------------------------------------------------------------------------


def _require_str_name(name: object, info: SourceInfo, source: str) -> str:
    if not isinstance(name, str):
        raise QapiError(info, f"{source} requires a string name")
    return name


def _stem(name: str, info: SourceInfo, source: str) -> str:
    match = _VALID_NAME.match(name)
    if not match or c_name(name).startswith("q_"):
        raise QapiError(info, f"{source} has an invalid name")
    return match.group(3)


def check_name_upper(name: str, info: SourceInfo, source: str) -> None:
    if re.search(r"[a-z-]", _stem(name, info, source)):
        raise QapiError(info, f"name of {source} must not use lowercase or '-'")


def check_name_lower(
    name: str, info: SourceInfo, source: str, permit_upper: bool = False,
    permit_underscore: bool = False,
) -> None:
    stem = _stem(name, info, source)
    if (not permit_upper and re.search(r"[A-Z]", stem)) or (
        not permit_underscore and "_" in stem
    ):
        raise QapiError(info, f"name of {source} must not use uppercase or '_'")


def check_name_camel(name: str, info: SourceInfo, source: str) -> None:
    if not _CAMEL.match(_stem(name, info, source)):
        raise QapiError(info, f"name of {source} must use CamelCase")


def _check_definition_name(name: str, info: SourceInfo, meta: str) -> None:
    if meta == "event":
        check_name_upper(name, info, meta)
    elif meta == "command":
        check_name_lower(
            name, info, meta, permit_underscore=name in info.pragma.command_name_exceptions
        )
    else:
        check_name_camel(name, info, meta)
        # Array types are named ELEMENTList; the suffix is reserved for them.
        if name.endswith("List"):
            raise QapiError(info, f"{meta} name should not end in 'List'")


# -- keys, flags, conditions, features -----------------------------------------------------


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in sorted(names))


def check_keys(
    value: dict[str, object], info: SourceInfo, source: str,
    required: Iterable[str], optional: Iterable[str],
) -> None:
    required = set(required)
    missing = required - value.keys()
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise QapiError(info, f"{source} misses key{plural} {_quoted(missing)}")
    allowed = required | set(optional)
    unknown = value.keys() - allowed
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise QapiError(
            info,
            f"{source} has unknown key{plural} {_quoted(unknown)}\n"
            f"Valid keys are {_quoted(allowed)}.",
        )


def _check_flags(expr: dict[str, object], info: SourceInfo) -> None:
    for key in ("gen", "success-response"):
        if key in expr and expr[key] is not False:
            raise QapiError(info, f"flag '{key}' may only use false value")
    for key in ("boxed", "allow-oob", "allow-preconfig", "coroutine"):
        if key in expr and expr[key] is not True:
            raise QapiError(info, f"flag '{key}' may only use true value")
    if "allow-oob" in expr and "coroutine" in expr:
        raise QapiError(info, "flags 'allow-oob' and 'coroutine' are incompatible")


def check_if(owner: dict[str, object], info: SourceInfo, source: str) -> None:
    cond = owner.get("if")
    if cond is not None:
        _check_condition(cond, info, source)


def _check_condition(cond: object, info: SourceInfo, source: str) -> None:
    if isinstance(cond, str):
        if not _IF_IDENTIFIER.fullmatch(cond):
            raise QapiError(
                info, f"'if' condition '{cond}' of {source} is not a valid identifier"
            )
        return
    if not isinstance(cond, dict):
        raise QapiError(info, f"'if' condition of {source} must be a string or an object")
    check_keys(cond, info, f"'if' condition of {source}", (), ("all", "any", "not"))
    if len(cond) != 1:
        raise QapiError(info, f"'if' condition of {source} has conflicting keys")
    if "not" in cond:
        _check_condition(cond["not"], info, source)
        return
    operator = "all" if "all" in cond else "any"
    operands = cond[operator]
    if not isinstance(operands, list):
        raise QapiError(info, f"'{operator}' condition of {source} must be an array")
    if not operands:
        raise QapiError(info, f"'if' condition [] of {source} is useless")
    for operand in operands:
        _check_condition(operand, info, source)


def _named_dicts(items: list[object]) -> None:
    """['a', {'name': 'b'}] -> [{'name': 'a'}, {'name': 'b'}], in place."""
    items[:] = [item if isinstance(item, dict) else {"name": item} for item in items]


def check_features(features: object, info: SourceInfo) -> None:
    if features is None:
        return
    if not isinstance(features, list):
        raise QapiError(info, "'features' must be an array")
    _named_dicts(features)
    for feature in features:
        assert isinstance(feature, dict)
        source = "'features' member"
        check_keys(feature, info, source, ("name",), ("if",))
        name = _require_str_name(feature["name"], info, source)
        source = f"{source} '{name}'"
        check_name_lower(name, info, source)
        check_if(feature, info, source)


# -- type references and member dicts ------------------------------------------------------


def _normalize_members(members: object) -> None:
    if isinstance(members, dict):
        for key, spec in members.items():
            if not isinstance(spec, dict):
                members[key] = {"type": spec}


def check_type(
    value: object, info: SourceInfo, source: str, allow_array: bool = False,
    allow_dict: bool | str = False,
) -> None:
    """A type reference: a name, ['name'] where arrays are allowed, or an inline member dict.

    allow_dict may be the owning type's name, whose member-name-exceptions pragma then applies.
    """
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list):
        if not allow_array:
            raise QapiError(info, f"{source} cannot be an array")
        if len(value) != 1 or not isinstance(value[0], str):
            raise QapiError(info, f"{source}: array type must contain single type name")
        return
    if not allow_dict:
        raise QapiError(info, f"{source} should be a type name")
    if not isinstance(value, dict):
        raise QapiError(info, f"{source} should be an object or type name")
    permissive = isinstance(allow_dict, str) and allow_dict in info.pragma.member_name_exceptions
    for key, spec in value.items():
        key_source = f"{source} member '{key}'"
        name = key[1:] if key.startswith("*") else key
        check_name_lower(
            name, info, key_source, permit_upper=permissive, permit_underscore=permissive
        )
        # 'u' and 'has_*' are taken by the generated C code in QEMU; QAPI reserves them.
        cname = c_name(name)
        if cname == "u" or cname.startswith("has_"):
            raise QapiError(info, f"{key_source} uses reserved name")
        assert isinstance(spec, dict)
        check_keys(spec, info, key_source, ("type",), ("if", "features"))
        check_if(spec, info, key_source)
        check_features(spec.get("features"), info)
        check_type(spec["type"], info, key_source, allow_array=True)


# -- per meta --------------------------------------------------------------------------------


def _check_enum(expr: dict[str, object], info: SourceInfo, name: str) -> None:
    members = expr["data"]
    prefix = expr.get("prefix")
    if not isinstance(members, list):
        raise QapiError(info, "'data' must be an array")
    if prefix is not None and not isinstance(prefix, str):
        raise QapiError(info, "'prefix' must be a string")
    permissive = name in info.pragma.member_name_exceptions
    _named_dicts(members)
    for member in members:
        assert isinstance(member, dict)
        source = "'data' member"
        check_keys(member, info, source, ("name",), ("if", "features"))
        member_name = _require_str_name(member["name"], info, source)
        source = f"{source} '{member_name}'"
        # Enum values may start with a digit; check the rest of the name as usual.
        checked = "d" + member_name if member_name[:1].isdigit() else member_name
        check_name_lower(
            checked, info, source, permit_upper=permissive, permit_underscore=permissive
        )
        check_if(member, info, source)
        check_features(member.get("features"), info)


def _check_struct(expr: dict[str, object], info: SourceInfo, name: str) -> None:
    if isinstance(expr["data"], str):
        # A type name passes check_type() but means nothing here (QEMU's generator crashes).
        raise QapiError(info, "'data' must be an object")
    _normalize_members(expr["data"])
    check_type(expr["data"], info, "'data'", allow_dict=name)
    check_type(expr.get("base"), info, "'base'")


def _check_union(expr: dict[str, object], info: SourceInfo, name: str) -> None:
    base = expr["base"]
    branches = expr["data"]
    _normalize_members(base)
    _normalize_members(branches)
    check_type(base, info, "'base'", allow_dict=name)
    _require_str_name(expr["discriminator"], info, "'discriminator'")
    if not isinstance(branches, dict):
        raise QapiError(info, "'data' must be an object")
    for key, spec in branches.items():
        source = f"'data' member '{key}'"
        check_keys(spec, info, source, ("type",), ("if",))
        check_if(spec, info, source)
        check_type(spec["type"], info, source, allow_array=not base)


def _check_alternate(expr: dict[str, object], info: SourceInfo, name: str) -> None:
    branches = expr["data"]
    _normalize_members(branches)
    if not branches:
        raise QapiError(info, "'data' must not be empty")
    if not isinstance(branches, dict):
        raise QapiError(info, "'data' must be an object")
    for key, spec in branches.items():
        source = f"'data' member '{key}'"
        check_name_lower(key, info, source)
        check_keys(spec, info, source, ("type",), ("if",))
        check_if(spec, info, source)
        check_type(spec["type"], info, source, allow_array=True)


def _check_command(expr: dict[str, object], info: SourceInfo, name: str) -> None:
    _check_arguments(expr, info)
    check_type(expr.get("returns"), info, "'returns'", allow_array=True)


def _check_arguments(expr: dict[str, object], info: SourceInfo, name: str = "") -> None:
    args = expr.get("data")
    _normalize_members(args)
    boxed = expr.get("boxed", False)
    if boxed and args is None:
        raise QapiError(info, "'boxed': true requires 'data'")
    check_type(args, info, "'data'", allow_dict=not boxed)


_CHECKERS = {
    "enum": _check_enum,
    "struct": _check_struct,
    "union": _check_union,
    "alternate": _check_alternate,
    "command": _check_command,
    "event": _check_arguments,
}


def check_exprs(exprs: list[TopLevel]) -> None:
    """Check every definition in order; the first violation raises QapiError."""
    for top in exprs:
        expr, info, doc = top.expr, top.info, top.doc
        if "include" in expr:
            continue
        metas = [meta for meta in METAS if meta in expr]
        if len(metas) != 1:
            raise QapiError(
                info,
                "expression must have exactly one key "
                "'enum', 'struct', 'union', 'alternate', 'command', 'event'",
            )
        meta = metas[0]
        name = _require_str_name(expr[meta], info, f"'{meta}'")
        info.set_defn(meta, name)
        _check_definition_name(name, info, meta)
        if doc is not None:
            if doc.symbol != name:
                raise QapiError(info, f"documentation comment is for '{doc.symbol}'")
            doc.check_definition(meta)
        elif info.pragma.doc_required:
            raise QapiError(info, "documentation comment required")
        required, optional = _KEYS[meta]
        check_keys(expr, info, meta, required, optional)
        _CHECKERS[meta](expr, info, name)
        check_if(expr, info, meta)
        check_features(expr.get("features"), info)
        _check_flags(expr, info)
