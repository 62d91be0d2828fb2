"""query-named-block-nodes, differentially against qemu-storage-daemon 7.2.

Each test gets a fresh pair of daemons (so the reply lists that test's nodes only), builds the
same nodes over the same kind of files on both, and compares the replies as parsed JSON. Only
what must differ is normalised: each side's directory (DIR) and the generated '#blockNNNNN'
names of inline children and drive-* targets ('#blockN'). QSD's jobs put a filter node above
their source (copy-before-write for backups, mirror_top for mirrors) that qmpjobd does not have
(docs/compat.md): those nodes, recognised by their driver, are dropped from QSD's reply before
comparing. Everything else, actual-size included, is compared as is: both sides' files are
written the same way on the same file system. Jobs are followed by their events.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing
from tests.daemons import QMPJOBD, QSD, DaemonProcess, QmpConnection, daemon_env
from tests.test_block_files import _subst, make_files

WAIT = 30.0
MiB = 1 << 20
# The drivers of QSD's job filter nodes, which qmpjobd does without.
JOB_FILTERS = ("copy-before-write", "mirror_top")


@dataclass
class Side:
    """One daemon, a client of it, and a directory of its own for the test's files."""

    label: str
    conn: QmpConnection
    dir: Path

    def cmd(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """The command's return value; a failure is the test's failure."""
        reply = self.conn.execute(command, _subst(arguments or {}, str(self.dir)))
        assert "return" in reply, (self.label, command, arguments, reply)
        return reply["return"]

    def nodes(self, **arguments: Any) -> list[dict[str, Any]]:
        """query-named-block-nodes, normalised (see the module's docstring)."""
        reply = self.cmd("query-named-block-nodes", arguments)
        return [_normalise(node, str(self.dir)) for node in reply if node["drv"] not in JOB_FILTERS]

    def wait_job(self, job: str, status: str) -> None:
        """Until JOB reaches STATUS (its JOB_STATUS_CHANGE event, kept aside or still to come)."""
        while True:
            for event in self.conn.events:
                data = event["data"]
                if event["event"] == "JOB_STATUS_CHANGE" and data == {"id": job, "status": status}:
                    return
            self.conn.events.append(self.conn.receive(timeout=WAIT))


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[list[Side]]:
    if shutil.which("qemu-storage-daemon") is None:
        missing("qemu-storage-daemon is not installed (apt-get install qemu-system-common)")
    (tmp_path / "qsd").mkdir()
    (tmp_path / "qmpjobd").mkdir()
    log = str(tmp_path / "qmpjobd" / "qmpjobd.log")
    with (
        DaemonProcess.start(tmp_path / "qsd", program=QSD) as qsd,
        DaemonProcess.start(
            tmp_path / "qmpjobd", "--log", log, program=QMPJOBD, env=daemon_env()
        ) as ours,
    ):
        out: list[Side] = []
        try:
            for i, (label, daemon) in enumerate((("qsd", qsd), ("qmpjobd", ours))):
                conn = QmpConnection(daemon.socket_path, timeout=WAIT)
                assert conn.execute("qmp_capabilities") == {"return": {}}
                # Paths of the same length on both sides, so that long names compare.
                files = tmp_path / f"files{i}"
                files.mkdir()
                out.append(Side(label, conn, files))
            yield out
        finally:
            for side in out:
                side.conn.close()



def _normalise(value: Any, directory: str) -> Any:
    if isinstance(value, str):
        return re.sub(r"#block\d+", "#blockN", value.replace(directory, "DIR"))
    if isinstance(value, dict):
        return {k: _normalise(v, directory) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v, directory) for v in value]
    return value


def run(sides: list[Side], *steps: tuple[str, dict[str, Any]]) -> None:
    for command, arguments in steps:
        for side in sides:
            side.cmd(command, arguments)


def same_nodes(
    sides: list[Side], *, holes_in: str | None = None, **arguments: Any
) -> list[dict[str, Any]]:
    """The normalised replies of both daemons, which must be equal; QSD's.

    HOLES_IN names a job's target image whose zeroes QSD writes out and qmpjobd leaves as holes
    (docs/compat.md, "Holes stay holes"): its nodes' actual-size is left out of the comparison."""
    qsd, ours = (side.nodes(**arguments) for side in sides)
    for node in [*qsd, *ours]:
        if node["image"]["filename"] == holes_in:
            node["image"]["actual-size"] = "(allocation differs)"
    assert ours == qsd, "\n".join(difflib.unified_diff(_lines(qsd), _lines(ours), "qsd", "qmpjobd"))
    return qsd


