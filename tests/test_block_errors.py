"""I/O errors in block jobs, on real failing files, differentially against qemu-storage-daemon.

Three kinds of failure, all real:
- a target that cannot be written: an immutable file (chattr +i once the node is open: every
  write then fails with EPERM);
- a full disk: the target on a 4 MiB tmpfs, the source 16 MiB (ENOSPC after 4 MiB);
- a source that cannot be read: a file on a FUSE mount served by a separate
  qemu-storage-daemon, whose blkdebug node fails reads of one sector with EIO.

For each on-source-error / on-target-error policy both daemons must send the same replies and
the same per-job events (BLOCK_JOB_ERROR with its operation and action, the job's statuses,
io-status, progress), and a job stopped by an error must go on once resumed and leave the
same bytes. Needs root (chattr, mount) and /dev/fuse, as CI has.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing
from tests.daemons import DaemonProcess
from tests.test_block_files import (  # noqa: F401  (fixtures)
    WAIT,
    Side,
    daemons,
    dense,
    sides,
)

MiB = 1 << 20
Event = dict[str, Any]
_pairs = itertools.count()


@pytest.fixture(autouse=True)
def _privileges() -> None:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        missing("these tests make immutable files and mount file systems: they need root")


class Pair:
    """Both daemons, driven with the same steps; replies compared, events kept per job."""

    def __init__(self, pair: list[Side]) -> None:
        self.sides = pair
        self.events: list[dict[str, list[Event]]] = [{} for _ in pair]
        # Names of the test's own: the daemons outlive a failed test and keep its nodes.
        n = next(_pairs)
        self.src, self.dst, self.job = f"src{n}", f"dst{n}", f"j{n}"

    def _collect(self, i: int) -> None:
        for event in self.sides[i].conn.events:
            data = event["data"]
            job = data.get("id", data.get("device"))
            self.events[i].setdefault(job, []).append({"event": event["event"], "data": data})
        self.sides[i].conn.events.clear()

    def cmd(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        replies = []
        for i, side in enumerate(self.sides):
            args = arguments
            if args is not None:
                args = json.loads(json.dumps(args).replace("DIR", str(side.dir)))
            text = json.dumps(side.cmd(command, args), sort_keys=True)
            replies.append(json.loads(text.replace(str(side.dir), "DIR")))
            self._collect(i)
        assert replies[0] == replies[1], (command, arguments, replies)
        return replies[0]

    def until(self, job: str, done: Callable[[list[Event]], bool]) -> None:
        """Wait on both daemons until JOB's events (unrequested pauses dropped) satisfy DONE."""
        for i, side in enumerate(self.sides):
            while not done(self.job_events(i, job)):
                side.conn.events.append(side.conn.receive(timeout=WAIT))
                self._collect(i)

    def job_events(self, i: int, job: str) -> list[Event]:
        """JOB's events on side I, without the `paused`, `running` pair QSD shows when a
        backup starts (docs/compat.md); a pause that follows a BLOCK_JOB_ERROR is real."""
        events = self.events[i].get(job, [])
        kept: list[Event] = []
        skip = False
        for n, event in enumerate(events):
            if skip:
                skip = False
                continue
            if (
                _status(event) == "paused" and n + 1 < len(events)
                and _status(events[n + 1]) == "running"
                and not (kept and kept[-1]["event"] == "BLOCK_JOB_ERROR")
            ):
                skip = True
                continue
            kept.append(event)
        return kept

    def same_events(self, job: str, collapse: bool = False) -> list[Event]:
        """JOB's events, equal on both daemons (COLLAPSE: runs of one BLOCK_JOB_ERROR as one,
        where their number depends on timing)."""
        seqs = [self.job_events(i, job) for i in range(len(self.sides))]
        if collapse:
            seqs = [[e for n, e in enumerate(s) if n == 0 or e != s[n - 1]] for s in seqs]
        assert seqs[0] == seqs[1], (job, seqs)
        return seqs[0]


def _status(event: Event) -> str | None:
    if event["event"] != "JOB_STATUS_CHANGE":
        return None
    status: str = event["data"]["status"]
    return status


def has_status(*statuses: str) -> Callable[[list[Event]], bool]:
    return lambda events: any(_status(e) in statuses for e in events)


def stopped(events: list[Event]) -> bool:
    """A BLOCK_JOB_ERROR, then the job paused."""
    names = [e["event"] if _status(e) != "paused" else "paused" for e in events]
    return "BLOCK_JOB_ERROR" in names and "paused" in names[names.index("BLOCK_JOB_ERROR"):]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


