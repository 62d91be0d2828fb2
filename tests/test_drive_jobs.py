"""drive-backup, drive-mirror and the transaction's drive-backup action on real files,
differentially against qemu-storage-daemon 7.2: replies and per-job event sequences must agree
(generated '#blockNNN' names and the per-daemon directory normalised), the targets must hold
the source's bytes once the jobs have ended, and a target made by mode absolute-paths must have
the source's size. Synchronisation is by events only.
"""

from __future__ import annotations

import os
from typing import Any

from tests.test_block_files import (  # noqa: F401  (fixtures)
    Side,
    _subst,
    daemons,
    sides,
)
from tests.test_block_jobs_more import ENDS, Run, normalise

MiB = 1 << 20
# Whole backup clusters: QSD counts a backup's progress in 64 KiB clusters, rounded up
# (qmpjobd counts bytes; docs/compat.md).
SIZE = 3 * MiB + 65536
SMALL = 65536


def setup(r: Run, dev: str) -> bytes:
    """The test's files and its source node DEV (the daemons are shared by the module's tests:
    each test has node names of its own)."""
    data = os.urandom(SIZE)
    for side in r.sides:
        (side.dir / "src.img").write_bytes(data)
        (side.dir / "ex.img").write_bytes(bytes(SIZE))
        (side.dir / "small.img").write_bytes(bytes(SMALL))
    r.cmd("blockdev-add", {"driver": "raw", "node-name": dev, "file": {
        "driver": "file", "node-name": f"{dev}f", "filename": "DIR/src.img"}})
    return data


def backup(
    job: str, target: str, sync: str = "full", dev: str = "src", **extra: Any
) -> dict[str, Any]:
    return {"job-id": job, "device": dev, "target": f"DIR/{target}", "sync": sync, **extra}


def same_bytes(r: Run, name: str, data: bytes) -> None:
    for side in r.sides:
        assert (side.dir / name).read_bytes() == data, (side.label, name)


def test_drive_backup(sides: list[Side]) -> None:  # noqa: F811
    r = Run(sides)
    data = setup(r, "src")
    r.cmd("blockdev-add", {"driver": "null-co", "node-name": "srcnul", "size": MiB})
    r.cmd("blockdev-add", {"driver": "file", "node-name": "srcfs", "filename": "DIR/small.img"})
    r.cmd("drive-backup", backup("b1", "t1.img"))
    r.wait("b1", "null")
    r.cmd("drive-backup", backup("b2", "ex.img", format="raw", mode="existing"))
    r.wait("b2", "null")
    r.cmd("drive-backup", backup("b3", "t3.img", "top", format="raw", mode="absolute-paths",
                                 **{"auto-finalize": False, "auto-dismiss": False}))
    r.wait("b3", "pending")
    r.cmd("query-block-jobs")
    r.cmd("job-finalize", {"id": "b3"})
    r.wait("b3", "concluded")
    r.cmd("job-dismiss", {"id": "b3"})
    r.wait("b3", "null")
    r.cmd("drive-backup", {"job-id": "b4", "device": "srcfs", "target": "DIR/t4.img",
                           "sync": "full"})
    r.wait("b4", "null")
    r.cmd("drive-backup", backup("b5", "t5.img", format="file"))
    r.wait("b5", "null")
    # A slow one, cancelled; then one with x-perf.
    r.cmd("drive-backup", backup("b6", "t6.img", speed=1000))
    r.cmd("job-cancel", {"id": "b6"})
    r.wait("b6", "null")
    r.cmd("drive-backup", backup("b7", "t7.img", **{"x-perf": {"max-chunk": 65536,
                                                              "max-workers": 2}}))
    r.wait("b7", "null")
    for arguments in [
        backup("e1", "e1.img", format="nope"),
        {"job-id": "e2", "device": "nope", "target": "DIR/e2.img", "sync": "full"},
        backup("e3", "nodir/e3.img"),
        backup("e4", "nodir/e4.img", mode="existing"),
        backup("e5", "e5.img", mode="existing", format="raw"),
        backup("e6", "small.img", mode="existing"),
        backup("e7", "src.img", mode="existing"),
        {"device": "src", "target": "DIR/e9.img", "sync": "full"},
        backup("#e10", "e10.img"),
        backup("e11", "e11.img", speed=-1),
        backup("e12", "e12.img", "incremental"),
        backup("e13", "e13.img", **{"x-perf": {"max-chunk": 100}}),
        backup("e14", "e14.img", "none"),
        backup("e15", "ex.img", "none", mode="existing"),
        backup("e16", "", mode="absolute-paths"),
        {"job-id": "e17", "device": "srcnul", "target": "DIR/e17.img", "sync": "full"},
    ]:
        r.cmd("drive-backup", arguments)
    r.cmd("query-jobs")
    r.check_events("b1", "b2", "b3", "b4", "b5", "b6", "b7")
    for name in ("t1.img", "ex.img", "t3.img", "t5.img", "t7.img"):
        same_bytes(r, name, data)
    same_bytes(r, "t4.img", bytes(SMALL))
    for side in r.sides:
        assert os.stat(side.dir / "t6.img").st_size == SIZE
    # Which files the failures left behind (made before the check that refused them).
    left = [sorted(n for n in os.listdir(side.dir) if n.startswith("e")) for side in r.sides]
    assert left[0] == left[1]
    # The internal targets are closed: their files may be written by a new node.
    r.cmd("blockdev-add", {"driver": "file", "node-name": "srct1", "filename": "DIR/t1.img"})
    r.cmd("blockdev-backup", {"job-id": "b8", "device": "src", "target": "srct1", "sync": "full"})
    r.wait("b8", "null")
    clobber_source(r, "drive-backup", "src")


