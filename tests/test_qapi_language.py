"""The schema language as the model sees it: positions, docs, conditions, flags, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qmpjobd.qapi import QapiError, load_schema
from qmpjobd.qapi.introspect import introspect
from qmpjobd.qapi.schema import AlternateType, Command, Cond, EnumType, ObjectType
from tests.conftest import REPO, SCHEMA

CONDITIONAL = """\
{ 'pragma': { 'doc-required': false } }
{ 'enum': 'Drive', 'data': [ 'null', { 'name': 'file', 'if': 'HAVE_FILE' },
                             { 'name': 'nbd', 'if': { 'not': 'NO_NET' } } ] }
{ 'struct': 'Opts', 'data': { 'a': 'int',
                              '*b': { 'type': 'str', 'if': { 'all': [ 'X', 'Y' ] } },
                              'c': { 'type': 'bool', 'features': [ 'unstable' ] } },
  'features': [ { 'name': 'fancy', 'if': { 'any': [ 'X', 'Z' ] } } ] }
{ 'command': 'only-with-x', 'if': 'X', 'data': { 'o': 'Opts' } }
{ 'command': 'always', 'returns': [ 'Opts' ], 'allow-oob': true }
{ 'event': 'BOOM', 'data': { 'drive': 'Drive' } }
"""


def write(tmp_path: Path, text: str, name: str = "s.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(QapiError) as caught:
        load_schema(str(path))
    return str(caught.value)


def test_error_columns_count_tabs_to_the_next_multiple_of_eight(tmp_path: Path) -> None:
    path = write(tmp_path, "{ 'enum': 'A',\n\t'data': [ 'x' ] ?\n")
    # '\t' takes the column to 9; "'data': [ 'x' ] " is 16 more.
    assert error_of(path) == f"{path}:2:25: stray '?'"


def test_semantic_errors_name_the_definition_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "\n\n{ 'struct': 'Job',\n  'data': { 'id': 'Missing' } }\n")
    assert error_of(path) == (
        f"{path}: In struct 'Job':\n{path}:3: member 'id' uses unknown type 'Missing'"
    )


def test_errors_in_included_files_show_the_include_chain(tmp_path: Path) -> None:
    write(tmp_path, "{ 'include': 'inner.json' }\n", "middle.json")
    write(tmp_path, "{ 'command': 'Bad' }\n", "inner.json")
    root = write(tmp_path, "\n{ 'include': 'middle.json' }\n", "root.json")
    inner = tmp_path / "inner.json"
    assert error_of(root) == (
        f"In file included from {root}:2:\n"
        f"In file included from {tmp_path / 'middle.json'}:1:\n"
        f"{inner}: In command 'Bad':\n"
        f"{inner}:1: name of command must not use uppercase or '_'"
    )


def test_each_file_is_included_once(tmp_path: Path) -> None:
    write(tmp_path, "{ 'enum': 'Once', 'data': [ 'a' ] }\n", "common.json")
    write(tmp_path, "{ 'include': 'common.json' }\n", "a.json")
    root = write(tmp_path, "{ 'include': 'a.json' }\n{ 'include': 'common.json' }\n")
    schema = load_schema(str(root))
    assert isinstance(schema.lookup("Once"), EnumType)
    assert [Path(m).name for m in schema.modules] == ["s.json", "a.json", "common.json"]


def test_doc_comments_stay_with_their_definitions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "##\n# = Jobs\n##\n\n"
        "##\n# @job-stop:\n#\n# Stops a job.\n#\n# @id: the job's\n#      identifier\n#\n"
        "# Since: 7.2\n##\n{ 'command': 'job-stop', 'data': { 'id': 'str' } }\n",
    )
    schema = load_schema(str(path))
    heading, doc = schema.docs
    assert heading.symbol is None and heading.body.text == "= Jobs"
    command = schema.lookup("job-stop")
    assert isinstance(command, Command) and command.doc is doc
    assert doc.symbol == "job-stop"
    assert doc.body.text == "Stops a job."
    assert doc.members["id"].text == "the job's\nidentifier"
    assert [(s.name, s.text) for s in doc.sections] == [("Since", "7.2")]


def test_conditions() -> None:
    assert Cond(None).holds(set())
    assert Cond("A").holds({"A"}) and not Cond("A").holds(set())
    assert Cond({"not": "A"}).holds(set())
    both = Cond({"all": ["A", "B"]})
    assert both.holds({"A", "B"}) and not both.holds({"A"})
    assert Cond({"any": ["A", {"not": "B"}]}).holds(set())
    assert not Cond({"any": ["A", "B"]}).holds({"C"})


def test_model(tmp_path: Path) -> None:
    schema = load_schema(str(write(tmp_path, CONDITIONAL)))
    opts = schema.lookup("Opts")
    assert isinstance(opts, ObjectType)
    assert [(m.name, m.type.name, m.optional) for m in opts.members] == [
        ("a", "int", False), ("b", "str", True), ("c", "bool", False)
    ]
    always = schema.lookup("always")
    assert isinstance(always, Command) and always.allow_oob and not always.boxed
    assert always.ret_type is not None and always.ret_type.name == "OptsList"
    only = schema.lookup("only-with-x")
    assert isinstance(only, Command) and only.arg_type is not None
    assert only.arg_type.name == "q_obj_only-with-x-arg"


def test_introspection_applies_conditions(tmp_path: Path) -> None:
    schema = load_schema(str(write(tmp_path, CONDITIONAL)))

    def entries(*defines: str) -> dict[str, dict[str, object]]:
        return {str(e["name"]): e for e in introspect(schema, frozenset(defines))}

    bare = entries()
    assert "only-with-x" not in bare
    assert bare["always"]["allow-oob"] is True
    drive = next(e for e in bare.values() if e["meta-type"] == "enum" and "null" in e["values"])
    assert drive["values"] == ["null", "nbd"]
    opts_name = bare["always"]["ret-type"]
    assert isinstance(opts_name, str) and opts_name.startswith("[")
    opts = bare[opts_name[1:-1]]
    assert opts["features"] == []
    assert opts["members"] == [
        {"name": "a", "type": "int"},
        {"name": "c", "type": "bool", "features": ["unstable"]},
    ]

    full = entries("X", "Y", "HAVE_FILE", "NO_NET")
    assert "only-with-x" in full
    drive = next(e for e in full.values() if e["meta-type"] == "enum" and "null" in e["values"])
    assert drive["values"] == ["null", "file"]
    opts = full[str(opts_name)[1:-1]]
    assert opts["features"] == ["fancy"]
    assert {"name": "b", "type": "str", "default": None} in opts["members"]  # type: ignore[operator]


def test_introspection_is_deterministic() -> None:
    runs = [
        subprocess.run(
            [sys.executable, "-m", "qmpjobd.qapi", "introspect", str(SCHEMA)],
            capture_output=True, check=True, cwd=REPO,
            env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"},
        ).stdout
        for seed in (1, 2)
    ]
    assert runs[0] == runs[1]
    entries = json.loads(runs[0])
    assert any(e["name"] == "query-jobs" and e["meta-type"] == "command" for e in entries)


def test_cli_check(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "qmpjobd.qapi", "check", str(SCHEMA)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert (good.returncode, good.stdout, good.stderr) == (0, "", "")
    bad = write(tmp_path, "{ 'alternate': 'Either', 'data': { 'a': 'str', 'b': 'str' } }\n")
    result = subprocess.run(
        [sys.executable, "-m", "qmpjobd.qapi", "check", str(bad)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"{bad}: In alternate 'Either':\n"
        f"{bad}:1: branch 'b' can't be distinguished from 'a'\n"
    )


def test_cli_introspect_with_defines(tmp_path: Path) -> None:
    path = write(tmp_path, CONDITIONAL)

    def commands(*args: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "qmpjobd.qapi", "introspect", str(path), *args],
            capture_output=True, text=True, check=True, cwd=REPO,
        ).stdout
        return [e["name"] for e in json.loads(out) if e["meta-type"] == "command"]

    assert commands() == ["always"]
    assert commands("--define", "X") == ["only-with-x", "always"]


def test_alternates_tell_branches_apart_by_json_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "{ 'enum': 'Mode', 'data': [ 'on', 'off' ] }\n"
        "{ 'alternate': 'Speed', 'data': { 'n': 'int', 'mode': 'Mode' } }\n",
    )
    schema = load_schema(str(path))
    assert isinstance(schema.lookup("Speed"), AlternateType)
    clash = write(
        tmp_path,
        "{ 'enum': 'Mode', 'data': [ 'on', 'off' ] }\n"
        "{ 'alternate': 'Speed', 'data': { 'flag': 'bool', 'mode': 'Mode' } }\n",
        "clash.json",
    )
    assert error_of(clash).endswith("branch 'mode' can't be distinguished from 'flag'")


def test_crlf_line_ends_read_like_lf(tmp_path: Path) -> None:
    text = (
        "##\n# @Mode:\n#\n# How.\n#\n# @fast: quickly\n##\n"
        "{ 'enum': 'Mode', 'data': [ 'fast' ] }\n"
    )
    lf = load_schema(str(write(tmp_path, text, "lf.json")))
    crlf = load_schema(str(write(tmp_path, text.replace("\n", "\r\n"), "crlf.json")))
    assert [d.symbol for d in crlf.docs] == [d.symbol for d in lf.docs] == ["Mode"]
    bad = write(tmp_path, "{ 'enum': 'Mode',\r\n  'data': [ 'fast' ] } ?\r\n", "bad.json")
    assert error_of(bad) == f"{bad}:2:24: stray '?'"
