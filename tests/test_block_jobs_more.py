"""blockdev-create (driver file), block-stream and block-commit on nodes without a backing file,
differentially against qemu-storage-daemon 7.2: replies and per-job event sequences must agree,
and the files blockdev-create makes must have the same sizes (and full preallocation must
allocate). Synchronisation is by events only.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest

from tests.test_block_files import (  # noqa: F401  (fixtures)
    WAIT,
    Side,
    _subst,
    daemons,
    sides,
)


def normalise(message: dict[str, Any], side: Side) -> str:
    """The message as canonical JSON, the side's directory and generated names replaced."""
    text = json.dumps(message, sort_keys=True).replace(str(side.dir), "DIR")
    return re.sub(r"#block\d+", "#blockN", text)

MiB = 1 << 20


@pytest.fixture
def both_sides(sides: list[Side]) -> list[Side]:  # noqa: F811
    return sides
ENDS = ("concluded", "null")


class Run:
    """Both daemons, driven step by step; their events kept per job."""

    def __init__(self, pair: list[Side]) -> None:
        self.sides = pair
        self.events: list[dict[str, list[Any]]] = [{} for _ in pair]
        # Every event in arrival order, across jobs: (job, event).
        self.arrivals: list[list[tuple[str, str]]] = [[] for _ in pair]

    def _collect(self, i: int) -> None:
        side = self.sides[i]
        for event in side.conn.events:
            data = event["data"]
            job = data.get("id", data.get("device"))
            text = normalise({"event": event["event"], "data": data}, side)
            self.events[i].setdefault(job, []).append(text)
            self.arrivals[i].append((job, text))
        side.conn.events.clear()

    def completions(self, i: int, *jobs: str) -> list[tuple[str, str]]:
        """The events that end JOBS on side I, in arrival order across them."""
        ending = ('"status": "concluded"', '"status": "null"', "BLOCK_JOB_COMPLETED",
                  "BLOCK_JOB_CANCELLED")
        return [(job, text) for job, text in self.arrivals[i]
                if job in jobs and any(mark in text for mark in ending)]

    def cmd(self, command: str, arguments: dict[str, Any] | None = None) -> str:
        replies = []
        for i, side in enumerate(self.sides):
            args = None if arguments is None else _subst(arguments, str(side.dir))
            replies.append(normalise(side.cmd(command, args), side))
            self._collect(i)
        assert replies[0] == replies[1], (command, arguments, replies)
        return replies[0]

    def wait(self, job: str, *statuses: str) -> None:
        """Until JOB has reported one of STATUSES, on both daemons."""
        for i, side in enumerate(self.sides):
            while not any(
                f'"status": "{s}"' in e for s in statuses for e in self.events[i].get(job, [])
            ):
                side.conn.events.append(side.conn.receive(timeout=WAIT))
                self._collect(i)

    def check_events(self, *backups: str) -> None:
        """Per-job sequences equal; for BACKUPS without the unrequested `paused`, `running`
        pair a backup start shows (docs/job-model.md; compared in test_job_differential)."""
        seqs = [dict(events) for events in self.events]
        for seq in seqs:
            for job in backups:
                kept: list[Any] = []
                for event in seq[job]:
                    if '"status": "paused"' in event:
                        continue
                    if '"status": "running"' in event and kept and kept[-1] == event:
                        continue
                    kept.append(event)
                seq[job] = kept
        assert seqs[0] == seqs[1]


def create(job: str, filename: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"job-id": job, "options": {"driver": "file", "filename": filename, "size": size,
                                       **extra}}