@contextmanager
def immutable_targets(pair: Pair, size: int) -> Iterator[None]:
    """src.img (random) and dst.img (a hole) on each side, both added as nodes; dst made
    immutable once open. Undone however the test ends (pytest must be able to remove it)."""
    for side in pair.sides:
        (side.dir / "src.img").write_bytes(dense(size, 99))
        with open(side.dir / "dst.img", "wb") as f:
            f.truncate(size)
    add_nodes(pair)
    try:
        for side in pair.sides:
            immutable(side.dir / "dst.img", True)
        yield
    finally:
        for side in pair.sides:
            immutable(side.dir / "dst.img", False)


def add_nodes(pair: Pair, source: str = "DIR/src.img", target: str = "DIR/dst.img") -> None:
    pair.cmd("blockdev-add", {"driver": "file", "node-name": pair.src, "filename": source})
    pair.cmd("blockdev-add", {"driver": "file", "node-name": pair.dst, "filename": target})


def del_nodes(pair: Pair) -> None:
    pair.cmd("blockdev-del", {"node-name": pair.src})
    pair.cmd("blockdev-del", {"node-name": pair.dst})


def start(pair: Pair, kind: str, **policy: str) -> None:
    pair.cmd(f"blockdev-{kind}", {"job-id": pair.job, "device": pair.src, "target": pair.dst,
                                  "sync": "full", **policy})


def finish(pair: Pair, kind: str) -> None:
    """Let the job end well (a mirror completed once ready); the events must show success."""
    job = pair.job
    if kind == "mirror":
        pair.until(job, has_status("ready"))
        pair.cmd("job-complete", {"id": job})
    pair.until(job, has_status("null"))
    completed = [e for e in pair.same_events(job) if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert len(completed) == 1 and "error" not in completed[0]["data"], completed


# -- a target that cannot be written ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["backup", "mirror"])
@pytest.mark.parametrize("policy", ["report", "enospc"])
def test_write_error_reported(sides: list[Side], kind: str, policy: str) -> None:  # noqa: F811
    pair = Pair(sides)
    with immutable_targets(pair, 16 * MiB):
        before = [digest(s.dir / "src.img") for s in sides]
        start(pair, kind, **{"on-target-error": policy})
        pair.until(pair.job, has_status("null"))
        events = pair.same_events(pair.job)
        # A mirror has sixteen requests in flight, and each fails: sixteen events, as QSD.
        errors = [e for e in events if e["event"] == "BLOCK_JOB_ERROR"]
        assert len(errors) == (1 if kind == "backup" else 16)
        assert errors[0]["data"] == {"device": pair.job, "operation": "write", "action": "report"}
        end = [e for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert end[0]["data"]["error"] == "Operation not permitted"
        pair.cmd("query-jobs")
        del_nodes(pair)
    assert [digest(s.dir / "src.img") for s in sides] == before


@pytest.mark.parametrize("kind", ["backup", "mirror"])
def test_write_error_stops_then_resumes(sides: list[Side], kind: str) -> None:  # noqa: F811
    pair = Pair(sides)
    with immutable_targets(pair, 16 * MiB):
        start(pair, kind, **{"on-target-error": "stop"})
        pair.until(pair.job, stopped)
        paused = pair.cmd("query-block-jobs")["return"][0]
        assert (paused["io-status"], paused["paused"], paused["status"]) == (
            "failed", True, "paused")
        assert pair.cmd("query-jobs")["return"][0]["status"] == "paused"
        for side in sides:
            immutable(side.dir / "dst.img", False)
        pair.cmd("job-resume", {"id": pair.job})
        finish(pair, kind)
        del_nodes(pair)
    for side in sides:
        assert digest(side.dir / "dst.img") == digest(side.dir / "src.img"), side.label


def test_ignored_write_errors_retry(sides: list[Side]) -> None:  # noqa: F811
    """An ignored error is retried until it goes away (one event per attempt: how many
    depends on timing, so runs of them are compared as one)."""
    pair = Pair(sides)
    with immutable_targets(pair, 4 * MiB):
        start(pair, "backup", **{"on-target-error": "ignore"})
        pair.until(pair.job, lambda events: any(e["event"] == "BLOCK_JOB_ERROR" for e in events))
        for side in sides:
            immutable(side.dir / "dst.img", False)
        pair.until(pair.job, has_status("null"))
        events = pair.same_events(pair.job, collapse=True)
        assert {"event": "BLOCK_JOB_ERROR",
                "data": {"device": pair.job, "operation": "write", "action": "ignore"}} in events
        assert "error" not in events[-3]["data"]  # BLOCK_JOB_COMPLETED, concluded, null
        del_nodes(pair)
    for side in sides:
        assert digest(side.dir / "dst.img") == digest(side.dir / "src.img"), side.label


# -- a full disk ---------------------------------------------------------------------------------


@contextmanager
def small_disks(pair: Pair, size: str) -> Iterator[None]:
    """A tmpfs of SIZE at DIR/full on each side."""
    with ExitStack() as stack:
        for side in pair.sides:
            mountpoint = side.dir / "full"
            mountpoint.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                            str(mountpoint)], check=True)
            stack.callback(subprocess.run, ["umount", "-l", str(mountpoint)], check=True)
        yield


