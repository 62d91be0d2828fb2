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
)

SchemaInfo = dict[str, object]


class _Introspector:
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
            self.type(self.used[i])
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
        if isinstance(typ, BuiltinType):
            return typ.name
        if isinstance(typ, ArrayType):
            return "[" + self.use(typ.element) + "]"
        return self.number(typ.name)

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

    def type(self, typ: Type) -> None:
        if isinstance(typ, BuiltinType):
            self.emit(typ.name, "builtin", {"json-type": typ.json_type}, typ.cond, [])
        elif isinstance(typ, EnumType):
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
        elif isinstance(typ, ArrayType):
            element = self.use(typ.element)
            # An array exists exactly when its element type does.
            self.emit(f"[{element}]", "array", {"element-type": element}, typ.element.cond, [])
        elif isinstance(typ, ObjectType):
            self.object(typ)
        else:
            assert isinstance(typ, AlternateType)
            branches = []
            for v in typ.variants.variants:
                branch = {"type": self.use(v.type)}  # numbered even when left out
                if self.holds(v.cond):
                    branches.append(branch)
            self.emit(self.number(typ.name), "alternate", {"members": branches}, typ.cond,
                      typ.features)

    def object(self, typ: ObjectType) -> None:
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


def introspect(schema: Schema, defines: frozenset[str] = frozenset()) -> list[SchemaInfo]:
    """The query-qmp-schema reply for SCHEMA in a build where the names in DEFINES are defined."""
    return _Introspector(schema, defines).run()
