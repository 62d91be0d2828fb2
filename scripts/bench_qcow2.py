#!/usr/bin/env python3
"""qcow2 benchmarks of scripts/bench.py (modes `qcow2` and `mirror-sparse`, which run this
script), each side by side with qemu-storage-daemon in the same run, as ratios.

    scripts/bench_qcow2.py qcow2|mirror-sparse [--dir DIR | --provisioned]

qcow2: on 1 GiB images of 64 KiB clusters, with a second client sending query-jobs every
millisecond while each job runs (monitor latency; WATCH_INTERVAL), each job's source read
through first (page cache), 5 runs per daemon, interleaved, after an untimed round; medians,
and throughput as the bytes the job moves over the time from command to BLOCK_JOB_COMPLETED:

    stream    a fresh empty overlay of half.qcow2 (random data in every other MiB: 512 MiB)
              streams what its backing file holds
    commit    an overlay with 256 MiB of random data (4 MiB in every 16) over a fresh copy of
              half.qcow2: block-commit of the active layer, completed at READY
    commit-mid  the same overlay, with an empty image above it: block-commit of the
              intermediate image into the base
    backup    half.qcow2 to a fresh empty qcow2 image, blockdev-backup sync=full
    mirror    the same, blockdev-mirror sync=full, completed at READY
    sparse    a 1 TiB image holding 1 GiB (1 MiB in each GiB) backed up to a fresh 1 TiB image,
              beside a dense 1 GiB image backed up the same way, on freshly started daemons
              once the images above are removed: the time ratio, and the daemon's largest RSS
              during the 1 TiB job

Every image a job wrote is checked afterwards (untimed): `qemu-img check` clean and
`qemu-img compare` equal to what it copies.

The kernel floor of the commit and mirror rows (kernel_floors): the same bytes moved to the
same kind of places by one writer with copy_file_range, writeback started every 16 MiB, then
fdatasync, as the jobs sync before they end or are ready. QSD's time over it is the most any
daemon could beat QSD by on the machine (a single writer: the kernel lets one writer into a
file at a time).

mirror-sparse: blockdev-mirror sync=full of a 512 MiB raw file holding 5 MiB (five 1 MiB
extents, holes elsewhere) to a fresh sparse raw file: the time to BLOCK_JOB_READY, median of 5.

The file system the images are on is printed with the results (the figures are for a file
system without reflinks: ext4).

--provisioned (root): the images go on a fresh ext4 on a loop device (direct I/O, no discard)
over a 6 GiB file written through once under /var/tmp, removed at the end. Where the machine's
disk is thin-provisioned with online discard (as the development VM's is: ext4 mounted with
`discard`), a first write to a block the host has not backed is several times slower than a
rewrite (512 MiB copied into a new file: 1.3-1.9 s into fresh blocks, 0.25 s into blocks just
freed), and which one a job's target gets depends on ext4's allocator: runs of either daemon
then take 150 ms or 600 ms by the luck of the draw. A provisioned file system measures the
daemons, not the host's allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench import (
    GIB,
    MIB,
    JobClient,
    allocated,
    bench_dir,
    both_daemons,
    fresh_target,
    rss_kib,
    write_random,
)

RUNS = 5
TIB = 1024 * GIB
# How often the monitor client asks (a hundred times what a management tool polls). Not back to
# back: on a machine of two cores a client that never pauses takes one of them, and more of the
# job's share from the daemon that answers it faster (qmpjobd: ~5,000 replies a second during a
# backup, qemu-storage-daemon ~700), which measured the client, not the daemon.
WATCH_INTERVAL = 0.001


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def filesystem(path: str) -> str:
    """The type of the file system PATH is on (findmnt's name: ext4, xfs, btrfs...) and its
    device, as "ext4 on /dev/vda"."""
    done = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", path],
                          capture_output=True, text=True)
    kind, _, source = done.stdout.strip().partition(" ")
    return f"{kind or 'unknown'} on {source.strip() or 'an unknown device'}"


def daemon_pid(client: JobClient) -> int:
    """The daemon's process id, from the socket's peer credentials."""
    import socket
    import struct
    creds = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


@dataclass
class Watch:
    """query-jobs round trips (ms) from a second client while a job runs, one every
    WATCH_INTERVAL seconds (or as soon as the last reply came, when later), and the daemon's
    largest RSS (KiB) meanwhile."""

    client: JobClient
    pid: int
    samples: list[float] = field(default_factory=list)
    rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        due = time.perf_counter()
        while not self._stop.is_set():
            start = time.perf_counter()
            self.client.execute("query-jobs")
            self.samples.append((time.perf_counter() - start) * 1e3)
            self.client.events.clear()  # the events went to every monitor
            self.rss = max(self.rss, rss_kib(self.pid))
            due = max(due + WATCH_INTERVAL, start)
            self._stop.wait(due - time.perf_counter())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


def cached(path: str) -> None:
    """PATH read through once, so that a job starts with all of it in the page cache. A host
    may page out what has gone unread for a while (this one runs DAMON's proactive pageout):
    without this, some runs of either daemon read their source from the disk, others not."""
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(8 * MIB)
        while f.readinto(buffer):
            pass


def qcow2_node(name: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": path}, **extra}


def run_job(client: JobClient, command: str, arguments: dict[str, Any],
            complete: bool = False) -> float:
    """Seconds from sending COMMAND (job "j") to BLOCK_JOB_COMPLETED (completing a mirror or
    active commit once ready); the job gone after."""
    client.events.clear()
    start = time.perf_counter()
    client.execute(command, {"job-id": "j", **arguments})
    if complete:
        client.event("BLOCK_JOB_READY", device="j")
        client.execute("job-complete", {"id": "j"})
    done = client.event("BLOCK_JOB_COMPLETED", device="j")
    seconds = time.perf_counter() - start
    if "error" in done["data"]:
        raise RuntimeError(f"{command}: {done['data']['error']}")
    client.event("JOB_STATUS_CHANGE", id="j", status="null")
    return seconds


def check_image(path: str) -> None:
    done = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"qemu-img check {path}: {done.stdout}{done.stderr}")


def same_image(a: str, b: str) -> None:
    done = subprocess.run(["qemu-img", "compare", a, b], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"qemu-img compare {a} {b}: {done.stdout}{done.stderr}")


@dataclass
class Workload:
    """One benchmark: PREPARE makes fresh images (untimed) and returns the nodes to add and the
    job's command and arguments; VERIFY checks the result (untimed)."""

    name: str
    moved: int  # bytes the job moves
    prepare: Callable[[str], tuple[list[dict[str, Any]], str, dict[str, Any], bool]]
    verify: Callable[[str], None]


# What make_sources and the workloads write (removed before the sparse images are made).
WORKLOAD_IMAGES = ("half.qcow2", "top256.qcow2", "rand4m.bin", "base.qcow2", "top.qcow2",
                   "overlay.qcow2", "target.qcow2")


def make_sources(workdir: str) -> None:
    """half.qcow2 (1 GiB, random data in every other MiB) and top256.qcow2 (256 MiB of random
    data, 4 MiB in every 16, over half.qcow2)."""
    raw = os.path.join(workdir, "half.raw")
    write_random(raw, GIB, [(i * 2 * MIB, MIB) for i in range(512)])
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, os.path.join(workdir, "half.qcow2"))
    os.remove(raw)
    top = os.path.join(workdir, "top256.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "half.qcow2", "-F", "qcow2", top, "1G")
    data = os.path.join(workdir, "rand4m.bin")
    with open(data, "wb") as f:
        f.write(os.urandom(4 * MIB))
    commands = []
    for i in range(64):
        commands += ["-c", f"write -q -s {data} {i * 16 * MIB + 3 * MIB} {4 * MIB}"]
    sh("qemu-io", "-f", "qcow2", *commands, top)


def workloads(workdir: str) -> list[Workload]:
    half = os.path.join(workdir, "half.qcow2")
    base = os.path.join(workdir, "base.qcow2")
    top = os.path.join(workdir, "top.qcow2")
    target = os.path.join(workdir, "target.qcow2")
    overlay = os.path.join(workdir, "overlay.qcow2")

    def fresh_overlay(_: str) -> None:
        if os.path.exists(top):
            os.remove(top)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "half.qcow2", "-F", "qcow2", top)

    def fresh_qcow2_target(size: str) -> None:
        if os.path.exists(target):
            os.remove(target)
        sh("qemu-img", "create", "-q", "-f", "qcow2", target, size)
        os.sync()

    def stream(_: str) -> tuple[list[dict[str, Any]], str, dict[str, Any], bool]:
        fresh_overlay(_)
        os.sync()
        cached(half)
        return [qcow2_node("top", top)], "block-stream", {"device": "top"}, False

    def commit(_: str) -> tuple[list[dict[str, Any]], str, dict[str, Any], bool]:
        shutil.copyfile(half, base)
        shutil.copyfile(os.path.join(workdir, "top256.qcow2"), top)
        sh("qemu-img", "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", top)
        os.sync()
        return [qcow2_node("top", top)], "block-commit", {"device": "top"}, True

    def copy_job(command: str, complete: bool) -> Callable[
            [str], tuple[list[dict[str, Any]], str, dict[str, Any], bool]]:
        def prepare(_: str) -> tuple[list[dict[str, Any]], str, dict[str, Any], bool]:
            fresh_qcow2_target("1G")
            cached(half)
            return ([qcow2_node("src", half, **{"read-only": True}), qcow2_node("tgt", target)],
                    command, {"device": "src", "target": "tgt", "sync": "full"}, complete)
        return prepare

    def same_as_half(path: str) -> Callable[[str], None]:
        def verify(_: str) -> None:
            check_image(path)
            same_image(half, path)
        return verify

    def commit_mid(_: str) -> tuple[list[dict[str, Any]], str, dict[str, Any], bool]:
        commit(_)
        if os.path.exists(overlay):
            os.remove(overlay)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", overlay)
        os.sync()
        return ([qcow2_node("base", base), qcow2_node("top", top, backing="base"),
                 qcow2_node("overlay", overlay, backing="top")],
                "block-commit", {"device": "overlay", "top-node": "top", "base-node": "base"},
                False)

    def committed(_: str) -> None:
        check_image(base)
        same_image(os.path.join(workdir, "top256.qcow2"), base)

    return [
        Workload("stream", GIB // 2, stream, same_as_half(top)),
        Workload("commit", GIB // 4, commit, committed),
        Workload("commit-mid", GIB // 4, commit_mid, committed),
        Workload("backup", GIB // 2, copy_job("blockdev-backup", False), same_as_half(target)),
        Workload("mirror", GIB // 2, copy_job("blockdev-mirror", True), same_as_half(target)),
    ]


def _data_map(path: str) -> list[dict[str, Any]]:
    """qemu-img map's entries of PATH's own data (guest start, length, host offset)."""
    done = subprocess.run(["qemu-img", "map", "--output=json", path], check=True,
                          capture_output=True, text=True)
    return [e for e in json.loads(done.stdout)
            if e["data"] and e["depth"] == 0 and e.get("offset") is not None]


def _copy(source: int, source_offset: int, target: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        done += os.copy_file_range(source, target, length - done, source_offset + done,
                                   offset + done)


def kernel_floors(workdir: str) -> dict[str, float]:
    """The least time the commit and mirror rows' copies take on this machine: one writer
    moving the same bytes to the same kind of places with copy_file_range (writeback started
    every 16 MiB, as qmpjobd's jobs start it), then fdatasync, as both jobs sync before they
    end or are ready; medians of RUNS, in seconds. A daemon that took QSD's time over 1.5 at
    most would have to be at least this fast."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    half, top256 = os.path.join(workdir, "half.qcow2"), os.path.join(workdir, "top256.qcow2")
    in_base = {e["start"] + i: e["offset"] + i for e in _data_map(half)
               for i in range(0, e["length"], MIB)}
    pieces = {"commit": [(e["offset"] + i, e["start"] + i) for e in _data_map(top256)
                         for i in range(0, e["length"], MIB)],
              "mirror": [(e["offset"] + i, None) for e in _data_map(half)
                         for i in range(0, e["length"], MIB)]}
    floors: dict[str, list[float]] = {"commit": [], "mirror": []}
    target = os.path.join(workdir, "floor.bin")
    for _ in range(RUNS):
        for name, moves in pieces.items():
            source = top256 if name == "commit" else half
            if name == "commit":
                shutil.copyfile(half, target)  # the base, written in place and after its end
            elif os.path.exists(target):
                os.remove(target)
            cached(source)
            os.sync()
            src = os.open(source, os.O_RDONLY)
            dst = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                start = time.perf_counter()
                end = os.fstat(dst).st_size
                # The new blocks reserved first, as qmpjobd reserves them.
                appended = sum(1 for _, guest in moves if guest is None or guest not in in_base)
                os.posix_fallocate(dst, end, appended * MIB)
                since = 0
                for host, guest in moves:
                    place = in_base.get(guest) if guest is not None else None
                    if place is None:
                        place, end = end, end + MIB
                    _copy(src, host, dst, place, MIB)
                    since += MIB
                    if since >= 16 * MIB:
                        libc.sync_file_range(dst, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE
                        since = 0
                os.fdatasync(dst)
                floors[name].append(time.perf_counter() - start)
            finally:
                os.close(src)
                os.close(dst)
    os.remove(target)
    return {name: statistics.median(times) for name, times in floors.items()}


def timed(client: JobClient, watcher: Watch, workload: Workload, workdir: str) -> float:
    nodes, command, arguments, complete = workload.prepare(workdir)
    for node in nodes:
        client.execute("blockdev-add", node)
    with watcher:
        seconds = run_job(client, command, arguments, complete)
    for node in reversed(nodes):  # (an overlay before the image under it)
        client.execute("blockdev-del", {"node-name": node["node-name"]})
    workload.verify(workdir)
    return seconds


def bench_qcow2(given: str | None) -> None:
    with bench_dir(given) as workdir:
        make_sources(workdir)
        jobs = workloads(workdir)
        seconds: dict[tuple[str, str], list[float]] = {}
        latency: dict[tuple[str, str], list[float]] = {}
        rss: dict[str, int] = {}
        with both_daemons(workdir, clients=2) as conns:
            watchers = {name: Watch(other, daemon_pid(other))
                        for name, (_, other) in conns.items()}
            for workload in jobs:
                for repeat in range(RUNS + 1):  # the first round untimed
                    for name, (client, _) in conns.items():
                        watcher = watchers[name]
                        watcher.samples = []
                        result = timed(client, watcher, workload, workdir)
                        if repeat:
                            seconds.setdefault((workload.name, name), []).append(result)
                            latency.setdefault((workload.name, name), []).extend(
                                watcher.samples)
        floors = kernel_floors(workdir)
        # The images above are done with: on a provisioned file system they would leave the
        # 1 TiB image's target 300 MiB of room (its job ran 2-3 times as long there).
        for image in WORKLOAD_IMAGES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(workdir, image))
        # The sparse image on daemons of its own: the RSS is the job's, not what the jobs
        # before left in the heap.
        with both_daemons(workdir, clients=2) as conns:
            watchers = {name: Watch(other, daemon_pid(other))
                        for name, (_, other) in conns.items()}
            sparse = sparse_backups(workdir, conns, watchers, rss)
        fs = filesystem(workdir)
    print(f"qcow2: 1 GiB images, 64 KiB clusters, on {fs}; medians of {RUNS} interleaved runs "
          "after an untimed round (every result checked by qemu-img check and compare)")
    print(f"  {'job':10} {'QSD MB/s':>9} {'qmpjobd MB/s':>13} {'ratio':>6}   monitor p99 "
          "QSD / qmpjobd")
    for workload in jobs:
        rates = {}
        p99 = {}
        for name in ("qemu-storage-daemon", "qmpjobd"):
            rates[name] = workload.moved / statistics.median(seconds[(workload.name, name)]) / 1e6
            samples = latency[(workload.name, name)]
            p99[name] = statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else 0.0
        print(f"  {workload.name:10} {rates['qemu-storage-daemon']:9.0f} {rates['qmpjobd']:13.0f} "
              f"{rates['qmpjobd'] / rates['qemu-storage-daemon']:5.2f}x   "
              f"{p99['qemu-storage-daemon']:.1f} / {p99['qmpjobd']:.1f} ms")
    medians = {(workload.name, name): statistics.median(seconds[(workload.name, name)])
               for workload in jobs for name in ("qemu-storage-daemon", "qmpjobd")}
    print("  kernel floor (one writer: copy_file_range, writeback started every 16 MiB, "
          f"fdatasync; median of {RUNS}): the most any daemon could beat QSD by here")
    for row, floor in (("commit", "commit"), ("commit-mid", "commit"), ("mirror", "mirror")):
        qsd = medians[(row, "qemu-storage-daemon")]
        print(f"    {row:10} floor {floors[floor] * 1e3:4.0f} ms   QSD {qsd * 1e3:4.0f} ms   "
              f"QSD / floor {qsd / floors[floor]:.2f}x")
    # Each run's time, so that the spread behind a median shows (the disk's moods are large).
    for workload in jobs:
        for name in ("qemu-storage-daemon", "qmpjobd"):
            runs = " ".join(f"{t * 1e3:.0f}" for t in seconds[(workload.name, name)])
            print(f"    {workload.name:10} {name:20} runs (ms): {runs}")
    print("  sparse: backup of a 1 TiB image holding 1 GiB against a dense 1 GiB image "
          f"(median of {RUNS}; time ratio, largest RSS during the 1 TiB job)")
    for name, (big, dense) in sparse.items():
        print(f"  {name:20} 1 TiB {big:6.2f} s  dense {dense:6.2f} s  ratio {big / dense:.2f}  "
              f"RSS {rss[name] / 1024:.0f} MiB")


def sparse_backups(workdir: str, conns: dict[str, list[JobClient]], watchers: dict[str, Watch],
                   rss: dict[str, int]) -> dict[str, tuple[float, float]]:
    big = os.path.join(workdir, "big.qcow2")
    dense = os.path.join(workdir, "dense.qcow2")
    target = os.path.join(workdir, "target.qcow2")
    raw = os.path.join(workdir, "big.raw")
    with open(raw, "wb") as f:  # sparse: write_random would read the whole TiB back
        f.truncate(TIB)
        for i in range(1024):
            f.seek(i * GIB + (i * 7 % 512) * MIB)
            f.write(os.urandom(MIB))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, big)
    os.remove(raw)
    raw = os.path.join(workdir, "dense.raw")
    write_random(raw, GIB, [(0, GIB)])
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, dense)
    os.remove(raw)
    times: dict[str, dict[str, list[float]]] = {name: {"big": [], "dense": []} for name in conns}
    for repeat in range(RUNS + 1):
        for name, (client, _) in conns.items():
            for kind, source, size in (("big", big, "1T"), ("dense", dense, "1G")):
                if os.path.exists(target):
                    os.remove(target)
                sh("qemu-img", "create", "-q", "-f", "qcow2", target, size)
                os.sync()
                cached(source)
                client.execute("blockdev-add", qcow2_node("src", source, **{"read-only": True}))
                client.execute("blockdev-add", qcow2_node("tgt", target))
                watcher = watchers[name]
                with watcher:
                    seconds = run_job(client, "blockdev-backup",
                                      {"device": "src", "target": "tgt", "sync": "full"})
                if kind == "big":
                    rss[name] = max(rss.get(name, 0), watcher.rss)
                client.execute("blockdev-del", {"node-name": "src"})
                client.execute("blockdev-del", {"node-name": "tgt"})
                if repeat == 1:
                    check_image(target)
                    same_image(source, target)
                if repeat:
                    times[name][kind].append(seconds)
    os.remove(target)
    return {name: (statistics.median(t["big"]), statistics.median(t["dense"]))
            for name, t in times.items()}


def bench_mirror_sparse(given: str | None) -> None:
    size = 512 * MIB
    with bench_dir(given) as workdir:
        source, target = os.path.join(workdir, "source.raw"), os.path.join(workdir, "target.raw")
        write_random(source, size, [(i * 100 * MIB, MIB) for i in range(5)])
        ready: dict[str, list[float]] = {}
        with both_daemons(workdir) as conns:
            for repeat in range(RUNS + 1):
                for name, (client,) in conns.items():
                    fresh_target(target, size)
                    client.events.clear()
                    client.execute("blockdev-add", {"driver": "file", "node-name": "src",
                                                    "filename": source, "read-only": True})
                    client.execute("blockdev-add", {"driver": "file", "node-name": "tgt",
                                                    "filename": target})
                    start = time.perf_counter()
                    client.execute("blockdev-mirror", {"job-id": "j", "device": "src",
                                                       "target": "tgt", "sync": "full"})
                    client.event("BLOCK_JOB_READY", device="j")
                    seconds = time.perf_counter() - start
                    client.execute("job-cancel", {"id": "j"})
                    client.event("JOB_STATUS_CHANGE", id="j", status="null")
                    client.execute("blockdev-del", {"node-name": "tgt"})
                    client.execute("blockdev-del", {"node-name": "src"})
                    if repeat:
                        ready.setdefault(name, []).append(seconds * 1e3)
            kept = allocated(target)
        fs = filesystem(workdir)
    print(f"mirror-sparse: 512 MiB raw holding 5 MiB, blockdev-mirror sync=full to a sparse "
          f"raw file on {fs}: time to READY, median of {RUNS} (target holds "
          f"{kept / MIB:.0f} MiB)")
    medians = {name: statistics.median(times) for name, times in ready.items()}
    for name, times in ready.items():
        print(f"  {name:20} {medians[name]:7.1f} ms   runs "
              + " ".join(f"{t:.1f}" for t in times))
    print(f"  ratio qmpjobd/QSD time: {medians['qmpjobd'] / medians['qemu-storage-daemon']:.2f}")


PROVISIONED_SIZE = 6 * GIB


@contextlib.contextmanager
def provisioned() -> Iterator[str]:
    """A directory on a fresh ext4 on a loop device (direct I/O, no discard) over a file of
    PROVISIONED_SIZE bytes written through once: every block the images get is one the host
    has backed already. Unmounted and removed at the end."""
    with contextlib.ExitStack() as undo:
        top = tempfile.mkdtemp(prefix="qmpjobd-bench-", dir="/var/tmp")
        undo.callback(shutil.rmtree, top)
        backing = os.path.join(top, "ext4.img")
        with open(backing, "wb") as f:
            chunk = bytes(64 * MIB)
            for _ in range(PROVISIONED_SIZE // len(chunk)):
                f.write(chunk)
            os.fdatasync(f.fileno())
        loop = subprocess.run(["losetup", "--direct-io=on", "--find", "--show", backing],
                              check=True, capture_output=True, text=True).stdout.strip()
        undo.callback(sh, "losetup", "--detach", loop)
        sh("mkfs.ext4", "-q", "-E", "nodiscard", loop)
        mountpoint = os.path.join(top, "mnt")
        os.mkdir(mountpoint)
        sh("mount", "-o", "nodiscard", loop, mountpoint)
        undo.callback(sh, "umount", mountpoint)
        yield mountpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("what", choices=["qcow2", "mirror-sparse"])
    parser.add_argument("--dir", help="where the image files go (default: a fresh directory "
                        "under /var/tmp, removed at the end)")
    parser.add_argument("--provisioned", action="store_true",
                        help="the images on a fresh ext4 over a loop device whose every block "
                        "was written once (root; see above)")
    args = parser.parse_args()
    bench = bench_qcow2 if args.what == "qcow2" else bench_mirror_sparse
    if args.provisioned:
        with provisioned() as directory:
            bench(directory)
    else:
        bench(args.dir)


if __name__ == "__main__":
    main()
