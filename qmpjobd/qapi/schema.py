"""The typed model of a schema: built-in, enum, array, object (struct and union) and alternate
types, commands and events, checked against each other.

`load_schema(path)` parses, checks every expression (expr.py), defines the entities in source
order, then checks them in that order; the first violation raises QapiError in QEMU's wording.
Conditions (`if`) are kept, not applied: `Cond.holds(defines)` answers them for whoever asks
(introspection, the dispatcher), so one compiled schema can serve several configurations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from .errors import QapiError
from .expr import c_name, check_exprs
from .source import Pragma, SourceInfo

if TYPE_CHECKING:
    # A schema read back from qmpjobd's cache needs neither (schema_cache.py).
    from .doc import Doc
    from .parser import TopLevel

IMPLICIT_PREFIX = "q_obj_"
EMPTY_OBJECT = "q_empty"
SPECIAL_FEATURES = ("deprecated", "unstable")


class Cond:
    """An `if` condition: a name, {'all': [...]}, {'any': [...]} or {'not': ...}; None is true."""

    __slots__ = ("expr",)

    def __init__(self, expr: object = None) -> None:
        self.expr = expr

    @property
    def present(self) -> bool:
        return bool(self.expr)

    def holds(self, defines: frozenset[str] | set[str]) -> bool:
        return _holds(self.expr, defines)

    def __repr__(self) -> str:
        return f"Cond({self.expr!r})"


def _holds(expr: object, defines: frozenset[str] | set[str]) -> bool:
    if expr is None:
        return True
    if isinstance(expr, str):
        return expr in defines
    assert isinstance(expr, dict)
    if "not" in expr:
        return not _holds(expr["not"], defines)
    if "all" in expr:
        return all(_holds(e, defines) for e in expr["all"])
    return any(_holds(e, defines) for e in expr["any"])


# -- members ---------------------------------------------------------------------------------


class Member:
    """Something named inside a definition: object member, enum value, branch or feature."""

    role = "member"

    def __init__(self, name: str, info: SourceInfo | None, cond: Cond | None = None) -> None:
        self.name = name
        self.info = info
        self.cond = cond or Cond()
        # The name of the entity (or, for a member's feature, the member) it belongs to.
        self.defined_in = ""

    def describe(self, info: SourceInfo | None) -> str:
        role = self.role
        owner = self.defined_in
        if owner.startswith(IMPLICIT_PREFIX):
            owner = owner[len(IMPLICIT_PREFIX) :]
            if owner.endswith("-arg"):
                role = "parameter"
            else:
                assert owner.endswith("-base")
                role = "base " + role
        elif info is None or owner != info.defn_name:
            return f"{role} '{self.name}' of type '{owner}'"
        return f"{role} '{self.name}'"

    def check_clash(self, info: SourceInfo | None, seen: dict[str, Member]) -> None:
        key = c_name(self.name)
        other = seen.get(key)
        if other is not None:
            raise QapiError(info, f"{self.describe(info)} collides with {other.describe(info)}")
        seen[key] = self


class Feature(Member):
    role = "feature"

    @property
    def special(self) -> bool:
        return self.name in SPECIAL_FEATURES


def _own_features(owner: str, features: list[Feature]) -> list[Feature]:
    for feature in features:
        feature.defined_in = owner
    return features


def _check_feature_clashes(info: SourceInfo | None, features: list[Feature]) -> None:
    seen: dict[str, Member] = {}
    for feature in features:
        feature.check_clash(info, seen)


class EnumValue(Member):
    role = "value"

    def __init__(
        self, name: str, info: SourceInfo | None, cond: Cond | None = None,
        features: list[Feature] | None = None,
    ) -> None:
        super().__init__(name, info, cond)
        self.features = _own_features(name, features or [])


class ObjectMember(Member):
    def __init__(
        self, name: str, info: SourceInfo | None, type_name: str, optional: bool,
        cond: Cond | None = None, features: list[Feature] | None = None,
    ) -> None:
        super().__init__(name, info, cond)
        self.type_name = type_name
        self._type: Type | None = None
        self.optional = optional
        self.features = _own_features(name, features or [])

    @property
    def type(self) -> Type:
        assert self._type is not None, "member used before the schema was checked"
        return self._type

    def check(self, schema: Schema) -> None:
        self._type = schema.resolve_type(self.type_name, self.info, self.describe)
        _check_feature_clashes(self.info, self.features)


class Variant(ObjectMember):
    """A union or alternate branch: the discriminator value (or branch name) and its type."""

    role = "branch"

    def __init__(
        self, name: str, info: SourceInfo | None, type_name: str, cond: Cond | None = None
    ) -> None:
        super().__init__(name, info, type_name, False, cond)


# -- entities --------------------------------------------------------------------------------


class Entity:
    meta = ""

    def __init__(
        self, name: str, info: SourceInfo | None, doc: Doc | None = None,
        cond: Cond | None = None, features: list[Feature] | None = None,
    ) -> None:
        self.name = name
        self.info = info
        self.doc = doc
        self.cond = cond or Cond()
        self.features = _own_features(name, features or [])
        self.checked = False

    @property
    def implicit(self) -> bool:
        return self.info is None

    @property
    def module(self) -> str | None:
        """The file the entity comes from; None for the language's own entities."""
        return self.info.fname if self.info else None

    def describe(self) -> str:
        return f"{self.meta} '{self.name}'"

    def check(self, schema: Schema) -> None:
        assert not self.checked
        _check_feature_clashes(self.info, self.features)
        self.checked = True

    def connect_doc(self, doc: Doc | None = None) -> None:
        doc = doc or self.doc
        if doc is not None:
            for feature in self.features:
                assert feature.info is not None
                doc.connect_feature(feature.name, feature.info)


