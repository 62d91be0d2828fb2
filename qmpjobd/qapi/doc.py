"""Documentation comments: the `##` blocks that document a definition or stand free.

A definition block reads

    ##
    # @JobInfo:
    #
    # Overview text.
    #
    # @id: description of a member, continued on
    #      indented lines
    #
    # Features:
    # @deprecated: description of a feature
    #
    # Since: 7.2
    ##

Lines are fed one at a time to `Doc.append`, which follows a small state machine: the body
(symbol line and overview), member descriptions, feature descriptions, then tagged sections
(Returns:, Since:, Note:, ...). The rules, and the wording of the errors, are QEMU's. Errors are
raised as `DocSyntaxError`; the parser adds the position of the offending line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum

from .errors import QapiError
from .source import SourceInfo

SECTION_TAGS = frozenset(
    ["Returns:", "Since:", "Note:", "Notes:", "Example:", "Examples:", "TODO:"]
)
# Sections that may appear once per block.
UNIQUE_SECTIONS = ("Returns", "Since")

_SYMBOL_PREFIX = re.compile(r"@\S*:\s*")
_TAG_PREFIX = re.compile(r"\S*:\s*")
_SYMBOL_REFERENCE = re.compile(r"@\S+:")


class DocSyntaxError(Exception):
    """A malformed documentation line; the parser turns it into a positioned QapiError."""


class Section:
    """A run of documentation text: the body, one member's or feature's text, or a tagged part."""

    def __init__(self, name: str | None = None, indent: int = 0) -> None:
        self.name = name
        self.text = ""
        # Continuation lines must be indented at least this much; the indent is stripped.
        self.indent = indent
        # For member and feature sections: whether a definition claimed it.
        self.connected = False

    def append(self, line: str) -> None:
        if line:
            leading = len(line) - len(line.lstrip())
            if leading < self.indent:
                raise DocSyntaxError(
                    f"unexpected de-indent (expected at least {self.indent} spaces)"
                )
            line = line[self.indent :]
        self.text += line.rstrip() + "\n"


class _Mode(Enum):
    BODY = "body"
    MEMBERS = "members"
    FEATURES = "features"
    TAGGED = "tagged"
    CLOSED = "closed"


def _split_header(line: str, prefix: re.Pattern[str]) -> tuple[str, int]:
    """'@name:   text' -> the line with its header blanked out, and the text's indent."""
    match = prefix.match(line)
    assert match is not None
    indent = match.end()
    rest = line[indent:]
    if not rest:
        # A header alone on its line: the text follows on unindented lines.
        return "", 0
    return " " * indent + rest, indent


