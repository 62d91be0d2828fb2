"""The compiler on QEMU 7.2's own schemas, and introspection against the live reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmpjobd.cli import SCHEMA_DEFINES
from qmpjobd.qapi import load_schema
from qmpjobd.qapi.introspect import introspect
from tests.conftest import SCHEMA
from tests.daemons import QSD_DEFINES, QsdProcess
from tests.schema_shape import SUBSETTED, own_names, shape, subset_paths


@pytest.fixture(scope="module")
def qsd_schema(qsd: QsdProcess) -> list[dict[str, object]]:
    with qsd.connect() as conn:
        reply = conn.execute("query-qmp-schema")
    result: list[dict[str, object]] = reply["return"]
    return result


def _key(entry: dict[str, object]) -> str:
    return json.dumps(entry, sort_keys=True)


def test_storage_daemon_schema_loads(qemu_source: Path) -> None:
    schema = load_schema(str(qemu_source / "storage-daemon/qapi/qapi-schema.json"))
    # The root file plus the 13 files it includes, and the files those include.
    assert len(schema.modules) >= 14
    assert schema.lookup("blockdev-backup") is not None


def test_system_emulator_schema_loads(qemu_source: Path) -> None:
    schema = load_schema(str(qemu_source / "qapi/qapi-schema.json"))
    names = {c.name for c in schema.commands()}
    assert {"query-cpus-fast", "blockdev-add", "job-finalize", "migrate"} <= names


def test_introspection_is_identical_to_qsd(
    qemu_source: Path, qsd_schema: list[dict[str, object]]
) -> None:
    """Every entry QSD reports, numbering included, and nothing more."""
    schema = load_schema(str(qemu_source / "storage-daemon/qapi/qapi-schema.json"))
    ours = introspect(schema, QSD_DEFINES)
    assert len(ours) == len(qsd_schema)
    assert sorted(map(_key, ours)) == sorted(map(_key, qsd_schema))
    # And in the same order: commands and events by module, then types as first reached.
    assert [e["name"] for e in ours] == [e["name"] for e in qsd_schema]


def test_introspection_describes_each_command_and_event_like_qsd(
    qemu_source: Path, qsd_schema: list[dict[str, object]]
) -> None:
    """The same comparison by structure, ignoring numbering, entry by entry."""
    schema = load_schema(str(qemu_source / "storage-daemon/qapi/qapi-schema.json"))
    ours = introspect(schema, QSD_DEFINES)
    names = [e["name"] for e in qsd_schema if e["meta-type"] in ("command", "event")]
    assert len(names) > 80
    for name in names:
        assert shape(ours, str(name)) == shape(qsd_schema, str(name)), name


def test_our_schema_matches_qsd_for_what_it_defines(qsd_schema: list[dict[str, object]]) -> None:
    """qmpjobd's own schema, under the daemon's build conditions, describes its commands and
    events exactly as QSD does; those of SUBSETTED (a subset of the drivers and transaction
    actions, by design) exactly but for the left-out values and branches."""
    schema = load_schema(str(SCHEMA))
    ours = introspect(schema, SCHEMA_DEFINES)
    own = own_names(schema)  # qmpjobd's own (schema/task.json): QSD has no counterpart
    names = [e["name"] for e in ours
             if e["meta-type"] in ("command", "event") and e["name"] not in own]
    assert "job-finalize" in names and "JOB_STATUS_CHANGE" in names
    assert set(SUBSETTED) <= set(names)
    for name in names:
        mine, theirs = shape(ours, str(name)), shape(qsd_schema, str(name))
        if name in SUBSETTED:
            assert subset_paths(mine, theirs) == SUBSETTED[name], name
        else:
            assert mine == theirs, name