@pytest.mark.parametrize("policy", ["enospc", "report"])
def test_full_disk(sides: list[Side], policy: str) -> None:  # noqa: F811
    pair = Pair(sides)
    with small_disks(pair, "4M"):
        for side in sides:
            (side.dir / "src.img").write_bytes(dense(16 * MiB, 5))
            with open(side.dir / "full" / "dst.img", "wb") as f:
                f.truncate(16 * MiB)
        add_nodes(pair, target="DIR/full/dst.img")
        start(pair, "backup", **{"on-target-error": policy})
        if policy == "enospc":
            # ENOSPC stops the job: it waits, paused, with "nospace", until resumed or
            # cancelled. Progress: the 4 MiB that fitted, as QSD counts them.
            pair.until(pair.job, stopped)
            info = pair.cmd("query-block-jobs")["return"][0]
            assert (info["io-status"], info["offset"]) == ("nospace", 4 * MiB)
            pair.cmd("block-job-cancel", {"device": pair.job, "force": True})
        pair.until(pair.job, has_status("null"))
        events = pair.same_events(pair.job)
        action = "stop" if policy == "enospc" else "report"
        assert events[2]["data"] == {"device": pair.job, "operation": "write", "action": action}
        if policy == "report":
            assert events[-3]["data"]["error"] == "No space left on device"
        del_nodes(pair)


# -- a source that cannot be read ------------------------------------------------------------


BAD_SECTOR = 4100  # in the third MiB


@contextmanager
def failing_sources(pair: Pair) -> Iterator[None]:
    """DIR/err.img on each side: 4 MiB of random data on a FUSE mount that fails reads of
    BAD_SECTOR with EIO (a qemu-storage-daemon exporting a blkdebug node over the file)."""
    if not os.path.exists("/dev/fuse"):
        missing("/dev/fuse is needed to serve a failing file")
    extra: list[str] = []
    for n, side in enumerate(pair.sides):
        (side.dir / "base.img").write_bytes(dense(4 * MiB, 17))
        (side.dir / "err.img").touch()
        node = {"driver": "blkdebug", "node-name": f"dbg{n}",
                "image": {"driver": "file", "filename": str(side.dir / "base.img")},
                "inject-error": [{"event": "none", "iotype": "read", "errno": 5,
                                  "sector": BAD_SECTOR}]}
        extra += ["--blockdev", json.dumps(node), "--export",
                  f"type=fuse,id=e{n},node-name=dbg{n},mountpoint={side.dir / 'err.img'},"
                  "writable=off"]
    workdir = pair.sides[0].dir.parent.parent / "fuse"
    workdir.mkdir()
    with DaemonProcess.start(workdir, *extra):
        yield


@pytest.mark.parametrize("kind", ["backup", "mirror"])
@pytest.mark.parametrize("policy", ["report", "stop"])
def test_read_error(sides: list[Side], kind: str, policy: str) -> None:  # noqa: F811
    pair = Pair(sides)
    with failing_sources(pair):
        for side in sides:
            with open(side.dir / "dst.img", "wb") as f:
                f.truncate(4 * MiB)
        add_nodes(pair, source="DIR/err.img")
        start(pair, kind, **{"on-source-error": policy})
        if policy == "stop":
            pair.until(pair.job, stopped)
            info = pair.cmd("query-block-jobs")["return"][0]
            # The other three MiB were copied; the one with the bad sector waits.
            assert (info["io-status"], info["offset"]) == ("failed", 3 * MiB)
            pair.cmd("block-job-cancel", {"device": pair.job, "force": True})
        pair.until(pair.job, has_status("null"))
        events = pair.same_events(pair.job)
        errors = [e["data"] for e in events if e["event"] == "BLOCK_JOB_ERROR"]
        assert errors == [{"device": pair.job, "operation": "read", "action": policy}]
        if policy == "report":
            assert events[-3]["data"]["error"] == "Input/output error"
        del_nodes(pair)


def test_unrequested_pauses_dropped() -> None:
    """The helper that drops QSD's unrequested pause keeps a pause that an error caused."""
    def change(status: str) -> Event:
        return {"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": status}}

    error = {"event": "BLOCK_JOB_ERROR", "data": {"device": "j"}}
    pair = Pair([])
    pair.events = [{"j": [change("running"), change("paused"), change("running"), error,
                          change("paused"), change("running")]}]
    assert pair.job_events(0, "j") == [change("running"), error, change("paused"),
                                       change("running")]
