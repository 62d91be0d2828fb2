"""The import graph of qmpjobd/: no cycle anywhere, down to single modules.

import-linter's contracts (pyproject.toml, run by scripts/test) keep the layers one way; a
cycle inside one layer, or between two modules of one package, is not theirs to see. This test
builds the graph the same way (grimp: imports inside functions count, those under
`if TYPE_CHECKING:` do not) and looks for strongly connected components.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent


def cycles(package: str) -> list[list[str]]:
    """Every set of modules of PACKAGE that import each other in a circle, each sorted."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=True, cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) & graph.modules for m in graph.modules}
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.append(sorted(component))
    return sorted(found)


def test_qmpjobd_has_no_import_cycle() -> None:
    assert cycles("qmpjobd") == []


def test_the_check_sees_cycles_through_functions_but_not_type_checking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "cyclic"
    package.mkdir()
    files = {
        "__init__.py": "",
        # a -> b at module level, b -> a inside a function: a cycle.
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from . import a\n    return a\n",
        # c -> d, and d -> c only for the type checker: no cycle.
        "c.py": "from . import d\n",
        "d.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from . import c
        """,
    }
    for name, text in files.items():
        (package / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert cycles("cyclic") == [["cyclic.a", "cyclic.b"]]
    finally:
        for name in [m for m in sys.modules if m == "cyclic" or m.startswith("cyclic.")]:
            del sys.modules[name]


def _design_modules() -> set[str]:
    """The modules docs/design.md's map of the rooms names: its first code block, a tree with
    two spaces of indent per level, one entry per line ("name.py  what it holds", "dir/")."""
    text = (REPO / "docs" / "design.md").read_text()
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    names: set[str] = set()
    folders: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        entry = line.split()[0]
        del folders[depth:]
        if entry.endswith("/"):
            folders.append(entry.rstrip("/"))
        elif entry.endswith(".py"):
            names.add("/".join([*folders, entry]))
    return names


def test_the_design_names_every_module_and_no_other() -> None:
    actual = {
        str(path.relative_to(REPO)) for path in (REPO / "qmpjobd").rglob("*.py")
    }
    assert _design_modules() == actual
