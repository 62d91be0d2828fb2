"""Where a schema construct came from, and the errors that point there."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Pragma:
    """Schema-wide settings from `{ 'pragma': ... }` directives.

    One instance is shared by every file of a schema: a pragma in an included file holds for
    the whole schema, because the checks that read pragmas run after all files are parsed.
    """

    doc_required: bool = False
    # Commands whose names may contain '_'.
    command_name_exceptions: list[str] = field(default_factory=list)
    # Commands that may return something other than an object or a list of objects.
    command_returns_exceptions: list[str] = field(default_factory=list)
    # Types whose member names may use uppercase and '_'.
    member_name_exceptions: list[str] = field(default_factory=list)


class SourceInfo:
    """A line in a schema file, the include chain that led there, and the definition it is in."""

    __slots__ = ("defn_meta", "defn_name", "fname", "line", "parent", "pragma")

    def __init__(self, fname: str, line: int, parent: SourceInfo | None, pragma: Pragma) -> None:
        self.fname = fname
        self.line = line
        self.parent = parent
        self.pragma = pragma
        self.defn_meta: str | None = None
        self.defn_name: str | None = None

    def set_defn(self, meta: str, name: str) -> None:
        self.defn_meta = meta
        self.defn_name = name

    def loc(self) -> str:
        return f"{self.fname}:{self.line}"

    def context(self) -> str:
        """The lines that precede the location in a message: include chain, then definition."""
        chain = []
        parent = self.parent
        while parent is not None:
            chain.append(f"In file included from {parent.loc()}:\n")
            parent = parent.parent
        text = "".join(reversed(chain))
        if self.defn_name:
            text += f"{self.fname}: In {self.defn_meta} '{self.defn_name}':\n"
        return text

    def __str__(self) -> str:
        return self.context() + self.loc()

    def __repr__(self) -> str:
        return f"<SourceInfo {self.loc()}>"
