"""The tables the dispatcher is built from, and the output-side conformance check."""

from __future__ import annotations

import pytest

from qmpjobd.cli import SCHEMA_DEFINES
from qmpjobd.qapi import load_schema
from qmpjobd.qapi.conform import problem
from qmpjobd.qapi.schema import Schema, Type
from qmpjobd.qapi.tables import build_tables, python_name
from qmpjobd.qapi.visit import ArgumentError
from tests.conftest import SCHEMA
from tests.daemons import QsdProcess
from tests.schema_shape import own_names


@pytest.fixture(scope="module")
def schema() -> Schema:
    return load_schema(str(SCHEMA))


def type_of(schema: Schema, name: str) -> Type:
    found = schema.lookup_type(name)
    assert found is not None, name
    return found


def test_tables_of_our_schema(schema: Schema) -> None:
    tables = build_tables(schema)
    own = own_names(schema)  # qmpjobd's own (schema/task.json), after all of QSD's
    assert list(tables.commands)[-len(own & set(tables.commands)):] == [
        c for c in tables.commands if c in own
    ]
    # In QSD's order (its query-commands lists them so, reversed): module by module, block-core
    # before job (which block-core includes), transaction last.
    assert [c for c in tables.commands if c not in own] == [
        "query-block-jobs", "block-commit", "drive-backup", "blockdev-backup",
        "query-named-block-nodes", "drive-mirror", "blockdev-mirror", "block-stream",
        "block-job-set-speed", "block-job-cancel", "block-job-pause", "block-job-resume",
        "block-job-complete", "block-job-dismiss", "block-job-finalize", "blockdev-add",
        "blockdev-del", "blockdev-create",
        "job-pause", "job-resume", "job-cancel", "job-complete", "job-dismiss", "job-finalize",
        "query-jobs", "qmp_capabilities", "query-version", "query-commands", "quit",
        "query-qmp-schema", "transaction",
    ]
    assert [e for e in tables.events if e not in own] == [
        "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "BLOCK_JOB_READY",
        "BLOCK_JOB_PENDING", "JOB_STATUS_CHANGE",
    ]
    caps = tables.commands["qmp_capabilities"]
    assert caps.allow_preconfig and not caps.allow_oob and caps.success_response
    assert caps.check_arguments({"enable": ["oob"]}) == {"enable": ["oob"]}
    with pytest.raises(ArgumentError, match="does not accept value 'fast'"):
        caps.check_arguments({"enable": ["fast"]})
    assert tables.commands["job-pause"].check_arguments({"id": "j"}) == {"id": "j"}
    query_jobs = tables.commands["query-jobs"]
    assert query_jobs.returns is not None and query_jobs.returns.name == "JobInfoList"
    assert tables.events["JOB_STATUS_CHANGE"].data is not None


def test_python_names() -> None:
    assert python_name("job-id") == "job_id"
    assert python_name("x-perf") == "x_perf"


def test_our_introspection_conforms_to_our_schema_info_type(schema: Schema) -> None:
    tables = build_tables(schema)
    assert problem(tables.schema_info, type_of(schema, "SchemaInfoList"), frozenset()) is None


def test_qsd_replies_conform_to_our_types(schema: Schema, qsd: QsdProcess) -> None:
    """What the reference answers fits the return types we declare for the same commands."""
    with qsd.connect() as conn:
        for command in ("query-version", "query-commands", "query-qmp-schema", "query-jobs"):
            entry = build_tables(schema).commands[command]
            assert entry.returns is not None
            reply = conn.execute(command)["return"]
            assert problem(reply, entry.returns, frozenset()) is None, command


def test_conformance_problems_are_found(schema: Schema) -> None:
    version = type_of(schema, "VersionInfo")
    good = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "qmpjobd"}
    assert problem(good, version, frozenset()) is None
    assert problem({"qemu": good["qemu"]}, version, frozenset()) == "package: missing"
    assert problem({**good, "extra": 1}, version, frozenset()) == (
        "extra: not a member of VersionInfo"
    )
    bad_minor = {"qemu": {"major": 7, "minor": "2", "micro": 0}, "package": ""}
    assert problem(bad_minor, version, frozenset()) == "qemu.minor: '2' is not a int"
    info = type_of(schema, "JobInfoList")
    job = {"id": "j", "type": "backup", "status": "sideways", "current-progress": 0,
           "total-progress": 1}
    assert problem([job], info, frozenset()) == "[0].status: 'sideways' is not a JobStatus"


def test_block_drivers_and_actions_are_a_subset(schema: Schema) -> None:
    """The deliberate subset (docs/compat.md, "Block nodes and drivers"): drivers and
    transaction actions qmpjobd does not have fail the argument check; those it has take QEMU's
    members, conditional ones included under the daemon's build conditions."""
    commands = build_tables(schema, SCHEMA_DEFINES).commands
    add = commands["blockdev-add"]
    null = {"driver": "null-co", "node-name": "n", "size": 1, "read-zeroes": True}
    assert add.check_arguments(null) == null
    raw = {"driver": "raw", "node-name": "r", "offset": 512,
           "file": {"driver": "file", "filename": "/x", "aio": "io_uring", "drop-cache": False}}
    assert add.check_arguments(raw) == raw
    with pytest.raises(ArgumentError, match="'driver' does not accept value 'qed'"):
        add.check_arguments({"driver": "qed", "node-name": "q", "file": "r"})
    qcow2 = {"driver": "qcow2", "node-name": "q", "file": "r", "backing": None}
    assert add.check_arguments(qcow2) == qcow2
    create = commands["blockdev-create"]
    options = {"driver": "file", "filename": "/x", "size": 1, "preallocation": "falloc"}
    assert create.check_arguments({"job-id": "j", "options": options}) == {
        "job_id": "j", "options": options}
    transaction = commands["transaction"]
    abort = {"actions": [{"type": "abort", "data": {}}]}
    assert transaction.check_arguments(abort) == abort
    with pytest.raises(ArgumentError, match="'type' does not accept value 'blockdev-snapshot'"):
        transaction.check_arguments({"actions": [{"type": "blockdev-snapshot", "data": {}}]})
