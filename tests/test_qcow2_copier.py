"""Copies made by the copier process while the writer goes on (a backup's trips): they leave
what copies made at once leave, a copier that dies has its copies made by the writer, a copy
into new clusters that fails leaves its range as it was (one in place, its clusters), and the
child does not outlive a daemon that died. The image engine is driven directly (blocking
calls), as a job's worker thread drives it."""

from __future__ import annotations

import errno
import os
import random
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.block.drivers.qcow2.hostfile import HostFile
from qmpjobd.block.drivers.qcow2.image import Qcow2Image

from .conftest import missing
from .daemons import QmpConnection, start_qmpjobd
from .test_qcow2_crash import check_clean
from .test_qcow2_write import assert_clean, merged_map, ours, qemu_img

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
CLUSTER = 65536
SIZE = 16 * MiB


def copies(rnd: random.Random, source_size: int) -> list[tuple[int, int, int]]:
    """(guest offset, source offset, length): whole clusters mostly (the deferred kind),
    some partial (made at once), some over earlier ones, one reaching past the source's end."""
    made = []
    for _ in range(60):
        offset = rnd.randrange(SIZE // CLUSTER) * CLUSTER
        length = rnd.choice([CLUSTER, 4 * CLUSTER, 16 * CLUSTER, 1000])
        length = min(length, SIZE - offset)
        made.append((offset, rnd.randrange(source_size // 512) * 512, length))
    made.append((SIZE - 2 * CLUSTER, source_size - CLUSTER // 2, 2 * CLUSTER))
    return made


def write_all(path: Path, source: Path, requests: list[tuple[int, int, int]],
              deferred: bool, kill_after: int | None = None) -> tuple[int, OSError] | None:
    fd, source_fd = os.open(path, os.O_RDWR), os.open(source, os.O_RDONLY)
    try:
        image = Qcow2Image(HostFile(fd), writable=True)
        if deferred:
            image.defer_copies()
        for n, (offset, source_offset, length) in enumerate(requests):
            if n == kill_after:
                copier = image._copier
                assert copier is not None
                os.kill(copier.pid, signal.SIGKILL)
            image.write(offset, (source_fd, source_offset), length)
            if n % 7 == 0:  # a read and a status meanwhile: they wait for the copies there
                assert image.read(offset, length) == expected(source, source_offset, length)
                image.status(offset, length)
        failed = image.settle_copies() if deferred else None
        image.close()
        return failed
    finally:
        os.close(fd)
        os.close(source_fd)


def expected(source: Path, offset: int, length: int) -> bytes:
    with source.open("rb") as f:
        f.seek(offset)
        data = f.read(length)
    return data + bytes(length - len(data))


@pytest.mark.parametrize("seed", range(4))
def test_deferred_copies_leave_what_copies_made_at_once_leave(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    source = tmp_path / "source.raw"
    source.write_bytes(rnd.randbytes(6 * MiB + 512))
    requests = copies(rnd, 6 * MiB + 512)
    at_once, deferred = tmp_path / "at-once.qcow2", tmp_path / "deferred.qcow2"
    for path in (at_once, deferred):
        ours(path, {"size": SIZE})
    assert write_all(at_once, source, requests, deferred=False) is None
    assert write_all(deferred, source, requests, deferred=True) is None
    assert_clean(deferred)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(at_once), str(deferred))
    assert merged_map(deferred) == merged_map(at_once)
    # The same clusters in the same places, too: the deferred writes allocate as they come.
    assert (qemu_img("map", "--output=json", str(deferred))
            == qemu_img("map", "--output=json", str(at_once)))


def test_copies_a_copier_left_when_it_died_are_made_by_the_writer(tmp_path: Path) -> None:
    rnd = random.Random(7)
    source = tmp_path / "source.raw"
    source.write_bytes(rnd.randbytes(6 * MiB))
    requests = copies(rnd, 6 * MiB)
    at_once, deferred = tmp_path / "at-once.qcow2", tmp_path / "deferred.qcow2"
    for path in (at_once, deferred):
        ours(path, {"size": SIZE})
    write_all(at_once, source, requests, deferred=False)
    assert write_all(deferred, source, requests, deferred=True, kill_after=20) is None
    assert_clean(deferred)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(at_once), str(deferred))


def test_a_failed_copy_leaves_its_range_as_it_was(tmp_path: Path) -> None:
    """A source the child cannot read (opened write-only: EBADF, as the kernel's copy would
    fail in the writer): settle_copies names the first failed write; nothing points at its
    clusters, which are free again."""
    path = tmp_path / "image.qcow2"
    ours(path, {"size": SIZE})
    source = tmp_path / "source.raw"
    source.write_bytes(b"\x11" * MiB)
    fd, bad = os.open(path, os.O_RDWR), os.open(source, os.O_WRONLY)
    try:
        image = Qcow2Image(HostFile(fd), writable=True)
        image.write(0, b"\x22" * CLUSTER, CLUSTER)
        image.defer_copies()
        image.write(4 * CLUSTER, (bad, 0), 2 * CLUSTER)
        image.write(8 * CLUSTER, (bad, 0), CLUSTER)
        failed = image.settle_copies()
        assert failed is not None
        assert failed[0] == 4 * CLUSTER and isinstance(failed[1], OSError)
        assert image.read(4 * CLUSTER, 6 * CLUSTER) == bytes(6 * CLUSTER)
        assert image.read(0, CLUSTER) == b"\x22" * CLUSTER
        image.close()
    finally:
        os.close(fd)
        os.close(bad)
    assert_clean(path)
    assert [e["data"] for e in merged_map(path)] == [True, False]


def test_a_failed_copy_in_place_keeps_its_clusters(tmp_path: Path) -> None:
    """A copy over clusters the image holds fails: settle_copies names it, and the clusters
    stay the image's (only new ones are given back); a deferred copy in place after it is
    made."""
    path = tmp_path / "image.qcow2"
    ours(path, {"size": SIZE})
    source = tmp_path / "source.raw"
    source.write_bytes(b"\x11" * MiB)
    fd, bad, good = (os.open(path, os.O_RDWR), os.open(source, os.O_WRONLY),
                     os.open(source, os.O_RDONLY))
    try:
        image = Qcow2Image(HostFile(fd), writable=True)
        image.write(0, b"\x22" * (8 * CLUSTER), 8 * CLUSTER)
        image.defer_copies()
        image.write(2 * CLUSTER, (bad, 0), 2 * CLUSTER)
        image.write(6 * CLUSTER, (good, 0), CLUSTER)
        assert len(image._pending) == 2  # both deferred: in place while deferring
        failed = image.settle_copies()
        assert failed is not None
        assert failed[0] == 2 * CLUSTER and isinstance(failed[1], OSError)
        assert image.read(6 * CLUSTER, CLUSTER) == b"\x11" * CLUSTER
        assert image.read(0, 2 * CLUSTER) == b"\x22" * (2 * CLUSTER)
        image.close()
    finally:
        for descriptor in (fd, bad, good):
            os.close(descriptor)
    assert_clean(path)
    assert [e["data"] for e in merged_map(path)] == [True, False]


def test_the_copier_goes_when_its_daemon_dies(tmp_path: Path) -> None:
    """A daemon killed outright: its copier child exits at once (it must not go on writing
    into images another process may open next)."""
    script = ("import os, signal\n"
              "from qmpjobd.block.drivers.qcow2.copier import Copier\n"
              "print(Copier().pid, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, check=False)
    assert done.returncode == -signal.SIGKILL
    pid = int(done.stdout)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone already
    try:
        readable, _, _ = select.select([pidfd], [], [], 10)
        assert readable, "the copier outlived its daemon by 10 s"
    finally:
        os.close(pidfd)


def test_writes_waiting_for_a_copy_are_linked_after_a_failed_try(tmp_path: Path) -> None:
    """Linking a finished copy may fail (here: the flush that makes room in a cache of two
    tables gets EIO). The request that asked fails; the writes still waiting stay queued and
    are linked at the next try, none forgotten (review of d5a0f2a: they were dropped, and read
    back as zeroes)."""
    span = 512 * MiB  # one L2 table's range
    path, source = tmp_path / "image.qcow2", tmp_path / "source.raw"
    ours(path, {"size": 4 * span})
    source.write_bytes(b"\x55" * CLUSTER)
    fd, source_fd = os.open(path, os.O_RDWR), os.open(source, os.O_RDONLY)
    try:
        image = Qcow2Image(HostFile(fd), writable=True)
        for table in range(3):
            image.write(table * span, b"\x01" * CLUSTER, CLUSTER)
        image.flush()
        image.tables._cache.clear()
        image.tables._cache_tables = 2
        flush = image._flush_locked
        failures = [OSError(errno.EIO, "injected")]

        def write_back() -> None:
            if failures:
                raise failures.pop()
            flush()

        image.tables.write_back = write_back
        image.defer_copies()
        for table in (0, 1, 2):
            image.write(table * span + 8 * CLUSTER, (source_fd, 0), CLUSTER)
        image.write(16 * CLUSTER, (source_fd, 0), CLUSTER)
        with pytest.raises(OSError):
            image.write(16 * CLUSTER, b"\x02" * CLUSTER, CLUSTER)
        assert image.settle_copies() is None
        for table in (0, 1, 2):
            assert image.read(table * span + 8 * CLUSTER, CLUSTER) == b"\x55" * CLUSTER
        image.close()
    finally:
        os.close(fd)
        os.close(source_fd)
    assert_clean(path)


# -- through a job -------------------------------------------------------------------------------


def _until(conn: QmpConnection, job: str, status: str) -> list[dict[str, Any]]:
    """Events until job JOB's status is STATUS (those seen so far, and kept)."""
    seen = 0
    while True:
        for event in conn.events[seen:]:
            data = event.get("data", {})
            if event["event"] == "JOB_STATUS_CHANGE" and data == {"id": job, "status": status}:
                return conn.events
        seen = len(conn.events)
        conn.events.append(conn.receive(timeout=60))


@pytest.mark.parametrize("kind", ["blockdev-backup", "blockdev-mirror"])
def test_a_target_that_refuses_the_copies_stops_the_job_until_it_takes_them(
        tmp_path: Path, kind: str) -> None:
    """The copies into new clusters fail in the copier (the target made immutable once open:
    EPERM): the job stops at the first with on-target-error=stop, as after any failed write
    (BLOCK_JOB_ERROR write/stop); once the target takes writes again, job-resume copies what
    failed, and the target holds the source."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        missing("making a file immutable needs root and chattr")
    source, target = tmp_path / "source.qcow2", tmp_path / "target.qcow2"
    raw = tmp_path / "source.raw"
    raw.write_bytes(random.Random(3).randbytes(8 * MiB))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(source))
    qemu_img("create", "-q", "-f", "qcow2", str(target), str(8 * MiB))
    with start_qmpjobd(tmp_path) as daemon, daemon.connect() as conn:
        for name, path in (("src", source), ("tgt", target)):
            reply = conn.execute("blockdev-add", {
                "driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": str(path)}})
            assert reply == {"return": {}}, reply
        subprocess.run(["chattr", "+i", str(target)], check=True)
        try:
            reply = conn.execute(kind, {"job-id": "j", "device": "src", "target": "tgt",
                                        "sync": "full", "on-target-error": "stop"})
            assert reply == {"return": {}}, reply
            events = _until(conn, "j", "paused")
            errors = [e["data"] for e in events if e["event"] == "BLOCK_JOB_ERROR"]
            assert errors and errors[0] == {"device": "j", "operation": "write",
                                            "action": "stop"}
            jobs = conn.execute("query-block-jobs")["return"]
            assert jobs[0]["io-status"] == "failed" and jobs[0]["paused"]
        finally:
            subprocess.run(["chattr", "-i", str(target)], check=True)
        assert conn.execute("job-resume", {"id": "j"}) == {"return": {}}
        if kind == "blockdev-mirror":
            _until(conn, "j", "ready")
            assert conn.execute("job-complete", {"id": "j"}) == {"return": {}}
        events = _until(conn, "j", "null")
        done = [e["data"] for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert len(done) == 1 and "error" not in done[0], done
        for name in ("src", "tgt"):
            assert conn.execute("blockdev-del", {"node-name": name}) == {"return": {}}
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(source), str(target))
    check_clean(target)


def test_a_base_that_refuses_the_copies_stops_a_commit_until_it_takes_them(
        tmp_path: Path) -> None:
    """The same for the commit of an intermediate image: its walk's copies into the base
    fail in the copier; the commit stops with BLOCK_JOB_ERROR write/stop, and once resumed
    the base holds what the committed image held."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        missing("making a file immutable needs root and chattr")
    base, top, overlay = (tmp_path / f"{name}.qcow2" for name in ("base", "top", "overlay"))
    raw = tmp_path / "top.raw"
    raw.write_bytes(random.Random(4).randbytes(8 * MiB))
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(8 * MiB))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(top))
    qemu_img("rebase", "-u", "-b", str(base), "-F", "qcow2", str(top))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2", str(overlay))
    with start_qmpjobd(tmp_path) as daemon, daemon.connect() as conn:
        for name, path, backing in (("base", base, None), ("top", top, "base"),
                                    ("overlay", overlay, "top")):
            reply = conn.execute("blockdev-add", {
                "driver": "qcow2", "node-name": name, "backing": backing,
                "file": {"driver": "file", "filename": str(path)}})
            assert reply == {"return": {}}, reply
        subprocess.run(["chattr", "+i", str(base)], check=True)
        try:
            reply = conn.execute("block-commit", {"job-id": "j", "device": "overlay",
                                                  "top-node": "top", "base-node": "base",
                                                  "on-error": "stop"})
            assert reply == {"return": {}}, reply
            events = _until(conn, "j", "paused")
            errors = [e["data"] for e in events if e["event"] == "BLOCK_JOB_ERROR"]
            assert errors and errors[0] == {"device": "j", "operation": "write",
                                            "action": "stop"}
        finally:
            subprocess.run(["chattr", "-i", str(base)], check=True)
        assert conn.execute("job-resume", {"id": "j"}) == {"return": {}}
        events = _until(conn, "j", "null")
        done = [e["data"] for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert len(done) == 1 and "error" not in done[0], done
        for name in ("overlay", "top", "base"):
            assert conn.execute("blockdev-del", {"node-name": name}) == {"return": {}}
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(base))
    check_clean(base)