def _lines(nodes: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(node, sort_keys=True) for node in nodes]


def write(sides: list[Side], files: dict[str, bytes | int]) -> None:
    """The same files on both sides: bytes, or a size for a sparse file of that size."""
    for side in sides:
        make_files(side.dir, files)


def add(**options: Any) -> tuple[str, dict[str, Any]]:
    return ("blockdev-add", options)


def file(name: str, filename: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return add(driver="file", **{"node-name": name}, filename=filename, **extra)


def names(nodes: list[dict[str, Any]]) -> list[str]:
    return [node["node-name"] for node in nodes]


# -- nodes as blockdev-add makes them ------------------------------------------------------------


def test_empty(sides: list[Side]) -> None:
    assert same_nodes(sides) == []


def test_file_nodes(sides: list[Side]) -> None:
    write(sides, {"a.img": b"x" * 1000, "b.img": MiB, "c.img": b"y" * (128 << 10)})
    run(
        sides,
        file("plain", "DIR/a.img"),
        file("ro", "DIR/b.img", **{"read-only": True}),
        file("auto-ro", "DIR/b.img", **{"auto-read-only": True}),
        file("direct", "DIR/c.img", cache={"direct": True}),
        file("no-flush", "DIR/c.img", cache={"no-flush": True, "direct": False}),
        file("unmap", "DIR/c.img", discard="unmap", **{"detect-zeroes": "unmap"}),
        file("zeroes-on", "DIR/c.img", **{"detect-zeroes": "on"}, locking="on"),
        file("unlocked", "DIR/c.img", locking="off", aio="threads"),
    )
    nodes = same_nodes(sides)
    # Newest first.
    assert names(nodes) == [
        "unlocked", "zeroes-on", "unmap", "no-flush", "direct", "auto-ro", "ro", "plain"
    ]
    plain = nodes[-1]
    assert plain["file"] == plain["image"]["filename"] == "DIR/a.img"
    assert plain["image"]["virtual-size"] == 1024  # whole sectors
    assert same_nodes(sides, flat=True) == nodes
    assert same_nodes(sides, flat=False) == nodes


def test_raw_nodes(sides: list[Side]) -> None:
    write(sides, {"a.img": b"x" * 1000, "c.img": b"y" * (128 << 10), "s.img": 4 * MiB})
    run(
        sides,
        file("f", "DIR/c.img"),
        add(driver="raw", **{"node-name": "by-ref"}, file="f"),
        add(driver="raw", **{"node-name": "inline"},
            file={"driver": "file", "filename": "DIR/a.img"}),
        add(driver="raw", **{"node-name": "window", "read-only": True}, offset=512, size=1024,
            file={"driver": "file", "filename": "DIR/c.img", "node-name": "window-file"}),
        add(driver="raw", **{"node-name": "offset0"}, file="f", offset=0),
        add(driver="raw", **{"node-name": "sized"}, file="f", size=4096),
        # Cache settings and read-only pass to an inline child; detect-zeroes does not.
        add(driver="raw", **{"node-name": "inherits", "read-only": True,
                             "detect-zeroes": "unmap"},
            discard="unmap", cache={"direct": True, "no-flush": True},
            file={"driver": "file", "filename": "DIR/s.img"}),
        add(driver="raw", **{"node-name": "own-cache"}, cache={"direct": True},
            file={"driver": "file", "filename": "DIR/s.img", "cache": {"direct": False}}),
        add(driver="raw", **{"node-name": "over-raw"}, file="by-ref"),
        add(driver="raw", **{"node-name": "over-window"}, file="window"),
    )
    nodes = same_nodes(sides)
    assert names(nodes)[:3] == ["over-window", "over-raw", "own-cache"]
    by_name = {node["node-name"]: node for node in nodes}
    assert by_name["by-ref"]["file"] == "DIR/c.img"
    assert by_name["window"]["file"].startswith("json:")
    assert same_nodes(sides, flat=False) == nodes


def test_raw_over_null(sides: list[Side]) -> None:
    run(
        sides,
        add(driver="raw", **{"node-name": "r1"}, file={"driver": "null-co"}),
        add(driver="raw", **{"node-name": "r2"}, file={"driver": "null-co", "size": 8192,
                                                       "read-zeroes": True}),
        add(driver="raw", **{"node-name": "r3", "read-only": True}, size=4096,
            file={"driver": "null-co", "latency-ns": 1, "node-name": "n3"}),
    )
    nodes = same_nodes(sides)
    assert [node["drv"] for node in nodes] == ["raw", "null-co"] * 3
    assert nodes[-2]["file"] == "null-co://"


def test_null_nodes(sides: list[Side]) -> None:
    run(
        sides,
        add(driver="null-co", **{"node-name": "default"}),
        add(driver="null-co", **{"node-name": "sized"}, size=1000),
        add(driver="null-co", **{"node-name": "zeroes"}, size=MiB, **{"read-zeroes": True}),
        add(driver="null-co", **{"node-name": "no-zeroes"}, size=0, **{"read-zeroes": False}),
        add(driver="null-co", **{"node-name": "slow"}, **{"latency-ns": 5}),
        add(driver="null-co", **{"node-name": "settings", "read-only": True,
                                 "detect-zeroes": "on"}, cache={"direct": True, "no-flush": True}),
    )
    nodes = same_nodes(sides)
    assert names(nodes) == ["settings", "slow", "no-zeroes", "zeroes", "sized", "default"]
    assert nodes[1]["file"] == "null-co://"  # latency-ns does not change the data
    assert same_nodes(sides, flat=True) == nodes


def test_order_after_delete(sides: list[Side]) -> None:
    run(
        sides,
        add(driver="null-co", **{"node-name": "a"}),
        add(driver="null-co", **{"node-name": "b"}),
        add(driver="raw", **{"node-name": "c"}, file={"driver": "null-co", "node-name": "c0"}),
        ("blockdev-del", {"node-name": "b"}),
        add(driver="null-co", **{"node-name": "b"}),
    )
    assert names(same_nodes(sides)) == ["b", "c", "c0", "a"]
    run(sides, ("blockdev-del", {"node-name": "c"}))
    assert names(same_nodes(sides)) == ["b", "a"]


def test_json_filenames_quoted_and_cut(sides: list[Side]) -> None:
    # A name QEMU's JSON writer escapes, and a path long enough that the "json:" description
    # passes QEMU's PATH_MAX and is cut off with "...".
    odd = 'we"ird\\ \u00e9\u20ac\U0001f600\t.img'
    # A path of some 4060 bytes (below PATH_MAX, so that it opens) in 200-byte components.
    room = 4060 - len(str(sides[0].dir)) - len("/long.img")
    deep = ("d" * 199 + "/") * ((room - 1) // 200)
    deep += "e" * (room - len(deep))
    for side in sides:
        (side.dir / deep).mkdir(parents=True)
    write(sides, {odd: 4096, f"{deep}/long.img": 4096})
    run(
        sides,
        add(driver="raw", **{"node-name": "odd"}, offset=0, file={"driver": "file",
                                                              "filename": f"DIR/{odd}"}),
        add(driver="raw", **{"node-name": "long"}, size=512,
            file={"driver": "file", "filename": f"DIR/{deep}/long.img"}),
    )
    qsd = sides[0].cmd("query-named-block-nodes")
    assert len(qsd[0]["file"]) == 4095 and qsd[0]["file"].endswith("...")
    same_nodes(sides)


# -- nodes held by jobs ----------------------------------------------------------------------------


def test_backup_source_bitmap(sides: list[Side]) -> None:
    # A running backup keeps a bitmap of what it has still to copy on its source; QSD's
    # copy-before-write filter node above the source is dropped (module docstring).
    run(
        sides,
        add(driver="null-co", **{"node-name": "src"}, size=4 * MiB),
        add(driver="null-co", **{"node-name": "dst"}, size=4 * MiB),
        ("blockdev-backup", {"job-id": "j", "device": "src", "target": "dst", "sync": "full",
                             "speed": 1}),
    )
    nodes = same_nodes(sides)
    assert names(nodes) == ["dst", "src"]
    assert "dirty-bitmaps" in nodes[1] and "dirty-bitmaps" not in nodes[0]
    run(sides, ("job-cancel", {"id": "j"}))
    for side in sides:
        side.wait_job("j", "null")
    assert "dirty-bitmaps" not in same_nodes(sides)[1]


def test_backup_pending(sides: list[Side]) -> None:
    run(
        sides,
        add(driver="null-co", **{"node-name": "src"}, size=MiB),
        add(driver="null-co", **{"node-name": "dst"}, size=MiB),
        ("blockdev-backup", {"job-id": "j", "device": "src", "target": "dst", "sync": "full",
                             "auto-finalize": False, "auto-dismiss": False}),
    )
    for side in sides:
        side.wait_job("j", "pending")
    assert same_nodes(sides)[1]["dirty-bitmaps"][0]["count"] == 0
    run(sides, ("job-finalize", {"id": "j"}))
    for side in sides:
        side.wait_job("j", "concluded")
    assert "dirty-bitmaps" not in same_nodes(sides)[1]


def test_mirror_source_bitmap(sides: list[Side]) -> None:
    run(
        sides,
        add(driver="null-co", **{"node-name": "src"}, size=4 * MiB, **{"read-zeroes": True}),
        add(driver="null-co", **{"node-name": "dst"}, size=4 * MiB),
        ("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst", "sync": "full",
                             "granularity": 131072}),
    )
    for side in sides:
        side.wait_job("j", "ready")
    nodes = same_nodes(sides)
    assert names(nodes) == ["dst", "src"]
    assert nodes[1]["dirty-bitmaps"][0]["recording"] is True
    run(sides, ("job-cancel", {"id": "j"}))
    for side in sides:
        side.wait_job("j", "null")
    assert "dirty-bitmaps" not in same_nodes(sides)[1]


@pytest.mark.parametrize("fmt", ["raw", "file"])
def test_drive_backup_target_listed(sides: list[Side], fmt: str) -> None:
    # drive-backup's target nodes are listed ('#block...', detect-zeroes unmap on the top one)
    # until the job concludes. Compared once the job waits to be finalized: while it copies,
    # QSD's bitmap counts a chunk as copied once its write is issued, and a chunk qmpjobd is
    # writing in a worker thread is not visible to query-named-block-nodes.
    write(sides, {"src.img": b"z" * MiB + bytes(MiB)})
    run(
        sides,
        file("src", "DIR/src.img"),
        ("drive-backup", {"job-id": "j", "device": "src", "target": "DIR/t.img", "sync": "full",
                          "format": fmt, "auto-finalize": False}),
    )
    for side in sides:
        side.wait_job("j", "pending")
    nodes = same_nodes(sides, holes_in="DIR/t.img")
    assert [node["drv"] for node in nodes] == (["raw"] if fmt == "raw" else []) + ["file", "file"]
    assert nodes[0]["detect_zeroes"] == "unmap"
    assert nodes[-1]["dirty-bitmaps"][0]["count"] == 0
    run(sides, ("job-finalize", {"id": "j"}))
    for side in sides:
        side.wait_job("j", "null")
    assert names(same_nodes(sides)) == ["src"]


def test_drive_mirror_target_listed(sides: list[Side]) -> None:
    write(sides, {"src.img": b"z" * MiB, "m.img": MiB})
    run(
        sides,
        file("src", "DIR/src.img"),
        ("drive-mirror", {"job-id": "j", "device": "src", "target": "DIR/m.img", "sync": "full",
                          "format": "raw", "mode": "existing"}),
    )
    for side in sides:
        side.wait_job("j", "ready")
    nodes = same_nodes(sides)
    assert [node["drv"] for node in nodes] == ["raw", "file", "file"]
    # A node added now is newer than the job's target nodes: listed before them.
    run(sides, add(driver="null-co", **{"node-name": "late"}))
    assert [node["drv"] for node in same_nodes(sides)] == ["null-co", "raw", "file", "file"]
    run(sides, ("job-complete", {"id": "j"}))
    for side in sides:
        side.wait_job("j", "null")
    assert names(same_nodes(sides)) == ["late", "src"]
