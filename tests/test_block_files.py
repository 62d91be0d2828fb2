"""file and raw nodes on real files, differentially against qemu-storage-daemon 7.2.

Node tests send the same blockdev-add/blockdev-del sequence to both daemons and compare the
replies (generated '#blockNNN' names and the per-daemon directory normalised). Data tests copy
real files with blockdev-backup and blockdev-mirror on both daemons and compare bytes; holes are
compared on qmpjobd only, since QSD fills them (docs/compat.md). Synchronisation is by events.

The daemons are shared by the module's tests; each test works in its own directories, with
node and job names of its own.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import QMPJOBD, DaemonProcess, QmpConnection, daemon_env, start_qmpjobd

WAIT = 30.0
MiB = 1 << 20

_tests = itertools.count()


@dataclass
class Side:
    """One daemon, a client of it, and a directory of its own for the test's files."""

    label: str
    conn: QmpConnection
    dir: Path

    def cmd(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.conn.execute(command, arguments)

    def wait_event(self, name: str, job: str) -> dict[str, Any]:
        """The event NAME about JOB, kept aside already or the next such to arrive."""
        while True:
            for i, event in enumerate(self.conn.events):
                if event["event"] == name and event["data"].get("device") == job:
                    return self.conn.events.pop(i)
            self.conn.events.append(self.conn.receive(timeout=WAIT))


@pytest.fixture(scope="module")
def daemons(
    qsd: DaemonProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    with start_qmpjobd(tmp_path_factory.mktemp("qmpjobd")) as ours:
        yield qsd, ours


@pytest.fixture
def sides(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path
) -> Iterator[list[Side]]:
    prefix = f"t{next(_tests)}"
    out: list[Side] = []
    try:
        for label, daemon in zip(("qsd", "qmpjobd"), daemons, strict=True):
            with daemon.connect() as _probe:
                pass
            conn = QmpConnection(daemon.socket_path, timeout=WAIT)
            assert conn.execute("qmp_capabilities") == {"return": {}}
            d = tmp_path / label / prefix
            d.mkdir(parents=True)
            out.append(Side(label, conn, d))
        yield out
    finally:
        for side in out:
            side.conn.close()


def normalise(reply: dict[str, Any], side: Side) -> Any:
    text = repr(reply).replace(str(side.dir), "DIR")
    return re.sub(r"#block\d+", "#blockN", text)


def both(sides: list[Side], steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Each step on both daemons (DIR in a string stands for the side's directory); the
    replies must agree."""
    for command, arguments in steps:
        replies = []
        for side in sides:
            args = _subst(arguments, str(side.dir))
            replies.append(normalise(side.cmd(command, args), side))
        assert replies[0] == replies[1], (command, arguments, replies)


def _subst(value: Any, directory: str) -> Any:
    if isinstance(value, str):
        return value.replace("DIR", directory)
    if isinstance(value, dict):
        return {k: _subst(v, directory) for k, v in value.items()}
    return value


def write_files(side: Side, files: dict[str, bytes | int]) -> None:
    """Bytes, or a size for a sparse file of that size."""
    make_files(side.dir, files)


def make_files(directory: Path, files: dict[str, bytes | int]) -> None:
    for name, content in files.items():
        path = directory / name
        if isinstance(content, int):
            with open(path, "wb") as f:
                f.truncate(content)
        else:
            path.write_bytes(content)


def file_opts(name: str, filename: str, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": filename, **extra}


# -- nodes: replies compared ------------------------------------------------------------------


def test_file_nodes(sides: list[Side]) -> None:
    for side in sides:
        write_files(side, {"a.img": b"x" * 1000, "b.img": bytes(MiB)})
        (side.dir / "dir").mkdir()
    both(sides, [
        ("blockdev-add", file_opts("f1", "DIR/a.img")),
        ("blockdev-add", file_opts("f1", "DIR/a.img")),
        ("blockdev-add", file_opts("f2", "DIR/a.img")),
        ("blockdev-add", file_opts("f3", "DIR/a.img", **{"read-only": True})),
        ("blockdev-add", file_opts("f4", "DIR/a.img", locking="off")),
        ("blockdev-add", file_opts("f5", "DIR/a.img", locking="on")),
        ("blockdev-add", file_opts("n1", "DIR/nope.img")),
        ("blockdev-add", file_opts("n2", "DIR/dir")),
        ("blockdev-add", file_opts("n3", "DIR/dir", **{"read-only": True})),
        ("blockdev-add", file_opts("n4", "")),
        ("blockdev-add", {"driver": "file", "filename": "DIR/a.img"}),
        ("blockdev-add", file_opts("n5", "DIR/a.img", **{"detect-zeroes": "unmap"})),
        ("blockdev-add", file_opts("n6", "DIR/a.img", aio="native")),
        ("blockdev-add", file_opts(
            "f6", "DIR/b.img", cache={"direct": True, "no-flush": True}, discard="unmap",
            **{"detect-zeroes": "unmap"}, aio="native")),
        ("blockdev-add", file_opts("f7", "DIR/b.img", aio="threads", **{"detect-zeroes": "on"})),
        ("blockdev-add", file_opts("f8", "DIR/b.img", **{"auto-read-only": True})),
        ("blockdev-add", file_opts("n" * 31, "DIR/b.img", locking="off")),
        ("blockdev-add", file_opts("n" * 32, "DIR/b.img", locking="off")),
        ("blockdev-add", file_opts("n" * 31, "DIR/nope.img")),
        ("blockdev-del", {"node-name": "n" * 31}),
        *[("blockdev-del", {"node-name": n}) for n in ("f1", "f2", "f3", "f4", "f5", "f6", "f7",
                                                        "f8", "f1", "n1")],
    ])


def test_raw_nodes(sides: list[Side]) -> None:
    for side in sides:
        write_files(side, {"a.img": b"x" * 1000, "b.img": bytes(MiB)})

    def inline(name: str, child: str | None, **extra: Any) -> dict[str, Any]:
        options: dict[str, Any] = {"driver": "file", "filename": "DIR/b.img", "locking": "off"}
        if child is not None:
            options["node-name"] = child
        return {"driver": "raw", "node-name": name, "file": options, **extra}

    both(sides, [
        ("blockdev-add", file_opts("f1", "DIR/a.img")),
        ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "f1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r2", "file": "f1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r3", "file": "nothing"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "f1"}),
        ("blockdev-add", inline("r4", None)),
        ("blockdev-add", inline("r5", "c5", offset=512, size=1024)),
        ("blockdev-add", inline("r6", "c6", offset=MiB + 1)),
        ("blockdev-add", inline("r7", "c7", size=2 * MiB)),
        ("blockdev-add", inline("r8", "c8", offset=-1)),
        ("blockdev-add", inline("r9", "c9", size=-5)),
        ("blockdev-add", inline("r10", "c10", offset=MiB, size=0)),
        ("blockdev-add", inline("r11", "c11", offset=100, size=1001)),
        ("blockdev-add", inline("r12", "f1")),
        ("blockdev-add", inline("r13", "r13")),
        ("blockdev-add", {"driver": "raw", "node-name": "r14", "read-only": True,
                          "file": file_opts("c14", "DIR/nope")}),
        ("blockdev-add", {"driver": "raw", "node-name": "r15", "read-only": True,
                          "file": file_opts("c15", "DIR/a.img")}),
        ("blockdev-del", {"node-name": "f1"}),
        ("blockdev-del", {"node-name": "r1"}),
        ("blockdev-del", {"node-name": "f1"}),
        ("blockdev-del", {"node-name": "c5"}),
        ("blockdev-del", {"node-name": "r5"}),
        ("blockdev-del", {"node-name": "c5"}),
        ("blockdev-add", inline("r5", "c5")),
        ("blockdev-backup", {"job-id": "j-nope", "device": "r5", "target": "r2",
                             "sync": "full"}),
        *[("blockdev-del", {"node-name": n}) for n in ("r2", "f1", "r4", "r5", "r10", "r15")],
    ])


# -- data: bytes compared ---------------------------------------------------------------------


def dense(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sparse(side: Side, name: str, size: int, seed: int) -> None:
    """A sparse file of SIZE with a few extents of data, some not aligned to anything."""
    rng = random.Random(seed)
    with open(side.dir / name, "wb") as f:
        f.truncate(size)
        for offset in (0, 3 * MiB + 4096, size - 70000, 5 * MiB // 2 + 777):
            f.seek(offset)
            f.write(rng.randbytes(min(65536 + 123, size - offset)))


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def add_raw(side: Side, name: str, filename: str) -> None:
    reply = side.cmd("blockdev-add", {
        "driver": "raw", "node-name": name,
        "file": {"driver": "file", "node-name": f"{name}-file", "filename": filename}})
    assert reply == {"return": {}}, reply


def copy(side: Side, kind: str, chunk: int, job: str) -> None:
    """Copy src.img to dst.img with a backup or a mirror (then job-complete), waiting for the
    events that say each step is done."""
    add_raw(side, "src", str(side.dir / "src.img"))
    add_raw(side, "dst", str(side.dir / "dst.img"))
    if kind == "backup":
        reply = side.cmd("blockdev-backup", {
            "job-id": job, "device": "src", "target": "dst", "sync": "full",
            "x-perf": {"max-chunk": chunk}})
        assert reply == {"return": {}}, reply
    else:
        reply = side.cmd("blockdev-mirror", {
            "job-id": job, "device": "src", "target": "dst", "sync": "full",
            "buf-size": chunk})
        assert reply == {"return": {}}, reply
    finish_copy(side, kind, job)


def finish_copy(side: Side, kind: str, job: str) -> None:
    """Wait for the copy JOB to end well (a mirror completed once ready); delete its nodes."""
    if kind == "mirror":
        side.wait_event("BLOCK_JOB_READY", job)
        assert side.cmd("job-complete", {"id": job}) == {"return": {}}
    completed = side.wait_event("BLOCK_JOB_COMPLETED", job)
    assert "error" not in completed["data"], completed
    for node in ("dst", "src"):
        assert side.cmd("blockdev-del", {"node-name": node}) == {"return": {}}


CASES = [
    ("dense", 4 * MiB + 192 * 1024),
    ("sparse", 7 * MiB + 3 * 65536 + 512),
]


@pytest.mark.parametrize("kind", ["backup", "mirror"])
@pytest.mark.parametrize("chunk", [MiB, 65536])
@pytest.mark.parametrize(("layout", "size"), CASES)
def test_copy_keeps_bytes(
    sides: list[Side], kind: str, chunk: int, layout: str, size: int
) -> None:
    for n, side in enumerate(sides):
        if layout == "dense":
            write_files(side, {"src.img": dense(size, size)})
        else:
            sparse(side, "src.img", size, size)
        write_files(side, {"dst.img": size})
        copy(side, kind, chunk, f"job{n}")
        source = (side.dir / "src.img").read_bytes()
        assert (side.dir / "dst.img").read_bytes() == source, side.label
    ours = sides[1]
    if layout == "sparse":
        # Holes stay holes on our side (QSD writes them out as zeroes), to 64 KiB: each of the
        # four unaligned extents may allocate up to three 64 KiB segments.
        assert allocated(ours.dir / "dst.img") <= 4 * 3 * 65536


def test_zero_source_empties_target(sides: list[Side]) -> None:
    """A target full of data becomes all zeroes where the source is a hole."""
    size = 2 * MiB
    for n, side in enumerate(sides):
        write_files(side, {"src.img": size, "dst.img": dense(size, 7)})
        copy(side, "backup", MiB, f"zjob{n}")
        assert (side.dir / "dst.img").read_bytes() == bytes(size), side.label
    assert allocated(sides[1].dir / "dst.img") == 0


# -- image locks between processes ------------------------------------------------------------


def test_write_lock_between_daemons(sides: list[Side]) -> None:
    """While one daemon's backup writes an image, the other cannot start writing it, either way
    round: both speak QEMU's OFD lock protocol."""
    shared = sides[0].dir
    for name in ("s.img", "t.img"):
        write_files(sides[0], {name: 8 * MiB})
    for side in sides:
        add_raw(side, "s", str(shared / "s.img"))
        add_raw(side, "t", str(shared / "t.img"))
    for first, second in (sides, sides[::-1]):
        job = f"hold-{first.label}"
        reply = first.cmd("blockdev-backup", {
            "job-id": job, "device": "s", "target": "t", "sync": "full", "speed": 1024})
        assert reply == {"return": {}}, reply
        reply = second.cmd("blockdev-backup", {
            "job-id": "j2", "device": "s", "target": "t", "sync": "full"})
        assert reply == {"error": {"class": "GenericError",
                                   "desc": 'Could not create node: Failed to get "write" lock'}}
        assert first.cmd("block-job-cancel", {"device": job, "force": True}) == {"return": {}}
        first.wait_event("BLOCK_JOB_CANCELLED", job)
    for side in sides:
        for node in ("s", "t"):
            assert side.cmd("blockdev-del", {"node-name": node}) == {"return": {}}


# -- cache.direct: O_DIRECT with aligned buffers ----------------------------------------------


def _open_flags(pid: int, path: Path) -> int:
    """The open flags of PID's descriptor for PATH (from /proc/PID/fdinfo)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
        except FileNotFoundError:
            continue
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"{path} is not open in {pid}")


@pytest.mark.parametrize("kind", ["backup", "mirror"])
@pytest.mark.parametrize("size", [4 * MiB + 192 * 1024, 3 * MiB + 4096])
def test_direct_io_copy(
    sides: list[Side], daemons: tuple[DaemonProcess, DaemonProcess], kind: str, size: int
) -> None:
    """cache.direct=on for both nodes: the copy goes through O_DIRECT (our descriptors carry
    the flag) and leaves the same bytes as QSD's."""
    for n, side in enumerate(sides):
        write_files(side, {"src.img": dense(size, size + 1), "dst.img": size})
        for node in ("src", "dst"):
            reply = side.cmd("blockdev-add", file_opts(
                node, str(side.dir / f"{node}.img"), cache={"direct": True}))
            assert reply == {"return": {}}, reply
        if side.label == "qmpjobd":
            assert _open_flags(daemons[1].pid, side.dir / "src.img") & os.O_DIRECT
        job = f"direct{n}"
        args = {"job-id": job, "device": "src", "target": "dst", "sync": "full"}
        assert side.cmd(f"blockdev-{kind}", args) == {"return": {}}
        finish_copy(side, kind, job)
    results = [(s.dir / "dst.img").read_bytes() for s in sides]
    assert results[0] == results[1] == (sides[0].dir / "src.img").read_bytes()


@pytest.mark.parametrize("size", [3 * MiB + 1000, 3 * MiB + 512])
def test_direct_io_target_needs_whole_blocks(sides: list[Side], size: int) -> None:
    """An O_DIRECT target must be a whole number of 4 KiB blocks: writing its last one would
    grow it. Both daemons refuse such a target, with the same words."""
    for side in sides:
        write_files(side, {"src.img": dense(size, 3), "dst.img": size})
    both(sides, [
        ("blockdev-add", file_opts("dsrc", "DIR/src.img", cache={"direct": True})),
        ("blockdev-add", file_opts("ddst", "DIR/dst.img", cache={"direct": True})),
        ("blockdev-backup", {"job-id": "dj", "device": "dsrc", "target": "ddst",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "dj", "device": "dsrc", "target": "ddst",
                             "sync": "full"}),
        ("blockdev-del", {"node-name": "ddst"}),
        ("blockdev-del", {"node-name": "dsrc"}),
    ])


# -- cancellation and shutdown leave consistent files -----------------------------------------


@pytest.mark.parametrize("kind", ["backup", "mirror"])
def test_cancel_leaves_source_untouched(sides: list[Side], kind: str) -> None:
    """A copy cancelled while it runs (at 1 byte/s: only a prompt cancel ends it) ends with
    BLOCK_JOB_CANCELLED; the source is byte for byte what it was, and the target holds a prefix
    of it (what was copied) followed by what it held before: zeroes."""
    size = 8 * MiB
    for n, side in enumerate(sides):
        write_files(side, {"src.img": dense(size, 11), "dst.img": size})
        source = (side.dir / "src.img").read_bytes()
        add_raw(side, "src", str(side.dir / "src.img"))
        add_raw(side, "dst", str(side.dir / "dst.img"))
        job = f"cancel{n}"
        reply = side.cmd(f"blockdev-{kind}", {"job-id": job, "device": "src", "target": "dst",
                                              "sync": "full", "speed": 1})
        assert reply == {"return": {}}, reply
        assert side.cmd("block-job-cancel", {"device": job, "force": True}) == {"return": {}}
        cancelled = side.wait_event("BLOCK_JOB_CANCELLED", job)
        # (A mirror's first pass ignores its speed, in QSD too: it may have copied it all.)
        limit = size if kind == "mirror" else size - 1
        assert 0 < cancelled["data"]["offset"] <= limit, cancelled

        for node in ("dst", "src"):
            assert side.cmd("blockdev-del", {"node-name": node}) == {"return": {}}
        assert (side.dir / "src.img").read_bytes() == source, side.label
        target = (side.dir / "dst.img").read_bytes()
        copied = len(target.rstrip(b"\0"))
        assert target[:copied] == source[:copied] and copied <= cancelled["data"]["offset"]


def test_sigterm_during_copy(tmp_path: Path) -> None:
    """SIGTERM while a backup copies real files: the client sees the job cancelled, the
    daemon exits with its socket removed, the source is untouched and the target consistent."""
    size = 16 * MiB
    (tmp_path / "src.img").write_bytes(dense(size, 21))
    (tmp_path / "dst.img").touch()
    os.truncate(tmp_path / "dst.img", size)
    nodes = [f"driver=file,node-name={n},filename={tmp_path / n}.img" for n in ("src", "dst")]
    with DaemonProcess.start(
        tmp_path, "--blockdev", nodes[0], "--blockdev", nodes[1], program=QMPJOBD,
        env=daemon_env(),
    ) as daemon:
        conn = QmpConnection(daemon.socket_path, timeout=WAIT)
        assert conn.execute("qmp_capabilities") == {"return": {}}
        assert conn.execute("blockdev-backup", {
            "job-id": "j", "device": "src", "target": "dst", "sync": "full", "speed": 4 * MiB,
        }) == {"return": {}}
        os.kill(daemon.pid, signal.SIGTERM)
        events = list(conn.events)
        with pytest.raises(ConnectionError):
            while True:
                events.append(conn.receive())
        conn.close()
        daemon.wait()
        assert [e["event"] for e in events if e["event"].startswith("BLOCK_JOB")] == [
            "BLOCK_JOB_CANCELLED"]
        assert not daemon.socket_path.exists()
    source = (tmp_path / "src.img").read_bytes()
    assert source == dense(size, 21)
    target = (tmp_path / "dst.img").read_bytes()
    copied = len(target.rstrip(b"\0"))
    assert target[:copied] == source[:copied]
