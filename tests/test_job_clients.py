"""A real client runs a job: qemu.qmp's asyncio QMPClient drives a backup on qmpjobd from its
creation to its dismissal, led by the events it receives (and the same on qemu-storage-daemon,
to show that the client and the expectations are right there too)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.message import Message

from tests.daemons import DaemonProcess, start_qmpjobd

SIZE = 4 * 1024 * 1024
WAIT = 10.0

BACKUP_EVENTS = [
    ("JOB_STATUS_CHANGE", {"status": "created", "id": "j"}),
    ("JOB_STATUS_CHANGE", {"status": "running", "id": "j"}),
    ("JOB_STATUS_CHANGE", {"status": "paused", "id": "j"}),       # job-pause
    ("JOB_STATUS_CHANGE", {"status": "running", "id": "j"}),      # job-resume
    ("JOB_STATUS_CHANGE", {"status": "waiting", "id": "j"}),      # block-job-set-speed 0
    ("JOB_STATUS_CHANGE", {"status": "pending", "id": "j"}),
    ("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"}),
    ("BLOCK_JOB_COMPLETED", {"device": "j", "len": SIZE, "offset": SIZE, "speed": 0,  # finalize
                             "type": "backup"}),
    ("JOB_STATUS_CHANGE", {"status": "concluded", "id": "j"}),
    ("JOB_STATUS_CHANGE", {"status": "null", "id": "j"}),         # job-dismiss
]


async def run_backup(path: Path) -> dict[str, Any]:
    """Connect, add two null-co nodes, back one up to the other with auto-finalize and
    auto-dismiss off, see it through by its events; what the client saw."""
    client = QMPClient("test-job-clients")
    await client.connect(str(path))
    seen: list[tuple[str, Any]] = []
    got: dict[str, Any] = {"events": seen}

    async def until(done: Callable[[Message], bool]) -> None:
        while True:
            event: Any = await asyncio.wait_for(client.events.get(), WAIT)
            seen.append((event["event"], event["data"]))
            assert isinstance(event["timestamp"]["seconds"], int)
            if done(event):
                return

    def status(wanted: str) -> Callable[[Message], bool]:
        def done(event: Any) -> bool:
            return bool(event["event"] == "JOB_STATUS_CHANGE"
                        and event["data"]["status"] == wanted)
        return done

    try:
        for node in ("src", "dst"):
            await client.execute("blockdev-add", {"driver": "null-co", "node-name": node,
                                                  "size": SIZE, "read-zeroes": True})
        await client.execute("blockdev-backup", {
            "job-id": "j", "device": "src", "target": "dst", "sync": "full", "speed": 262144,
            "x-perf": {"max-chunk": 65536}, "auto-finalize": False, "auto-dismiss": False})
        await until(status("running"))
        await client.execute("job-pause", {"id": "j"})
        await until(status("paused"))
        got["paused"] = await client.execute("query-jobs")
        await client.execute("job-resume", {"id": "j"})
        await until(status("running"))
        await client.execute("block-job-set-speed", {"device": "j", "speed": 0})
        await until(lambda event: event["event"] == "BLOCK_JOB_PENDING")
        await client.execute("job-finalize", {"id": "j"})
        await until(status("concluded"))
        got["concluded"] = await client.execute("query-jobs")
        await client.execute("job-dismiss", {"id": "j"})
        await until(status("null"))
        got["end"] = await client.execute("query-jobs")
        for node in ("src", "dst"):
            await client.execute("blockdev-del", {"node-name": node})
        got["nodes-deleted"] = True
    finally:
        await client.disconnect()
    return got


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with start_qmpjobd(tmp_path_factory.mktemp("qmpjobd")) as daemon:
        yield daemon


def check(got: dict[str, Any], events: list[tuple[str, Any]]) -> None:
    assert got["events"] == events
    # The backup copied its first 64 KiB chunk at once; the next was 250 ms away when paused.
    assert got["paused"] == [{"id": "j", "type": "backup", "status": "paused",
                              "current-progress": 65536, "total-progress": SIZE}]
    assert got["concluded"] == [{"id": "j", "type": "backup", "status": "concluded",
                                 "current-progress": SIZE, "total-progress": SIZE}]
    assert got["end"] == []
    assert got["nodes-deleted"]


def test_qmpclient_runs_a_backup_on_qmpjobd(ours: DaemonProcess) -> None:
    check(asyncio.run(run_backup(ours.socket_path)), BACKUP_EVENTS)


def test_qmpclient_runs_a_backup_on_qsd(qsd: DaemonProcess) -> None:
    # QSD adds one unrequested paused/running pair when the backup starts (test_job_differential
    # explains it); otherwise the same.
    check(asyncio.run(run_backup(qsd.socket_path)),
          BACKUP_EVENTS[:2] + BACKUP_EVENTS[2:4] + BACKUP_EVENTS[2:])
