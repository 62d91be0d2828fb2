"""The SchemaInfo list that query-qmp-schema returns, in QEMU's format.

Commands and events come first, in module order; then every type they reach, in the order it is
first reached. Types other than built-ins and arrays are named by number ("0", "1", ...): the
names are not part of the interface, and QEMU hides them the same way. All integer types are
reported as `int`.

Numbers are assigned over the whole schema before conditions are applied, as QEMU assigns them
when it generates code, so the output matches QEMU's for the same set of defines, numbers
included. An entry, member, value, branch or feature whose condition does not hold is left out.
"""

from __future__ import annotations

from .schema import (
    AlternateType,
    ArrayType,
    BuiltinType,
    Command,
    Cond,
    EnumType,
    Event,
    Feature,
    ObjectType,
    Schema,
    Type,
    TypeVisitor,
)

SchemaInfo = dict[str, object]


class _Introspector(TypeVisitor[None, None]):
    """Emits each reached type's entry (a visitor over the types: `typ.accept(self, None)`)."""

    def __init__(self, schema: Schema, defines: frozenset[str]) -> None:
        self.schema = schema
        self.defines = defines
        self.used: list[Type] = []
        self.seen: set[str] = set()
        self.numbers: dict[str, str] = {}
        self.entries: list[SchemaInfo] = []

    def run(self) -> list[SchemaInfo]:
        for entity in self.schema.in_module_order((Command, Event)):
            if isinstance(entity, Command):
                self.command(entity)
            else:
                assert isinstance(entity, Event)
                self.event(entity)
        i = 0
        while i < len(self.used):  # the list grows while we walk it
            self.used[i].accept(self, None)
            i += 1
        return self.entries

    # -- names -----------------------------------------------------------------------------

    def number(self, name: str) -> str:
        if name not in self.numbers:
            self.numbers[name] = str(len(self.numbers))
        return self.numbers[name]

    def use(self, typ: Type) -> str:
        if typ.json_type == "int":
            typ = self._lookup("int")
        elif isinstance(typ, ArrayType) and typ.element.json_type == "int":
            typ = self._lookup("intList")
        if typ.name not in self.seen:
            self.seen.add(typ.name)
            self.used.append(typ)
        return typ.accept(_Names(self), None)

    def _lookup(self, name: str) -> Type:
        found = self.schema.lookup_type(name)
        assert found is not None
        return found

    # -- entries ---------------------------------------------------------------------------

    def holds(self, cond: Cond) -> bool:
        return cond.holds(self.defines)

    def features(self, features: list[Feature]) -> list[str]:
        return [f.name for f in features if self.holds(f.cond)]

    def emit(
        self, name: str, meta: str, body: SchemaInfo, cond: Cond, features: list[Feature]
    ) -> None:
        entry: SchemaInfo = {"name": name, "meta-type": meta, **body}
        if features:
            entry["features"] = self.features(features)
        if self.holds(cond):
            self.entries.append(entry)

    def command(self, command: Command) -> None:
        empty = self.schema.empty_object
        body: SchemaInfo = {
            "arg-type": self.use(command.arg_type or empty),
            "ret-type": self.use(command.ret_type or empty),
        }
        if command.allow_oob:
            body["allow-oob"] = True
        self.emit(command.name, "command", body, command.cond, command.features)

    def event(self, event: Event) -> None:
        body: SchemaInfo = {"arg-type": self.use(event.arg_type or self.schema.empty_object)}
        self.emit(event.name, "event", body, event.cond, event.features)

    def visit_builtin(self, typ: BuiltinType, arg: None) -> None:
        self.emit(typ.name, "builtin", {"json-type": typ.json_type}, typ.cond, [])

    def visit_enum(self, typ: EnumType, arg: None) -> None:
        members: list[SchemaInfo] = []
        for value in typ.values:
            if not self.holds(value.cond):
                continue
            member: SchemaInfo = {"name": value.name}
            if value.features:
                member["features"] = self.features(value.features)
            members.append(member)
        values = [m["name"] for m in members]
        body: SchemaInfo = {"members": members, "values": values}
        self.emit(self.number(typ.name), "enum", body, typ.cond, typ.features)

    def visit_array(self, typ: ArrayType, arg: None) -> None:
        element = self.use(typ.element)
        # An array exists exactly when its element type does.
        self.emit(f"[{element}]", "array", {"element-type": element}, typ.element.cond, [])

    def visit_alternate(self, typ: AlternateType, arg: None) -> None:
        branches = []
        for v in typ.variants.variants:
            branch = {"type": self.use(v.type)}  # numbered even when left out
            if self.holds(v.cond):
                branches.append(branch)
        self.emit(self.number(typ.name), "alternate", {"members": branches}, typ.cond,
                  typ.features)

    def visit_object(self, typ: ObjectType, arg: None) -> None:
        members: list[SchemaInfo] = []
        for m in typ.members:
            member: SchemaInfo = {"name": m.name, "type": self.use(m.type)}
            if m.optional:
                member["default"] = None
            if m.features:
                member["features"] = self.features(m.features)
            if self.holds(m.cond):
                members.append(member)
        body: SchemaInfo = {"members": members}
        if typ.variants is not None:
            body["tag"] = typ.variants.tag_member.name
            variants = []
            for v in typ.variants.variants:
                variant = {"case": v.name, "type": self.use(v.type)}
                if self.holds(v.cond):
                    variants.append(variant)
            body["variants"] = variants
        self.emit(self.number(typ.name), "object", body, typ.cond, typ.features)


class _Names(TypeVisitor[None, str]):
    """What introspection calls a type: built-ins and arrays by name, the rest by number."""

    def __init__(self, introspector: _Introspector) -> None:
        self.introspector = introspector

    def visit_builtin(self, typ: BuiltinType, arg: None) -> str:
        return typ.name

    def visit_array(self, typ: ArrayType, arg: None) -> str:
        return "[" + self.introspector.use(typ.element) + "]"

    def _numbered(self, typ: Type, arg: None) -> str:
        return self.introspector.number(typ.name)

    visit_enum = visit_object = visit_alternate = _numbered


def introspect(schema: Schema, defines: frozenset[str] = frozenset()) -> list[SchemaInfo]:
    """The query-qmp-schema reply for SCHEMA in a build where the names in DEFINES are defined."""
    return _Introspector(schema, defines).run()