class Doc:
    """One documentation comment block."""

    def __init__(self, info: SourceInfo) -> None:
        self.info = info
        self.symbol: str | None = None
        self.body = Section()
        self.members: dict[str, Section] = {}
        self.features: dict[str, Section] = {}
        self.sections: list[Section] = []
        self._current = self.body
        self._mode = _Mode.BODY

    # -- building, line by line --------------------------------------------------------------

    def append(self, comment: str) -> None:
        """Add one comment line, '#' included."""
        line = comment[1:]
        if not line:
            self._freeform("")
            return
        if line[0] != " ":
            raise DocSyntaxError("missing space after #")
        line = line[1:]
        handlers: dict[_Mode, Callable[[str], None]] = {
            _Mode.BODY: self._body_line,
            _Mode.MEMBERS: self._members_line,
            _Mode.FEATURES: self._features_line,
            _Mode.TAGGED: self._tagged_line,
        }
        handlers[self._mode](line)

    def close(self) -> None:
        self._switch_to(Section())
        self._mode = _Mode.CLOSED

    def _body_line(self, line: str) -> None:
        word = line.split(" ", 1)[0]
        if self.symbol is None and not self.body.text and line.startswith("@"):
            if not line.endswith(":"):
                raise DocSyntaxError("line should end with ':'")
            self.symbol = line[1:-1]
            if not self.symbol:
                raise DocSyntaxError("name required after '@'")
        elif self.symbol is None:
            self._freeform(line)
        elif word.startswith("@") and word.endswith(":"):
            self._mode = _Mode.MEMBERS
            self._members_line(line)
        elif line == "Features:":
            self._mode = _Mode.FEATURES
        elif word in SECTION_TAGS:
            self._mode = _Mode.TAGGED
            self._tagged_line(line)
        else:
            self._freeform(line)

    def _members_line(self, line: str) -> None:
        self._symbols_line(line, self.members, features_may_follow=True)

    def _features_line(self, line: str) -> None:
        self._symbols_line(line, self.features, features_may_follow=False)

    def _symbols_line(
        self, line: str, table: dict[str, Section], *, features_may_follow: bool
    ) -> None:
        word = line.split(" ", 1)[0]
        if word.startswith("@") and word.endswith(":"):
            line, indent = _split_header(line, _SYMBOL_PREFIX)
            self._start_symbol(table, word[1:-1], indent)
        elif word in SECTION_TAGS:
            self._mode = _Mode.TAGGED
            self._tagged_line(line)
            return
        elif self._current.text.endswith("\n\n") and line and not line[0].isspace():
            # An unindented paragraph after a blank line ends the symbol descriptions.
            if features_may_follow and line == "Features:":
                self._mode = _Mode.FEATURES
            else:
                self._start_section()
                self._mode = _Mode.TAGGED
                self._tagged_line(line)
            return
        self._freeform(line)

    def _tagged_line(self, line: str) -> None:
        word = line.split(" ", 1)[0]
        if word.startswith("@") and word.endswith(":"):
            raise DocSyntaxError(f"'{word}' can't follow '{self.sections[0].name}' section")
        if word in SECTION_TAGS:
            line, indent = _split_header(line, _TAG_PREFIX)
            self._start_section(word[:-1], indent)
        self._freeform(line)

    def _start_symbol(self, table: dict[str, Section], name: str, indent: int) -> None:
        if not name:
            raise DocSyntaxError("invalid parameter name")
        if name in table:
            raise DocSyntaxError(f"'{name}' parameter name duplicated")
        section = Section(name, indent)
        self._switch_to(section)
        table[name] = section

    def _start_section(self, name: str | None = None, indent: int = 0) -> None:
        if name in UNIQUE_SECTIONS and self.has_section(name):
            raise DocSyntaxError(f"duplicated '{name}' section")
        section = Section(name, indent)
        self._switch_to(section)
        self.sections.append(section)

    def _switch_to(self, section: Section) -> None:
        previous = self._current
        previous.text = previous.text.strip()
        if previous is not self.body and not previous.text:
            raise DocSyntaxError(f"empty doc section '{previous.name}'")
        self._current = section

    def _freeform(self, line: str) -> None:
        match = _SYMBOL_REFERENCE.match(line)
        if match:
            raise DocSyntaxError(f"'{match.group(0)}' not allowed in free-form documentation")
        self._current.append(line)

    # -- questions and checks against the definition -----------------------------------------

    def has_section(self, name: str) -> bool:
        return any(section.name == name for section in self.sections)

    def check_definition(self, meta: str) -> None:
        if self.has_section("Returns") and meta != "command":
            raise QapiError(self.info, "'Returns:' is only valid for commands")

    def connect_member(self, name: str) -> None:
        section = self.members.get(name)
        if section is None:
            # Undocumented members are tolerated, as QEMU does.
            section = self.members[name] = Section(name)
        section.connected = True

    def connect_feature(self, name: str, info: SourceInfo) -> None:
        section = self.features.get(name)
        if section is None:
            raise QapiError(info, f"feature '{name}' lacks documentation")
        section.connected = True

    def check_connected(self) -> None:
        for what, table in (("member", self.members), ("feature", self.features)):
            bogus = [name for name, section in table.items() if not section.connected]
            if bogus:
                plural = len(bogus) > 1
                raise QapiError(
                    self.info,
                    "documented {}{} '{}' {} not exist".format(
                        what, "s" if plural else "", "', '".join(bogus), "do" if plural else "does"
                    ),
                )