def clobber_source(r: Run, command: str, dev: str) -> None:
    """mode absolute-paths onto the source's own file: QSD makes the new image, emptying the
    file, before its image lock stops the job; qmpjobd refuses a file a node has open before
    it writes anything (docs/compat.md)."""
    qsd, ours = r.sides
    qsd.conn.execute(command, _in(qsd, backup("e8", "src.img", dev=dev)))
    assert (qsd.dir / "src.img").read_bytes() == bytes(SIZE)  # what QSD does
    before = (ours.dir / "src.img").read_bytes()
    assert any(before)
    assert ours.conn.execute(command, _in(ours, backup("e8", "src.img", dev=dev))) == {
        "error": {"class": "GenericError", "desc": 'Failed to get "write" lock'}}
    assert (ours.dir / "src.img").read_bytes() == before
    assert all(job["id"] != "e8" for job in ours.conn.execute("query-jobs")["return"])


def _in(side: Side, arguments: dict[str, Any]) -> dict[str, Any]:
    return {k: v.replace("DIR", str(side.dir)) if isinstance(v, str) else v
            for k, v in arguments.items()}


def test_drive_mirror(sides: list[Side]) -> None:  # noqa: F811
    r = Run(sides)
    data = setup(r, "msrc")
    r.cmd("blockdev-add", {"driver": "null-co", "node-name": "msrcnul", "size": MiB})
    r.cmd("drive-mirror", backup("m1", "m1.img", dev="msrc"))
    r.wait("m1", "ready")
    r.cmd("query-block-jobs")
    r.cmd("job-complete", {"id": "m1"})
    r.wait("m1", "null")
    r.cmd("drive-mirror", backup("m2", "ex.img", dev="msrc", mode="existing", format="raw",
                                 granularity=65536, **{"buf-size": MiB}))
    r.wait("m2", "ready")
    r.cmd("block-job-cancel", {"device": "m2"})
    r.wait("m2", "null")
    r.cmd("drive-mirror", backup("m3", "ex.img", "none", dev="msrc", mode="existing"))
    r.wait("m3", "ready")
    r.cmd("job-cancel", {"id": "m3"})
    r.wait("m3", "null")
    r.cmd("drive-mirror", backup("m4", "m4.img", "top", dev="msrc", format="file",
                                 **{"auto-finalize": False, "auto-dismiss": False}))
    r.wait("m4", "ready")
    r.cmd("job-complete", {"id": "m4"})
    r.wait("m4", "pending")
    r.cmd("job-finalize", {"id": "m4"})
    r.wait("m4", "concluded")
    r.cmd("job-dismiss", {"id": "m4"})
    r.wait("m4", "null")
    r.cmd("drive-mirror", backup("m5", "small.img", dev="msrc", mode="existing"))
    r.wait("m5", *ENDS)
    for arguments in [
        {"job-id": "e0", "device": "msrcnul", "target": "DIR/e0.img", "sync": "full"},
        backup("e1", "e1.img", "none", dev="msrc"),
        backup("e2", "e2.img", dev="msrc", granularity=100),
        backup("e3", "e3.img", dev="msrc", **{"buf-size": -1}),
        backup("e4", "e4.img", "incremental", dev="msrc"),
        backup("e5", "nodir/e5.img", dev="msrc"),
        backup("e6", "e6.img", dev="msrc", mode="existing"),
        backup("e7", "src.img", dev="msrc", mode="existing"),
        {"device": "msrc", "target": "DIR/e8.img", "sync": "full"},
        backup("e9", "e9.img", dev="msrc", speed=-1),
        backup("e10", "e10.img", dev="msrc", format="nope"),
        {"job-id": "e11", "device": "nope", "target": "DIR/e11.img", "sync": "full"},
        backup("e12", "e12.img", dev="msrc", replaces="x"),
        backup("e13", "e13.img", dev="msrc", granularity=3 << 16),
    ]:
        r.cmd("drive-mirror", arguments)
    r.cmd("query-jobs")
    r.check_events()
    same_bytes(r, "m1.img", data)
    same_bytes(r, "ex.img", data)
    same_bytes(r, "m4.img", data)
    for side in r.sides:
        assert os.stat(side.dir / "m1.img").st_size == SIZE
    left = [sorted(n for n in os.listdir(side.dir) if n.startswith("e")) for side in r.sides]
    assert left[0] == left[1]
    clobber_source(r, "drive-mirror", "msrc")


