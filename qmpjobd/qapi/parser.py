"""QAPI source text -> top-level expressions with their positions and documentation.

The syntax is JSON's shape with the schema language's own lexemes: single-quoted strings (whose
only escape is a doubled backslash), `true`/`false`, `#` comments to the end of the line, and
`##` documentation blocks. There are no numbers and no null. The `include` and `pragma`
directives are carried out here; everything else is checked later, by expr.py and schema.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .doc import Doc, DocSyntaxError
from .errors import QapiError
from .source import Pragma, SourceInfo

Value = dict[str, "Value"] | list["Value"] | str | bool
Expr = dict[str, object]

# Tokens: one of '{', '}', '[', ']', ':', ',', "'" (string), 't'/'f' (booleans),
# '#' (a documentation comment line, only when asked for) and '' (end of input).
_PUNCTUATION = frozenset("{}[]:,")
_STRAY = re.compile(r"[^\[\]{}:,\s'\"]+")
_SPACE = re.compile(r"[ \t\r\f\v]+")


@dataclass
class TopLevel:
    """One definition or include directive as written, before any checking."""

    expr: Expr
    info: SourceInfo
    doc: Doc | None = None


@dataclass
class ParseResult:
    exprs: list[TopLevel] = field(default_factory=list)
    docs: list[Doc] = field(default_factory=list)
    # Every file read, by absolute path, with the bytes it held when it was read.
    sources: dict[str, bytes] = field(default_factory=dict)


class _FileParser:
    """Reads one file; includes recurse into a new instance sharing the bookkeeping."""

    def __init__(
        self,
        fname: str,
        parent: SourceInfo | None,
        pragma: Pragma,
        included: set[str],
        result: ParseResult,
    ) -> None:
        self.fname = fname
        self.pragma = pragma
        self.included = included
        self.result = result
        included.add(os.path.abspath(fname))
        with open(fname, "rb") as stream:
            raw = stream.read()
        result.sources[os.path.abspath(fname)] = raw
        try:
            src = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            # QEMU's generator dies with a traceback here; point at the line instead.
            line = raw.count(b"\n", 0, exc.start) + 1
            raise QapiError(SourceInfo(fname, line, parent, pragma), "invalid UTF-8") from None
        # Line ends as Python's text mode reads them (QEMU's generator reads files that way).
        src = src.replace("\r\n", "\n").replace("\r", "\n")
        if not src.endswith("\n"):
            src += "\n"
        self.src = src
        self.parent = parent
        self.cursor = 0
        self.line = 1
        self.line_start = 0
        self.line_info = SourceInfo(fname, 1, parent, pragma)
        # The current token, its value, and where it starts.
        self.tok = ""
        self.val: str | bool | None = None
        self.pos = 0

    # -- errors ------------------------------------------------------------------------------

    def error(self, msg: str) -> QapiError:
        # Columns count from 1; a tab advances to the next multiple of 8, plus one. (QEMU's
        # generator means to do the same but leaves tabs uncounted; see docs/compat.md.)
        col = 1
        for ch in self.src[self.line_start : self.pos]:
            col = ((col - 1) // 8 + 1) * 8 + 1 if ch == "\t" else col + 1
        return QapiError(self.line_info, msg, col)

    # -- lexer -------------------------------------------------------------------------------

    def _newline(self) -> None:
        self.line += 1
        self.line_start = self.cursor
        self.line_info = SourceInfo(self.fname, self.line, self.parent, self.pragma)

    def accept(self, want_doc: bool = False) -> None:
        """Advance to the next token. With want_doc, '#' comment lines are tokens too."""
        src = self.src
        while True:
            self.pos = self.cursor
            self.val = None
            ch = src[self.cursor]
            self.cursor += 1
            if ch in _PUNCTUATION:
                self.tok = ch
                return
            if ch == "\n":
                if self.cursor == len(src):
                    self.tok = ""
                    return
                self._newline()
            elif ch == "#":
                end = src.index("\n", self.cursor)
                doc_line = want_doc or src.startswith("#", self.cursor)
                self.cursor = end
                if doc_line:
                    self.tok = "#"
                    self.val = src[self.pos : end]
                    return
            elif ch == "'":
                self.tok = "'"
                self.val = self._string()
                return
            elif src.startswith("true", self.pos):
                self.tok, self.val = "t", True
                self.cursor = self.pos + 4
                return
            elif src.startswith("false", self.pos):
                self.tok, self.val = "f", False
                self.cursor = self.pos + 5
                return
            elif ch.isspace():
                match = _SPACE.match(src, self.cursor)
                if match:
                    self.cursor = match.end()
            else:
                stray = _STRAY.match(src, self.pos)
                raise self.error(f"stray '{stray.group(0) if stray else ch}'")

    def _string(self) -> str:
        src = self.src
        chars: list[str] = []
        escaped = False
        while True:
            ch = src[self.cursor]
            self.cursor += 1
            if ch == "\n":
                raise self.error("missing terminating \"'\"")
            if escaped:
                if ch != "\\":
                    raise self.error(f"unknown escape \\{ch}")
                escaped = False
            elif ch == "\\":
                escaped = True
                continue
            elif ch == "'":
                return "".join(chars)
            if not " " <= ch <= "~":
                raise self.error("funny character in string")
            chars.append(ch)

    # -- grammar -----------------------------------------------------------------------------

    def value(self) -> Value:
        tok = self.tok
        if tok == "{":
            self.accept()
            return self.members()
        if tok == "[":
            self.accept()
            return self.elements()
        if tok in ("'", "t", "f"):
            val = self.val
            assert isinstance(val, str | bool)
            self.accept()
            return val
        raise self.error("expected '{', '[', string, or boolean")

    def members(self) -> dict[str, Value]:
        obj: dict[str, Value] = {}
        if self.tok == "}":
            self.accept()
            return obj
        if self.tok != "'":
            raise self.error("expected string or '}'")
        while True:
            key = self.val
            assert isinstance(key, str)
            self.accept()
            if self.tok != ":":
                raise self.error("expected ':'")
            self.accept()
            if key in obj:
                raise self.error(f"duplicate key '{key}'")
            obj[key] = self.value()
            if self.tok == "}":
                self.accept()
                return obj
            if self.tok != ",":
                raise self.error("expected ',' or '}'")
            self.accept()
            if self.tok != "'":
                raise self.error("expected string")

    def elements(self) -> list[Value]:
        items: list[Value] = []
        if self.tok == "]":
            self.accept()
            return items
        if self.tok not in ("{", "[", "'", "t", "f"):
            raise self.error("expected '{', '[', ']', string, or boolean")
        while True:
            items.append(self.value())
            if self.tok == "]":
                self.accept()
                return items
            if self.tok != ",":
                raise self.error("expected ',' or ']'")
            self.accept()

    # -- the file ----------------------------------------------------------------------------

    def parse(self) -> None:
        pending_doc: Doc | None = None
        self.accept()
        while self.tok:
            info = self.line_info
            if self.tok == "#":
                _reject_dangling_doc(pending_doc)
                docs = self.doc_block(info)
                self.result.docs.extend(docs)
                pending_doc = docs[-1]
                continue
            expr = self.value()
            if not isinstance(expr, dict):
                raise QapiError(info, "top-level expression must be an object")
            if "include" in expr:
                _reject_dangling_doc(pending_doc)
                self.include(expr, info)
            elif "pragma" in expr:
                _reject_dangling_doc(pending_doc)
                self.apply_pragmas(expr, info)
            else:
                if pending_doc is not None and pending_doc.symbol is None:
                    raise QapiError(pending_doc.info, "definition documentation required")
                self.result.exprs.append(TopLevel(dict(expr), info, pending_doc))
            pending_doc = None
        _reject_dangling_doc(pending_doc)

    def doc_block(self, info: SourceInfo) -> list[Doc]:
        """Read a '##' ... '##' block; '# =' headings split free-form text into several docs."""
        if self.val != "##":
            raise self.error("junk after '##' at start of documentation comment")
        docs: list[Doc] = []
        doc = Doc(info)
        self.accept(want_doc=True)
        try:
            while self.tok == "#":
                line = self.val
                assert isinstance(line, str)
                if line.startswith("##"):
                    if line != "##":
                        raise DocSyntaxError("junk after '##' at end of documentation comment")
                    doc.close()
                    docs.append(doc)
                    self.accept()
                    return docs
                if line.startswith("# ="):
                    if doc.symbol is not None:
                        raise DocSyntaxError("unexpected '=' markup in definition documentation")
                    if doc.body.text:
                        doc.close()
                        docs.append(doc)
                        doc = Doc(info)
                doc.append(line)
                self.accept(want_doc=True)
        except DocSyntaxError as exc:
            raise self.error(str(exc)) from None
        raise self.error("documentation comment must end with '##'")

    def include(self, expr: dict[str, Value], info: SourceInfo) -> None:
        if len(expr) != 1:
            raise QapiError(info, "invalid 'include' directive")
        target = expr["include"]
        if not isinstance(target, str):
            raise QapiError(info, "value of 'include' must be a string")
        path = os.path.join(os.path.dirname(self.fname), target)
        self.result.exprs.append(TopLevel({"include": path}, info))
        absolute = os.path.abspath(path)
        chain: SourceInfo | None = info
        while chain is not None:
            if os.path.abspath(chain.fname) == absolute:
                raise QapiError(info, f"inclusion loop for {target}")
            chain = chain.parent
        if absolute in self.included:
            return
        try:
            sub = _FileParser(path, info, self.pragma, self.included, self.result)
        except OSError as exc:
            raise QapiError(info, f"can't read include file '{path}': {exc.strerror}") from None
        sub.parse()

    def apply_pragmas(self, expr: dict[str, Value], info: SourceInfo) -> None:
        if len(expr) != 1:
            raise QapiError(info, "invalid 'pragma' directive")
        pragmas = expr["pragma"]
        if not isinstance(pragmas, dict):
            raise QapiError(info, "value of 'pragma' must be an object")
        for name, value in pragmas.items():
            if name == "doc-required":
                if not isinstance(value, bool):
                    raise QapiError(info, "pragma 'doc-required' must be boolean")
                self.pragma.doc_required = value
                continue
            attr = _LIST_PRAGMAS.get(name)
            if attr is None:
                raise QapiError(info, f"unknown pragma '{name}'")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise QapiError(info, f"pragma {name} must be a list of strings")
            setattr(self.pragma, attr, [str(v) for v in value])


_LIST_PRAGMAS = {
    "command-name-exceptions": "command_name_exceptions",
    "command-returns-exceptions": "command_returns_exceptions",
    "member-name-exceptions": "member_name_exceptions",
}


def _reject_dangling_doc(doc: Doc | None) -> None:
    if doc is not None and doc.symbol is not None:
        raise QapiError(
            doc.info, f"documentation for '{doc.symbol}' is not followed by the definition"
        )


def parse_schema(fname: str, extra: Sequence[str] = ()) -> tuple[ParseResult, Pragma]:
    """Parse FNAME and everything it includes, in order, each file once; then each EXTRA
    file as if FNAME's last line included it (qmpjobd's users' schema files: their messages
    name their own file, not an include chain)."""
    pragma = Pragma()
    result = ParseResult()
    included: set[str] = set()
    for n, path in enumerate([fname, *extra]):
        if n:
            # Listed as an include of the root, for the module order introspection follows.
            result.exprs.append(TopLevel({"include": path}, SourceInfo(path, 1, None, pragma)))
            if os.path.abspath(path) in included:
                continue
        try:
            parser = _FileParser(path, None, pragma, included, result)
        except OSError as exc:
            raise QapiError(None, f"can't read schema file '{path}': {exc.strerror}") from None
        parser.parse()
    return result, pragma