def test_blockdev_create_file(both_sides: list[Side]) -> None:
    r = Run(both_sides)
    for side in r.sides:
        (side.dir / "old.img").write_bytes(b"x" * 3 * MiB)
    made = {"c1": ("a.img", MiB), "c5": ("full.img", 3000000), "c6": ("falloc.img", 3000000),
            "c8": ("nocow.img", 3000000), "c9": ("old.img", 1000), "c10": ("zero.img", 0)}
    extra: dict[str, dict[str, Any]] = {
        "c5": {"preallocation": "full"}, "c6": {"preallocation": "falloc"},
        "c8": {"nocow": True}, "c9": {"preallocation": "off"},
    }
    for job, (name, size) in made.items():
        r.cmd("blockdev-create", create(job, f"DIR/{name}", size, **extra.get(job, {})))
        r.wait(job, *ENDS)
    failing = {
        "e1": create("e1", "DIR/nodir/a.img", MiB),
        "e2": create("e2", "DIR", MiB),
        "e3": create("e3", "DIR/meta.img", MiB, preallocation="metadata"),
        "e4": create("e4", "DIR/neg.img", -1),
    }
    for job, args in failing.items():
        r.cmd("blockdev-create", args)
        r.wait(job, *ENDS)
    r.cmd("blockdev-create", create("c1", "DIR/b.img", MiB))  # id in use
    r.cmd("blockdev-create", create("", "DIR/b.img", MiB))
    r.cmd("blockdev-create", create("#x", "DIR/b.img", MiB))
    r.cmd("blockdev-create", {"job-id": "n1", "options": {"driver": "null-co"}})
    r.cmd("blockdev-create", {"job-id": "n2", "options": {"driver": "raw"}})
    r.cmd("blockdev-create", {"job-id": "n3", "options": {"driver": "raw", "size": 1}})
    r.cmd("query-jobs")
    r.cmd("query-block-jobs")
    for job in [*made, *failing]:
        r.cmd("job-dismiss", {"id": job})
        r.wait(job, "null")
    r.cmd("query-jobs")
    r.check_events()
    assert len(r.events[0]["c5"]) == 6 and len(r.events[0]["e1"]) == 5
    for name, size in made.values():
        stats = [os.stat(side.dir / name) for side in r.sides]
        assert [s.st_size for s in stats] == [size, size], name
    for side in r.sides:
        full = os.stat(side.dir / "full.img")
        assert full.st_blocks * 512 >= 3000000, side.label
        assert (side.dir / "full.img").read_bytes() == bytes(3000000)
        assert (side.dir / "meta.img").exists()


@pytest.mark.parametrize("verb", ["job-cancel", "job-pause"])
def test_verbs_on_a_create_job_reply_at_once(both_sides: list[Side], verb: str) -> None:
    """A create job writing its preallocation in a worker thread cannot act until that returns;
    a verb sent meanwhile is answered first, as in QSD, not held until the file is made. (QSD
    cancels it once the write is done; a pause has no effect on a create job.)"""
    r = Run(both_sides)
    r.cmd("blockdev-create", create("big", "DIR/big.img", 256 * MiB, preallocation="full"))
    r.cmd(verb, {"id": "big"})
    for events in r.events:
        assert [e for e in events["big"] if "aborting" in e or "waiting" in e] == []
    r.wait("big", "concluded")
    r.cmd("job-dismiss", {"id": "big"})
    r.wait("big", "null")
    r.check_events()