def transaction(r: Run, actions: list[dict[str, Any]], mode: str = "individual") -> None:
    """A transaction on both daemons (Run.cmd does not look into lists for DIR)."""
    replies = []
    for i, side in enumerate(r.sides):
        args = {
            "actions": [_subst(action, str(side.dir)) for action in actions],
            "properties": {"completion-mode": mode},
        }
        replies.append(normalise(side.cmd("transaction", args), side))
        r._collect(i)
    assert replies[0] == replies[1], (actions, replies)


def test_transaction_drive_backup(sides: list[Side]) -> None:  # noqa: F811
    r = Run(sides)
    data = setup(r, "xsrc")

    def action(job: str, target: str, **extra: Any) -> dict[str, Any]:
        return {"type": "drive-backup", "data": backup(job, target, dev="xsrc", **extra)}

    transaction(r, [action("x1", "x1.img"), action("x2", "x2.img")])
    r.wait("x1", "null")
    r.wait("x2", "null")
    transaction(r, [action("x3", "x3.img"), action("x4", "x4.img")], "grouped")
    r.wait("x3", "null")
    r.wait("x4", "null")
    # A group completes job by job: COMPLETED, concluded, null of one, then of the next.
    assert r.completions(1, "x3", "x4") == r.completions(0, "x3", "x4")
    # A failing action rolls back the jobs made before it (their target files stay).
    transaction(r, [action("y1", "y1.img"), action("y2", "y2.img"), action("y3", "nodir/y3.img")])
    transaction(r, [action("y4", "y4.img"), {"type": "abort", "data": {}}])
    transaction(r, [action("y5", "y5.img"), action("y5", "y6.img")])
    transaction(r, [action("y7", "y7.img", speed=-1)])
    transaction(r, [action("y8", "y8.img", sync="none")])
    r.cmd("query-jobs")
    r.check_events("x1", "x2", "x3", "x4")
    for name in ("x1.img", "x2.img", "x3.img", "x4.img"):
        same_bytes(r, name, data)
    left = [sorted(n for n in os.listdir(side.dir) if n.startswith("y")) for side in r.sides]
    assert left[0] == left[1]
    # The rolled-back jobs' targets were closed: a new job may write them.
    r.cmd("drive-backup", backup("z", "y1.img", dev="xsrc", mode="existing"))
    r.wait("z", "null")
    same_bytes(r, "y1.img", data)