_Arg = TypeVar("_Arg")
_Result = TypeVar("_Result")


class TypeVisitor(Generic[_Arg, _Result]):
    """Something done to a type, one method per kind of type, as QEMU's generator does it
    (its visit_builtin_type, visit_enum_type, ...): `typ.accept(visitor, arg)` calls the
    method for TYP's kind with ARG. The argument checker, introspection, the command line's
    key=value conversion and the reply conformance check are such visitors."""

    def visit_builtin(self, typ: BuiltinType, arg: _Arg) -> _Result:
        raise NotImplementedError

    def visit_enum(self, typ: EnumType, arg: _Arg) -> _Result:
        raise NotImplementedError

    def visit_array(self, typ: ArrayType, arg: _Arg) -> _Result:
        raise NotImplementedError

    def visit_object(self, typ: ObjectType, arg: _Arg) -> _Result:
        raise NotImplementedError

    def visit_alternate(self, typ: AlternateType, arg: _Arg) -> _Result:
        raise NotImplementedError


class Type(Entity):
    # The JSON type of its values: string, number, int, boolean, null, object, array, or
    # value (any of them).
    json_type = "value"

    def accept(self, visitor: TypeVisitor[_Arg, _Result], arg: _Arg) -> _Result:
        """VISITOR's method for this kind of type, applied to this type and ARG."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.meta} type '{self.name}'"

    def check(self, schema: Schema) -> None:
        super().check(schema)
        for feature in self.features:
            if feature.special:
                raise QapiError(
                    self.info, f"feature '{feature.name}' is not supported for types"
                )


class BuiltinType(Type):
    meta = "built-in"

    def __init__(self, name: str, json_type: str) -> None:
        super().__init__(name, None)
        self.json_type = json_type

    def accept(self, visitor: TypeVisitor[_Arg, _Result], arg: _Arg) -> _Result:
        return visitor.visit_builtin(self, arg)


class EnumType(Type):
    meta = "enum"
    json_type = "string"

    def __init__(
        self, name: str, info: SourceInfo | None, doc: Doc | None, cond: Cond | None,
        features: list[Feature] | None, values: list[EnumValue], prefix: str | None,
    ) -> None:
        super().__init__(name, info, doc, cond, features)
        for value in values:
            value.defined_in = name
        self.values = values
        self.prefix = prefix

    def accept(self, visitor: TypeVisitor[_Arg, _Result], arg: _Arg) -> _Result:
        return visitor.visit_enum(self, arg)

    @property
    def implicit(self) -> bool:
        return self.name == "QType"

    def value_names(self) -> list[str]:
        return [value.name for value in self.values]

    def check(self, schema: Schema) -> None:
        super().check(schema)
        seen: dict[str, Member] = {}
        for value in self.values:
            value.check_clash(self.info, seen)

    def connect_doc(self, doc: Doc | None = None) -> None:
        super().connect_doc(doc)
        doc = doc or self.doc
        if doc is not None:
            for value in self.values:
                doc.connect_member(value.name)
                for feature in value.features:
                    assert feature.info is not None
                    doc.connect_feature(feature.name, feature.info)


class ArrayType(Type):
    meta = "array"
    json_type = "array"

    def __init__(self, name: str, info: SourceInfo | None, element_name: str) -> None:
        super().__init__(name, info)
        self.element_name = element_name
        self._element: Type | None = None

    def accept(self, visitor: TypeVisitor[_Arg, _Result], arg: _Arg) -> _Result:
        return visitor.visit_array(self, arg)

    @property
    def implicit(self) -> bool:
        return True

    @property
    def element(self) -> Type:
        assert self._element is not None
        return self._element

    @property
    def module(self) -> str | None:
        return self.element.module

    def describe(self) -> str:
        return f"{self.meta} type ['{self.element_name}']"

    def check(self, schema: Schema) -> None:
        super().check(schema)
        what = self.info.defn_meta if self.info else None
        self._element = schema.resolve_type(self.element_name, self.info, what or "")
        if isinstance(self._element, ArrayType):
            raise QapiError(self.info, f"{self.describe()} cannot be an array of arrays")


class Variants:
    """The branches of a union (selected by its discriminator) or of an alternate."""

    def __init__(
        self, tag_name: str | None, info: SourceInfo | None, tag_member: ObjectMember | None,
        variants: list[Variant],
    ) -> None:
        self.tag_name = tag_name
        self.info = info
        self._tag_member = tag_member
        self.variants = variants

    @property
    def tag_member(self) -> ObjectMember:
        assert self._tag_member is not None
        return self._tag_member

    def own(self, name: str) -> None:
        for variant in self.variants:
            variant.defined_in = name

    def check(self, schema: Schema, seen: dict[str, Member]) -> None:
        if self.tag_name is not None:
            self._check_discriminator(schema, seen)
        if not self.variants:
            raise QapiError(self.info, "union has no branches")
        for variant in self.variants:
            variant.check(schema)
            if not seen:
                continue  # alternate: branch names are free, checked by the alternate
            tag_type = self.tag_member.type
            assert isinstance(tag_type, EnumType)
            if variant.name not in tag_type.value_names():
                raise QapiError(
                    self.info,
                    f"branch '{variant.name}' is not a value of {tag_type.describe()}",
                )
            if not isinstance(variant.type, ObjectType) or variant.type.variants:
                raise QapiError(
                    self.info,
                    f"{variant.describe(self.info)} cannot use {variant.type.describe()}",
                )
            variant.type.check(schema)

    def _check_discriminator(self, schema: Schema, seen: dict[str, Member]) -> None:
        tag = seen.get(c_name(self.tag_name or ""))
        base = "'base'"
        if not isinstance(tag, ObjectMember) or tag.name != self.tag_name:
            raise QapiError(self.info, f"discriminator '{self.tag_name}' is not a member of {base}")
        self._tag_member = tag
        owner = schema.lookup_type(tag.defined_in)
        assert owner is not None
        if not owner.name.startswith(IMPLICIT_PREFIX):
            base = f"base type '{tag.defined_in}'"
        if not isinstance(tag.type, EnumType):
            raise QapiError(
                self.info,
                f"discriminator member '{self.tag_name}' of {base} must be of enum type",
            )
        if tag.optional:
            raise QapiError(
                self.info, f"discriminator member '{self.tag_name}' of {base} must not be optional"
            )
        if tag.cond.present:
            raise QapiError(
                self.info,
                f"discriminator member '{self.tag_name}' of {base} must not be conditional",
            )
        # Values without a branch of their own get the empty object.
        named = {variant.name for variant in self.variants}
        for value in tag.type.values:
            if value.name not in named:
                variant = Variant(value.name, self.info, EMPTY_OBJECT, value.cond)
                variant.defined_in = tag.defined_in
                self.variants.append(variant)

    def check_clash(self, info: SourceInfo | None, seen: dict[str, Member]) -> None:
        for variant in self.variants:
            variant_type = variant.type
            assert isinstance(variant_type, ObjectType)
            variant_type.check_clash(info, dict(seen))


class ObjectType(Type):
    json_type = "object"

    def __init__(
        self, name: str, info: SourceInfo | None, doc: Doc | None, cond: Cond | None,
        features: list[Feature] | None, base_name: str | None,
        local_members: list[ObjectMember], variants: Variants | None,
    ) -> None:
        super().__init__(name, info, doc, cond, features)
        self.meta = "union" if variants else "struct"
        for member in local_members:
            member.defined_in = name
        if variants is not None:
            variants.own(name)
        self.base_name = base_name
        self.base: ObjectType | None = None
        self.local_members = local_members
        self.variants = variants
        # All members, the base's first; None until checked.
        self._members: list[ObjectMember] | None = None

    def accept(self, visitor: TypeVisitor[_Arg, _Result], arg: _Arg) -> _Result:
        return visitor.visit_object(self, arg)

    @property
    def implicit(self) -> bool:
        return self.name.startswith("q_")

    @property
    def members(self) -> list[ObjectMember]:
        assert self._members is not None
        return self._members

    def check(self, schema: Schema) -> None:
        if self._members is not None:
            return
        if self.checked:
            raise QapiError(self.info, f"object {self.name} contains itself")
        super().check(schema)
        seen: dict[str, Member] = {}
        if self.base_name:
            base = schema.resolve_type(self.base_name, self.info, "'base'")
            if not isinstance(base, ObjectType) or base.variants:
                raise QapiError(
                    self.info, f"'base' requires a struct type, {base.describe()} isn't"
                )
            base.check(schema)
            base.check_clash(self.info, seen)
            self.base = base
        for member in self.local_members:
            member.check(schema)
            member.check_clash(self.info, seen)
        members = [m for m in seen.values() if isinstance(m, ObjectMember)]
        if self.variants:
            self.variants.check(schema, seen)
            self.variants.check_clash(self.info, seen)
        self._members = members

    def check_clash(self, info: SourceInfo | None, seen: dict[str, Member]) -> None:
        assert not self.variants
        for member in self.members:
            member.check_clash(info, seen)

    def connect_doc(self, doc: Doc | None = None) -> None:
        super().connect_doc(doc)
        doc = doc or self.doc
        if self.base is not None and self.base.implicit:
            self.base.connect_doc(doc)
        if doc is not None:
            for member in self.local_members:
                _connect_member(doc, member)


def _connect_member(doc: Doc, member: ObjectMember) -> None:
    doc.connect_member(member.name)
    for feature in member.features:
        assert feature.info is not None
        doc.connect_feature(feature.name, feature.info)


# The JSON types a value of each kind can arrive as, as an alternate tells its branches apart.
_ALTERNATE_JSON = {
    "null": "null",
    "string": "string",
    "number": "number",
    "int": "number",
    "boolean": "boolean",
    "array": "array",
    "object": "object",
}


class AlternateType(Type):
    meta = "alternate"
    json_type = "value"

    def __init__(
        self, name: str, info: SourceInfo | None, doc: Doc | None, cond: Cond | None,
        features: list[Feature] | None, variants: Variants,
    ) -> None:
        super().__init__(name, info, doc, cond, features)
        variants.own(name)
        variants.tag_member.defined_in = name
        self.variants = variants

    def accept(self, visitor: TypeVisitor[_Arg, _Result], arg: _Arg) -> _Result:
        return visitor.visit_alternate(self, arg)

    def check(self, schema: Schema) -> None:
        super().check(schema)
        self.variants.tag_member.check(schema)
        self.variants.check(schema, {})
        seen: dict[str, Member] = {}
        taken: dict[str, str] = {}
        for variant in self.variants.variants:
            variant.check_clash(self.info, seen)
            json = _ALTERNATE_JSON.get(variant.type.json_type)
            if json is None:
                raise QapiError(
                    self.info,
                    f"{variant.describe(self.info)} cannot use {variant.type.describe()}",
                )
            conflicting = {json}
            if json == "string":
                # Keyval input (the command line) arrives as strings: a string branch must not
                # be mistaken for a number or a boolean.
                if isinstance(variant.type, EnumType):
                    for value in variant.type.values:
                        if value.name in ("on", "off"):
                            conflicting.add("boolean")
                        if value.name and value.name[0] in "-+0123456789.":
                            conflicting.add("number")
                else:
                    conflicting.update(("number", "boolean"))
            for json_type in sorted(conflicting):
                if json_type in taken:
                    raise QapiError(
                        self.info,
                        f"{variant.describe(self.info)} can't be distinguished "
                        f"from '{taken[json_type]}'",
                    )
                taken[json_type] = variant.name

    def connect_doc(self, doc: Doc | None = None) -> None:
        super().connect_doc(doc)
        doc = doc or self.doc
        if doc is not None:
            for variant in self.variants.variants:
                doc.connect_member(variant.name)


class _Callable(Entity):
    """What commands and events share: an argument type, maybe boxed."""

    def __init__(
        self, name: str, info: SourceInfo | None, doc: Doc | None, cond: Cond | None,
        features: list[Feature] | None, arg_type_name: str | None, boxed: bool,
    ) -> None:
        super().__init__(name, info, doc, cond, features)
        self.arg_type_name = arg_type_name
        self.arg_type: ObjectType | None = None
        self.boxed = boxed

    def check(self, schema: Schema) -> None:
        super().check(schema)
        if self.arg_type_name:
            what = f"{self.meta}'s 'data'"
            arg_type = schema.resolve_type(self.arg_type_name, self.info, what)
            if not isinstance(arg_type, ObjectType):
                raise QapiError(self.info, f"{what} cannot take {arg_type.describe()}")
            if arg_type.variants and not self.boxed:
                raise QapiError(
                    self.info, f"{what} can take {arg_type.describe()} only with 'boxed': true"
                )
            self.arg_type = arg_type

    def connect_doc(self, doc: Doc | None = None) -> None:
        super().connect_doc(doc)
        doc = doc or self.doc
        if doc is not None and self.arg_type is not None and self.arg_type.implicit:
            self.arg_type.connect_doc(doc)


class Command(_Callable):
    meta = "command"

    def __init__(
        self, name: str, info: SourceInfo | None, doc: Doc | None, cond: Cond | None,
        features: list[Feature] | None, arg_type_name: str | None, ret_type_name: str | None,
        *, gen: bool, success_response: bool, boxed: bool, allow_oob: bool,
        allow_preconfig: bool, coroutine: bool,
    ) -> None:
        super().__init__(name, info, doc, cond, features, arg_type_name, boxed)
        self.ret_type_name = ret_type_name
        self.ret_type: Type | None = None
        self.gen = gen
        self.success_response = success_response
        self.allow_oob = allow_oob
        self.allow_preconfig = allow_preconfig
        self.coroutine = coroutine

    def check(self, schema: Schema) -> None:
        super().check(schema)
        if not self.ret_type_name:
            return
        self.ret_type = schema.resolve_type(self.ret_type_name, self.info, "command's 'returns'")
        assert self.info is not None
        if self.name in self.info.pragma.command_returns_exceptions:
            return
        returned = self.ret_type
        if isinstance(returned, ArrayType):
            returned = returned.element
        if not isinstance(returned, ObjectType):
            raise QapiError(
                self.info, f"command's 'returns' cannot take {self.ret_type.describe()}"
            )


class Event(_Callable):
    meta = "event"


class Include(Entity):
    """An include directive, kept so that modules are ordered as QEMU orders them."""

    meta = "include"


# -- the schema ------------------------------------------------------------------------------

_BUILTINS = (
    ("str", "string"), ("number", "number"), ("int", "int"), ("int8", "int"),
    ("int16", "int"), ("int32", "int"), ("int64", "int"), ("uint8", "int"),
    ("uint16", "int"), ("uint32", "int"), ("uint64", "int"), ("size", "int"),
    ("bool", "boolean"), ("any", "value"), ("null", "null"),
)
_QTYPES = ("none", "qnull", "qnum", "qstring", "qdict", "qlist", "qbool")


_E = TypeVar("_E", bound=Entity)


class Schema:
    """A checked schema. Build it with `load_schema`."""

    def __init__(self, fname: str, exprs: list[TopLevel], docs: list[Doc], pragma: Pragma) -> None:
        self.fname = fname
        self.docs = docs
        self.pragma = pragma
        self.entities: list[Entity] = []
        self._by_name: dict[str, Entity] = {}
        # Source files in the order QEMU lists their definitions: the root file, then each
        # file in the order it is first included.
        self.modules: list[str] = [os.path.normpath(fname)]
        self._predefining = True
        for name, json_type in _BUILTINS:
            self._define(BuiltinType(name, json_type))
            self._array_of(name, None)
        self.empty_object = ObjectType(EMPTY_OBJECT, None, None, None, None, None, [], None)
        self._define(self.empty_object)
        qtype_values = [EnumValue(v, None) for v in _QTYPES]
        self._define(EnumType("QType", None, None, None, None, qtype_values, "QTYPE"))
        self._predefining = False
        for top in exprs:
            self._define_expr(top)
        for entity in self.entities:
            entity.check(self)
            entity.connect_doc()
            if entity.doc is not None:
                entity.doc.check_connected()

    def add_enum_values(self, name: str, values: Sequence[str]) -> None:
        """VALUES added to the enum NAME, after its own (qmpjobd's users' job kinds join
        JobType so that query-jobs may name them)."""
        enum = self.lookup_type(name)
        if not isinstance(enum, EnumType):
            raise ValueError(f"{name} is not an enum")
        known = {value.name for value in enum.values}
        for value_name in values:
            if value_name not in known:
                value = EnumValue(value_name, None)
                value.defined_in = name
                enum.values.append(value)
                known.add(value_name)

    def drop_docs(self) -> None:
        """Forget the documentation comments. They were checked as the schema was loaded, a
        daemon has no other use for them, and without them a pickled schema is half the size."""
        self.docs = []
        for entity in self.entities:
            entity.doc = None

    # -- lookups -------------------------------------------------------------------------

    def lookup(self, name: str) -> Entity | None:
        return self._by_name.get(name)

    def lookup_type(self, name: str) -> Type | None:
        entity = self._by_name.get(name)
        return entity if isinstance(entity, Type) else None

    def resolve_type(
        self, name: str, info: SourceInfo | None, what: str | Callable[[SourceInfo | None], str]
    ) -> Type:
        found = self.lookup_type(name)
        if found is None:
            if callable(what):
                what = what(info)
            raise QapiError(info, f"{what} uses unknown type '{name}'")
        return found

    def commands(self) -> Iterator[Command]:
        return self.in_module_order(Command)

    def events(self) -> Iterator[Event]:
        return self.in_module_order(Event)

    def types(self) -> Iterator[Type]:
        return (e for e in self.entities if isinstance(e, Type))

    def in_module_order(self, kind: type[_E] | tuple[type[_E], ...]) -> Iterator[_E]:
        """Entities of KIND as QEMU lists them: by module, then in definition order."""
        rank = {module: i for i, module in enumerate(self.modules)}
        found = [e for e in self.entities if isinstance(e, kind)]
        found.sort(key=lambda e: rank[os.path.normpath(e.module or "")])
        return iter(found)

    # -- definition ----------------------------------------------------------------------

    def _define(self, entity: Entity) -> None:
        assert entity.info is not None or self._predefining or isinstance(entity, ArrayType)
        self.entities.append(entity)
        if isinstance(entity, Include):
            return
        other = self._by_name.get(entity.name)
        if other is not None:
            if other.info is not None:
                where = QapiError(other.info, "previous definition")
                raise QapiError(entity.info, f"'{entity.name}' is already defined\n{where}")
            raise QapiError(entity.info, f"{other.describe()} is already defined")
        self._by_name[entity.name] = entity

    def _array_of(self, element: str, info: SourceInfo | None) -> str:
        name = element + "List"  # names ending in 'List' are reserved for this
        if self.lookup_type(name) is None:
            self._define(ArrayType(name, info, element))
        return name

    def _implicit_object(
        self, owner: str, info: SourceInfo, cond: Cond, role: str, members: list[ObjectMember]
    ) -> str | None:
        if not members:
            return None
        name = f"{IMPLICIT_PREFIX}{owner}-{role}"
        if self.lookup(name) is None:
            self._define(ObjectType(name, info, None, cond, None, None, members, None))
        return name

    def _features(self, raw: object, info: SourceInfo) -> list[Feature]:
        if raw is None:
            return []
        assert isinstance(raw, list)
        return [Feature(f["name"], info, Cond(f.get("if"))) for f in raw]

    def _type_ref(self, ref: object, info: SourceInfo) -> str:
        if isinstance(ref, list):
            return self._array_of(ref[0], info)
        assert isinstance(ref, str)
        return ref

    def _members(self, data: object, info: SourceInfo) -> list[ObjectMember]:
        assert isinstance(data, dict)
        members = []
        for key, spec in data.items():
            optional = key.startswith("*")
            members.append(
                ObjectMember(
                    key[1:] if optional else key, info, self._type_ref(spec["type"], info),
                    optional, Cond(spec.get("if")), self._features(spec.get("features"), info),
                )
            )
        return members

    def _variants(self, data: object, info: SourceInfo) -> list[Variant]:
        assert isinstance(data, dict)
        return [
            Variant(key, info, self._type_ref(spec["type"], info), Cond(spec.get("if")))
            for key, spec in data.items()
        ]

    def _define_expr(self, top: TopLevel) -> None:
        expr, info, doc = top.expr, top.info, top.doc
        if "include" in expr:
            path = os.path.normpath(str(expr["include"]))
            if path not in self.modules:
                self.modules.append(path)
            self._define(Include(path, info))
            return
        cond = Cond(expr.get("if"))
        features = self._features(expr.get("features"), info)
        if "enum" in expr:
            values = [
                EnumValue(
                    str(v["name"]), info, Cond(v.get("if")),
                    self._features(v.get("features"), info),
                )
                for v in _dicts(expr["data"])
            ]
            prefix = expr.get("prefix")
            assert prefix is None or isinstance(prefix, str)
            self._define(EnumType(str(expr["enum"]), info, doc, cond, features, values, prefix))
        elif "struct" in expr:
            name = str(expr["struct"])
            base = expr.get("base")
            assert base is None or isinstance(base, str)
            members = self._members(expr["data"], info)
            self._define(ObjectType(name, info, doc, cond, features, base, members, None))
        elif "union" in expr:
            name = str(expr["union"])
            base = expr["base"]
            if isinstance(base, dict):
                base = self._implicit_object(name, info, cond, "base", self._members(base, info))
            assert base is None or isinstance(base, str)
            variants = self._variants(expr["data"], info)
            tag_name = str(expr["discriminator"])
            self._define(
                ObjectType(
                    name, info, doc, cond, features, base, [],
                    Variants(tag_name, info, None, variants),
                )
            )
        elif "alternate" in expr:
            name = str(expr["alternate"])
            variants = self._variants(expr["data"], info)
            tag = ObjectMember("type", info, "QType", False)
            self._define(
                AlternateType(
                    name, info, doc, cond, features, Variants(None, info, tag, variants)
                )
            )
        elif "command" in expr:
            name = str(expr["command"])
            args = self._arguments(name, expr, info, cond)
            returns = expr.get("returns")
            ret_name = self._type_ref(returns, info) if returns is not None else None
            self._define(
                Command(
                    name, info, doc, cond, features, args, ret_name,
                    gen=bool(expr.get("gen", True)),
                    success_response=bool(expr.get("success-response", True)),
                    boxed=bool(expr.get("boxed", False)),
                    allow_oob=bool(expr.get("allow-oob", False)),
                    allow_preconfig=bool(expr.get("allow-preconfig", False)),
                    coroutine=bool(expr.get("coroutine", False)),
                )
            )
        else:
            name = str(expr["event"])
            args = self._arguments(name, expr, info, cond)
            self._define(
                Event(name, info, doc, cond, features, args, bool(expr.get("boxed", False)))
            )

    def _arguments(
        self, name: str, expr: dict[str, object], info: SourceInfo, cond: Cond
    ) -> str | None:
        data = expr.get("data")
        if isinstance(data, dict):
            return self._implicit_object(name, info, cond, "arg", self._members(data, info))
        assert data is None or isinstance(data, str)
        return data


def _dicts(items: object) -> list[dict[str, object]]:
    assert isinstance(items, list)
    return [item for item in items if isinstance(item, dict)]


def load_schema(fname: str, extra: Sequence[str] = (),
                amend: Callable[[list[TopLevel]], None] | None = None) -> Schema:
    """Parse and check the schema rooted at FNAME, with the EXTRA files as if FNAME included
    them last; raise QapiError if it is invalid. AMEND may change the expressions as read,
    before any check (qmpjobd adds its users' transaction actions to the built-in union)."""
    return load_schema_sources(fname, extra, amend)[0]


def load_schema_sources(
    fname: str, extra: Sequence[str] = (),
    amend: Callable[[list[TopLevel]], None] | None = None,
) -> tuple[Schema, dict[str, bytes]]:
    """load_schema's schema, and every file it was compiled from (absolute path -> the bytes
    read): what a cache of the result must find unchanged."""
    from .parser import parse_schema

    result, pragma = parse_schema(fname, extra)
    if amend is not None:
        amend(result.exprs)
    check_exprs(result.exprs)
    return Schema(fname, result.exprs, result.docs, pragma), result.sources