def test_block_stream_without_backing(both_sides: list[Side]) -> None:
    r = Run(both_sides)
    for side in r.sides:
        with open(side.dir / "a.img", "wb") as f:
            f.truncate(MiB)
    r.cmd("blockdev-add", {"driver": "null-co", "node-name": "sn", "size": 4 * MiB})
    r.cmd("blockdev-add", {"driver": "null-co", "node-name": "sm", "size": 4 * MiB})
    r.cmd("blockdev-add", {"driver": "raw", "node-name": "sr", "file": {
        "driver": "file", "node-name": "sf", "filename": "DIR/a.img"}})
    r.cmd("block-stream", {"job-id": "s1", "device": "sn"})
    r.cmd("query-jobs")
    r.cmd("block-stream", {"job-id": "s2", "device": "sr", "speed": 100,
                           "auto-finalize": False, "auto-dismiss": False})
    r.wait("s2", "pending")
    r.cmd("query-jobs")
    r.cmd("query-block-jobs")
    r.cmd("block-stream", {"job-id": "s3", "device": "sr"})  # busy
    r.cmd("block-commit", {"job-id": "c", "device": "sr"})  # not a root while streamed
    r.cmd("job-finalize", {"id": "s2"})
    r.wait("s2", "concluded")
    r.cmd("query-block-jobs")
    r.cmd("job-dismiss", {"id": "s2"})
    r.wait("s2", "null")
    for arguments in [
        {"device": "sf"},
        {"device": "nope"},
        {"job-id": "s4", "device": "sn", "base": "x"},
        {"job-id": "s4", "device": "sn", "base": "sn"},
        {"job-id": "s4", "device": "sn", "base-node": "x"},
        {"job-id": "s4", "device": "sn", "base-node": "sm"},
        {"job-id": "s4", "device": "sn", "base-node": "sn"},
        {"job-id": "s4", "device": "sn", "bottom": "sm"},
        {"job-id": "s4", "device": "sn", "base": "x", "base-node": "y"},
        {"job-id": "s4", "device": "sn", "base": "x", "bottom": "y"},
        {"job-id": "s4", "device": "sn", "backing-file": "y"},
        {"job-id": "s4", "device": "sn", "speed": -1},
        {"job-id": "#s4", "device": "sn"},
        {"job-id": "s5", "device": "sn", "bottom": "sn"},
        {"job-id": "s6", "device": "sn", "on-error": "stop", "filter-node-name": "flt"},
        {"job-id": "s7", "device": "sf"},
        {"job-id": "s8", "device": "sn", "bottom": "x"},
        {"job-id": "s8", "device": "sn", "bottom": "x", "base-node": "y"},
    ]:
        r.cmd("block-stream", arguments)
    # A backup's source may be streamed; its target may not, nor be committed.
    r.cmd("blockdev-backup", {"job-id": "b", "device": "sn", "target": "sm", "sync": "none"})
    r.cmd("block-stream", {"job-id": "s9", "device": "sn"})
    r.cmd("block-stream", {"job-id": "s10", "device": "sm"})
    r.cmd("block-commit", {"job-id": "c", "device": "sm"})
    r.cmd("job-cancel", {"id": "b"})
    r.wait("b", "null")
    r.cmd("query-jobs")
    r.check_events("b")


def test_block_commit_without_backing(both_sides: list[Side]) -> None:
    r = Run(both_sides)
    r.cmd("blockdev-add", {"driver": "null-co", "node-name": "cn", "size": 4 * MiB})
    r.cmd("blockdev-add", {"driver": "null-co", "node-name": "cm", "size": 4 * MiB})
    for arguments in [
        {"job-id": "c1", "device": "cn"},
        {"device": "cn"},
        {"job-id": "#c", "device": "cn"},
        {"job-id": "c1", "device": "nope"},
        {"job-id": "c1", "device": "cn", "top": "x"},
        {"job-id": "c1", "device": "cn", "top": "cn"},
        {"job-id": "c1", "device": "cn", "top-node": "x"},
        {"job-id": "c1", "device": "cn", "top-node": "cm"},
        {"job-id": "c1", "device": "cn", "top-node": "cn"},
        {"job-id": "c1", "device": "cn", "base": "x"},
        {"job-id": "c1", "device": "cn", "base-node": "x"},
        {"job-id": "c1", "device": "cn", "base-node": "cm"},
        {"job-id": "c1", "device": "cn", "base-node": "cn"},
        {"job-id": "c1", "device": "cn", "top": "x", "top-node": "y"},
        {"job-id": "c1", "device": "cn", "base": "x", "base-node": "y"},
        {"job-id": "c1", "device": "cn", "speed": -1},
        {"job-id": "c1", "device": "cn", "backing-file": "z"},
        {"job-id": "c1", "device": "cn", "on-error": "enospc", "filter-node-name": "f"},
    ]:
        r.cmd("block-commit", arguments)
    r.cmd("query-jobs")
    r.check_events()
