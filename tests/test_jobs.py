"""The job model on its own (no protocol): QSD's observed event sequences, docs/job-model.md."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from qmpjobd.block.drivers.null import NullNode
from qmpjobd.block.jobs.backup import BackupJob
from qmpjobd.block.jobs.mirror import MirrorJob
from qmpjobd.jobs.errors import JobError
from qmpjobd.jobs.job import Job
from qmpjobd.jobs.status import JobStatus

MiB = 1 << 20


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def __call__(self, name: str, data: dict[str, Any] | None) -> None:
        if name == "JOB_STATUS_CHANGE":
            assert data is not None
            self.events.append(("status", data["status"]))
        else:
            assert data is not None
            self.events.append((name, data.get("offset")))

    def take(self) -> list[tuple[str, Any]]:
        events, self.events = self.events, []
        return events


def backup(rec: Recorder, size: int = 4 * MiB, **kwargs: Any) -> BackupJob:
    options = {"sync": "full", "max_chunk": 0, "auto_finalize": True, "auto_dismiss": True}
    options.update(kwargs)
    return BackupJob("j", rec, NullNode("src", size), NullNode("dst", size), **options)


def mirror(rec: Recorder, size: int = 4 * MiB, **kwargs: Any) -> MirrorJob:
    options = {"sync": "full", "granularity": 0, "buf_size": 0, "auto_finalize": True,
               "auto_dismiss": True}
    options.update(kwargs)
    return MirrorJob("m", rec, NullNode("a", size), NullNode("b", size), **options)


def start(job: Job, nursery: trio.Nursery, speed: int = 0) -> None:
    job.transition(JobStatus.CREATED)
    job.set_speed(speed)
    job.start(nursery)


async def until(job: Job, status: str) -> None:
    with trio.fail_after(10):
        while job.status != status:
            await job.changed()


@pytest.mark.parametrize(("auto_finalize", "auto_dismiss"), [(True, True), (True, False),
                                                             (False, True), (False, False)])
async def test_backup_lifecycle(auto_finalize: bool, auto_dismiss: bool) -> None:
    rec = Recorder()
    job = backup(rec, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
    async with trio.open_nursery() as nursery:
        start(job, nursery)
        await until(job, "pending" if not auto_finalize else
                    ("concluded" if not auto_dismiss else "null"))
        expected: list[tuple[str, Any]] = [("status", "created"), ("status", "running"),
                                           ("status", "waiting"), ("status", "pending")]
        if not auto_finalize:
            expected.append(("BLOCK_JOB_PENDING", None))
            assert rec.take() == expected
            job.finalize()
            expected = []
        expected += [("BLOCK_JOB_COMPLETED", 4 * MiB), ("status", "concluded")]
        if auto_dismiss:
            expected.append(("status", "null"))
            assert rec.take() == expected
        else:
            assert rec.take() == expected
            assert job.info()["status"] == "concluded"
            job.dismiss()
            assert rec.take() == [("status", "null")]


async def test_rate_limited_backup_pause_resume_cancel() -> None:
    rec = Recorder()
    job = backup(rec, max_chunk=65536)
    async with trio.open_nursery() as nursery:
        start(job, nursery, speed=262144)
        await trio.testing.wait_all_tasks_blocked()
        assert job.progress_current == 65536  # the first chunk goes at once
        job.user_pause()
        await job.settle()
        with pytest.raises(JobError, match="Job is already paused"):
            job.user_pause()
        assert job.status == "paused" and job.block_info()["paused"] is True
        job.user_resume()
        await job.settle()
        with pytest.raises(JobError, match="Can't resume a job that was not paused"):
            job.user_resume()
        job.user_pause()
        await job.settle()
        job.cancel(force=True)  # a paused job resumes, then aborts
        await job.settle()
    assert rec.take() == [
        ("status", "created"), ("status", "running"), ("status", "paused"), ("status", "running"),
        ("status", "paused"), ("status", "running"), ("status", "aborting"),
        ("BLOCK_JOB_CANCELLED", job.progress_current), ("status", "concluded"), ("status", "null"),
    ]
    assert job.error == "Operation canceled"


async def test_verbs_refused_by_status() -> None:
    rec = Recorder()
    job = backup(rec, auto_finalize=False, auto_dismiss=False)
    async with trio.open_nursery() as nursery:
        start(job, nursery)
        await until(job, "pending")
        for verb, call in [("pause", job.user_pause), ("complete", job.complete),
                           ("dismiss", job.dismiss), ("set-speed", lambda: job.set_speed(1))]:
            with pytest.raises(JobError) as refused:
                call()
            assert refused.value.desc == (
                f"Job 'j' in state 'pending' cannot accept command verb '{verb}'"
            )
        job.finalize()
        with pytest.raises(JobError, match="cannot accept command verb 'cancel'"):
            job.cancel(force=True)


async def test_cancel_in_pending_aborts() -> None:
    rec = Recorder()
    job = backup(rec, auto_finalize=False)
    async with trio.open_nursery() as nursery:
        start(job, nursery)
        await until(job, "pending")
        rec.take()
        job.cancel(force=True)
    assert rec.take() == [("status", "aborting"), ("BLOCK_JOB_CANCELLED", 4 * MiB),
                          ("status", "concluded"), ("status", "null")]


async def test_mirror_ready_standby_complete() -> None:
    rec = Recorder()
    job = mirror(rec)
    async with trio.open_nursery() as nursery:
        start(job, nursery)
        await until(job, "ready")
        job.user_pause()
        await job.settle()
        assert job.status == "standby"
        job.complete()  # accepted in standby; takes effect on resume
        assert job.status == "standby"
        job.user_resume()
        await until(job, "null")
    assert rec.take() == [
        ("status", "created"), ("status", "running"), ("status", "ready"),
        ("BLOCK_JOB_READY", 4 * MiB), ("status", "standby"), ("status", "ready"),
        ("status", "waiting"), ("status", "pending"), ("BLOCK_JOB_COMPLETED", 4 * MiB),
        ("status", "concluded"), ("status", "null"),
    ]


async def test_soft_cancel_of_a_ready_mirror_completes_it() -> None:
    rec = Recorder()
    job = mirror(rec)
    async with trio.open_nursery() as nursery:
        start(job, nursery)
        await until(job, "ready")
        rec.take()
        job.cancel(force=False)
        await until(job, "null")
    assert rec.take() == [("status", "waiting"), ("status", "pending"),
                          ("BLOCK_JOB_COMPLETED", 4 * MiB), ("status", "concluded"),
                          ("status", "null")]
    assert job.error is None


async def test_mirror_to_a_smaller_target_fails() -> None:
    rec = Recorder()
    job = MirrorJob("m", rec, NullNode("a", 4 * MiB), NullNode("b", MiB), sync="full",
                    granularity=0, buf_size=0, auto_finalize=False, auto_dismiss=False)
    async with trio.open_nursery() as nursery:
        start(job, nursery)
        await until(job, "concluded")
    assert rec.take() == [("status", "created"), ("status", "running"), ("status", "aborting"),
                          ("BLOCK_JOB_COMPLETED", 0), ("status", "concluded")]
    assert job.info() == {"id": "m", "type": "mirror", "status": "concluded",
                          "current-progress": 0, "total-progress": 0,
                          "error": "Source and target image have different sizes"}


async def test_grouped_jobs_wait_for_each_other_and_abort_together() -> None:
    rec = Recorder()
    first = backup(rec, auto_finalize=False, auto_dismiss=False)
    second = BackupJob("k", rec, NullNode("a1", 4 * MiB), NullNode("a2", 4 * MiB), sync="full",
                       max_chunk=65536, auto_finalize=False, auto_dismiss=False)
    second.txn.add(first)  # one group
    assert first.txn is second.txn
    async with trio.open_nursery() as nursery:
        start(first, nursery)
        start(second, nursery, speed=262144)
        await until(first, "waiting")
        rec.take()
        second.cancel(force=True)
        await second.settle()
    assert first.status == second.status == "concluded"
    assert first.error == second.error == "Operation canceled"
    statuses = [e for e in rec.take() if e[0] == "status"]
    assert statuses.count(("status", "aborting")) == 2


async def test_a_pause_undone_before_the_job_parks_does_not_hang_the_pauser() -> None:
    """Client A pauses while the job is in the middle of I/O; client B resumes before the job
    reached its pause point. A's reply must still come, though no status ever changes."""
    rec = Recorder()
    slow = BackupJob("j", rec, NullNode("src", 4 * MiB, latency_ns=200_000_000),
                     NullNode("dst", 4 * MiB), sync="full", max_chunk=0, auto_finalize=True,
                     auto_dismiss=True)
    async with trio.open_nursery() as nursery:
        start(slow, nursery)
        await trio.testing.wait_all_tasks_blocked()  # the job is inside its first read
        slow.user_pause()
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                clients.start_soon(slow.settle)  # A waits for the pause to take effect
                await trio.testing.wait_all_tasks_blocked()
                slow.user_resume()  # B, before the job got out of its read
        slow.cancel(force=True)


async def test_backup_progress_counts_whole_clusters() -> None:
    """QSD's backup of a 3149824-byte node reports len 3211264 (whole 64 KiB clusters)."""
    rec = Recorder()
    job = backup(rec, size=3149824, auto_dismiss=False)
    assert job.progress_total == 3211264
    async with trio.open_nursery() as nursery:
        start(job, nursery)
        await until(job, "concluded")
    assert job.progress_current == 3211264
