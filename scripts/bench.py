#!/usr/bin/env python3
"""Benchmarks, each side by side with QEMU's own implementation in the same run, as ratios.

    scripts/bench.py protocol   start qemu-storage-daemon and qmpjobd; drive both with the same
                                raw-socket client (no oob negotiated); report the median of 5
                                repeats of each figure:
                                  rtt      sequential query-jobs round trip
                                  pipe     query-jobs with 8 requests in flight on one socket
                                  clients  16 clients, each one request at a time (QSD needs a
                                           monitor per client; qmpjobd takes all on one socket)
                                  startup  exec to greeting
    scripts/bench.py scale      300 backup jobs (speed 1) on 64 MiB null-co nodes on both daemons:
                                time to start them all, query-jobs latency, memory per job
                                (with its two nodes); then 10,000 jobs on qmpjobd alone
    scripts/bench.py schema     compile our schema, QSD's and the emulator's: qmpjobd's compiler
                                against QEMU 7.2's generator front end (scripts/qapi, from the
                                fetched source), best of N runs each
    scripts/bench.py copy       blockdev-backup sync=full of a 1 GiB dense raw file (random data,
                                warm page cache) to an existing 1 GiB file, both nodes driver
                                file: send to BLOCK_JOB_COMPLETED, os.sync() before each run,
                                runs interleaved after an untimed warm-up round, median of 3;
                                MB/s and the ratio (target bytes checked after each run, untimed)
    scripts/bench.py sparse     the same from a 10 GiB raw file with 64 MiB of data in 64 extents
                                (holes elsewhere) to a fresh 10 GiB sparse target: seconds (QSD
                                given 120 s), whether the target kept its holes (allocated
                                bytes), the bytes checked over both files' data extents
    scripts/bench.py busy       query-jobs round trips from a second client, back to back, while
                                a 1 GiB dense backup runs (after an untimed one; repeated until
                                >= 200 samples): p50, p99 and max latency
    scripts/bench.py tasks      task records (qmpjobd only; QSD has none): what --state-dir costs
                                query-jobs (round trip, pipelined, 300 job starts; on/off
                                ratios), task-set-progress pipelined with persistence, query-jobs
                                and query-tasks pages over 50,000/100,000 stored finished tasks,
                                RSS, start-up and disk with 1,000,000, and query-jobs latency
                                while 10,000 task changes a second are written
    scripts/bench.py qcow2      qcow2 jobs on 1 GiB images (stream, commit of the active layer
                                and of an intermediate image, backup and mirror into qcow2),
                                MB/s side by side with the monitor's p99
                                latency meanwhile; a 1 TiB image holding 1 GiB backed up against
                                a dense 1 GiB one, with the daemon's RSS (scripts/bench_qcow2.py;
                                --provisioned: on an ext4 whose blocks are all backed, for a
                                thin-provisioned disk)
    scripts/bench.py startup    exec to the first reply to query-jobs (greeting, qmp_capabilities,
                                query-jobs): qmpjobd plain, with its schema cache empty (a
                                first start), with the example's handlers and schema file
                                (--handlers), and with a state dir of 100,000 finished tasks,
                                against the import floor (exec to exit of `python -c "import
                                trio, orjson"`) and qemu-storage-daemon; then `qmpjob list` on an
                                idle daemon against `python -c pass`; both as the console
                                scripts an install makes, the package's bytecode compiled first.
                                Runs interleaved, median of --runs
    scripts/bench.py mirror-sparse
                                blockdev-mirror of a 512 MiB raw file holding 5 MiB: time to
                                READY

The image files go under --dir (default: a fresh directory under /var/tmp, removed at the end).

Timings are printed, never asserted: the test suite has no timed tests.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUERY = b'{"execute": "query-jobs"}\n'
NEGOTIATE = b'{"execute": "qmp_capabilities"}\n'
REPEATS = 5
STALL = 5.0  # seconds a daemon starting up may take to answer before the start is retried


# -- the client ------------------------------------------------------------------------------


class Client:
    """A raw QMP client: bytes out, lines in. The same code drives both daemons."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buffer = b""
        self.read_line()  # greeting
        self.sock.sendall(NEGOTIATE)
        self.read_line()

    def read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("daemon closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def close(self) -> None:
        self.sock.close()


def rtt(paths: list[str], count: int = 2000) -> float:
    """Microseconds per sequential round trip."""
    client = Client(paths[0])
    start = time.perf_counter()
    for _ in range(count):
        client.sock.sendall(QUERY)
        client.read_line()
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed / count * 1e6


def pipe(paths: list[str], count: int = 8000, depth: int = 8) -> float:
    """Replies per second with DEPTH requests in flight."""
    client = Client(paths[0])
    start = time.perf_counter()
    client.sock.sendall(QUERY * depth)
    sent, received = depth, 0
    while received < count:
        client.read_line()
        received += 1
        if sent < count:
            client.sock.sendall(QUERY)
            sent += 1
    elapsed = time.perf_counter() - start
    client.close()
    return count / elapsed


def clients(paths: list[str], count: int = 500, n: int = 16) -> float:
    """Replies per second, N clients each with one request in flight, COUNT requests each."""
    conns = [Client(paths[i % len(paths)]) for i in range(n)]
    selector = selectors.DefaultSelector()
    left = {}
    start = time.perf_counter()
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        conn.sock.sendall(QUERY)
        left[conn] = count
    while left:
        for key, _ in selector.select():
            conn = key.data
            data = conn.sock.recv(65536)
            if not data:
                raise ConnectionError("daemon closed a connection")
            conn.buffer += data
            while b"\n" in conn.buffer:
                _, _, conn.buffer = conn.buffer.partition(b"\n")
                left[conn] -= 1
                if left[conn]:
                    conn.sock.sendall(QUERY)
                else:
                    del left[conn]
                    selector.unregister(conn.sock)
    elapsed = time.perf_counter() - start
    for conn in conns:
        conn.close()
    return n * count / elapsed


# -- the daemons -----------------------------------------------------------------------------


def qsd_argv(paths: list[str]) -> list[str]:
    argv = ["qemu-storage-daemon"]
    for i, path in enumerate(paths):
        argv += ["--chardev", f"socket,id=m{i},path={path},server=on,wait=off",
                 "--monitor", f"chardev=m{i}"]
    return argv


def qmpjobd_argv(paths: list[str]) -> list[str]:
    return [sys.executable, "-m", "qmpjobd", "--log-level", "warning", "--socket", paths[0]]


def connect_when_listening(process: subprocess.Popen[bytes], path: str) -> socket.socket:
    """A connection to the daemon PROCESS on PATH, as soon as it listens."""
    while True:  # a benchmark may poll: it measures, it does not assert
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return probe
        except OSError:
            probe.close()
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}") from None
            time.sleep(0.0005)


@contextmanager
def running(argv: list[str], path: str, stderr: int | None = None,
            env: dict[str, str] | None = None) -> Iterator[float]:
    """Start a daemon; yield the milliseconds from exec to its greeting."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO, stderr=stderr, env=env)
    try:
        probe = connect_when_listening(process, path)
        probe.recv(4096)  # the greeting
        startup = (time.perf_counter() - start) * 1e3
        probe.close()
        yield startup
    finally:
        process.terminate()
        process.wait()


def bench_protocol() -> None:
    workdir = tempfile.mkdtemp(prefix="qmpjobd-bench-")
    figures: dict[str, dict[str, list[float]]] = {}
    daemons: dict[str, Callable[[list[str]], list[str]]] = {
        "qemu-storage-daemon": qsd_argv, "qmpjobd": qmpjobd_argv,
    }
    # Repeats alternate between the daemons, so that a change in the machine's load between
    # repeats weighs on both alike.
    for repeat in range(REPEATS):
        for name, argv_of in daemons.items():
            results = figures.setdefault(
                name, {"rtt": [], "pipe": [], "clients": [], "startup": []}
            )
            count = 16 if name == "qemu-storage-daemon" else 1
            paths = [os.path.join(workdir, f"{name}-{repeat}-{i}.sock") for i in range(count)]
            with running(argv_of(paths), paths[0]) as startup:
                results["startup"].append(startup)
                results["rtt"].append(rtt(paths))
                results["pipe"].append(pipe(paths))
                results["clients"].append(clients(paths))
    qsd, ours = figures["qemu-storage-daemon"], figures["qmpjobd"]
    print(f"{'figure':10} {'QSD 7.2':>12} {'qmpjobd':>12}  ratio (median of {REPEATS})")
    rows = [("rtt", "us", False), ("pipe", "msg/s", True), ("clients", "msg/s", True),
            ("startup", "ms", False)]
    for figure, unit, higher_is_better in rows:
        a, b = statistics.median(qsd[figure]), statistics.median(ours[figure])
        ratio = b / a
        verdict = f"{ratio:.2f}x QSD's" if higher_is_better else f"{ratio:.2f} of QSD's"
        print(f"{figure:10} {a:10.0f} {unit:5} {b:10.0f} {unit:5}  {verdict}")


# -- many jobs -------------------------------------------------------------------------------


class QmpClient(Client):
    """A client for the scale benchmark: commands and their replies, events counted."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.events = 0

    def send(self, messages: list[bytes]) -> None:
        self.sock.sendall(b"".join(messages))

    def replies(self, count: int) -> list[bytes]:
        """The next COUNT replies (events are counted and skipped)."""
        out = []
        while len(out) < count:
            line = self.read_line()
            if line.startswith((b'{"timestamp"', b'{"event"')):
                self.events += 1
                continue
            out.append(line)
        return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_jobs(client: QmpClient, first: int, count: int, size: int) -> float:
    """Create 2 nodes and a backup job for each of COUNT jobs; seconds to start them all."""
    def node(name: str) -> bytes:
        return (b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "'
                + name.encode() + b'", "size": ' + str(size).encode() + b"}}\n")

    for i in range(first, first + count, 100):
        batch = range(i, min(i + 100, first + count))
        client.send([node(f"s{j}") + node(f"t{j}") for j in batch])
        for reply in client.replies(2 * len(batch)):
            assert reply.startswith(b'{"return"'), reply
    start = time.perf_counter()
    for j in range(first, first + count):
        client.send([b'{"execute": "blockdev-backup", "arguments": {"job-id": "j%d", "device": '
                     b'"s%d", "target": "t%d", "sync": "full", "speed": 1}}\n' % (j, j, j)])
        (reply,) = client.replies(1)
        assert reply.startswith(b'{"return"'), reply
    return time.perf_counter() - start


def query_latency_ms(client: QmpClient, times: int = 10) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        client.send([b'{"execute": "query-jobs"}\n'])
        client.replies(1)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def bench_scale(jobs: int = 300, big: int = 10_000) -> None:
    workdir = tempfile.mkdtemp(prefix="qmpjobd-bench-")
    size = 64 << 20
    results = {}
    for name, argv_of in (("qemu-storage-daemon", qsd_argv), ("qmpjobd", qmpjobd_argv)):
        path = os.path.join(workdir, f"{name}.sock")
        argv = argv_of([path])
        # QSD warns about the target's block size on every backup: keep that off the report.
        process = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            while not os.path.exists(path):  # a benchmark may poll
                time.sleep(0.01)
            client = QmpClient(path)
            client.send([b'{"execute": "query-jobs"}\n'])
            client.replies(1)
            before = rss_kib(process.pid)
            seconds = start_jobs(client, 0, jobs, size)
            latency = query_latency_ms(client)
            per_job = (rss_kib(process.pid) - before) / jobs
            results[name] = (seconds, latency, per_job)
            print(f"{name:20} {jobs} jobs started in {seconds:6.2f} s, query-jobs "
                  f"{latency:6.1f} ms, {per_job:5.1f} KiB per job with its nodes", flush=True)
            if name == "qmpjobd":
                start_jobs(client, jobs, big - jobs, size)
                latency = query_latency_ms(client, 5)
                other = Client(path)
                t0 = time.perf_counter()
                other.sock.sendall(b'{"execute": "query-version"}\n')
                other.read_line()
                served = (time.perf_counter() - t0) * 1e3
                print(f"{'qmpjobd':20} {big} jobs: query-jobs {latency:6.1f} ms; another "
                      f"client's query-version answered in {served:.1f} ms, "
                      f"RSS {rss_kib(process.pid) / 1024:.0f} MiB", flush=True)
        finally:
            process.terminate()
            process.wait()
    (qs, ql, qm), (os_, ol, om) = results["qemu-storage-daemon"], results["qmpjobd"]
    print(f"ratios (qmpjobd / QSD): start {os_ / qs:.2f}, query-jobs {ol / ql:.2f}, "
          f"memory per job {om / qm:.2f}")


# -- schema compilation ----------------------------------------------------------------------


def qemu_source() -> Path:
    out = subprocess.run(
        [str(REPO / "scripts" / "fetch-qemu-source")], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def best_of(runs: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def bench_schema(runs: int) -> None:
    from qmpjobd.qapi import load_schema

    tree = qemu_source()
    sys.path.insert(0, str(tree / "scripts"))
    from qapi.schema import QAPISchema  # QEMU's generator, run from the fetched source

    files = {
        "qmpjobd schema/": REPO / "schema" / "qapi-schema.json",
        "QSD (storage-daemon/qapi)": tree / "storage-daemon" / "qapi" / "qapi-schema.json",
        "emulator (qapi/)": tree / "qapi" / "qapi-schema.json",
    }
    print(f"{'schema':28} {'qmpjobd':>10} {'QEMU 7.2':>10} {'ratio':>7}   (best of {runs})")
    for label, path in files.items():
        os.chdir(path.parent)
        ours = best_of(runs, lambda p=path: load_schema(p.name))
        theirs = best_of(runs, lambda p=path: QAPISchema(p.name))
        print(f"{label:28} {ours * 1e3:8.1f}ms {theirs * 1e3:8.1f}ms {ours / theirs:7.2f}")


# -- backups of files --------------------------------------------------------------------------

GIB = 1 << 30
MIB = 1 << 20
DAEMONS: dict[str, Callable[[list[str]], list[str]]] = {
    "qemu-storage-daemon": qsd_argv, "qmpjobd": qmpjobd_argv,
}


class JobClient(Client):
    """A client that waits for events: one command at a time, events kept aside in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.events: list[dict[str, Any]] = []

    def message(self, timeout: float | None = None) -> dict[str, Any]:
        self.sock.settimeout(timeout)  # a timeout keeps a partial line in the buffer
        try:
            message: dict[str, Any] = orjson.loads(self.read_line())
        finally:
            self.sock.settimeout(None)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.sendall(orjson.dumps(message) + b"\n")
        while "event" in (reply := self.message()):
            self.events.append(reply)
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def event(self, name: str, timeout: float | None = None, **data: object) -> dict[str, Any]:
        """The first event NAME whose data holds DATA; TimeoutError after TIMEOUT seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            for i in range(seen, len(self.events)):
                event = self.events[i]
                if event["event"] == name and data.items() <= event.get("data", {}).items():
                    return self.events.pop(i)
            seen = len(self.events)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(name)
            if "event" in (message := self.message(left)):
                self.events.append(message)


def start_backup(client: JobClient, source: str, target: str) -> float:
    """Add the two nodes and send blockdev-backup sync=full; the time it was sent."""
    client.events.clear()
    client.execute("blockdev-add", {"driver": "file", "node-name": "src", "filename": source,
                                    "read-only": True})
    client.execute("blockdev-add", {"driver": "file", "node-name": "tgt", "filename": target})
    start = time.perf_counter()
    client.execute("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                       "sync": "full"})
    return start


def finish_backup(client: JobClient, start: float, timeout: float | None = None) -> float | None:
    """Seconds from START to BLOCK_JOB_COMPLETED, or None if TIMEOUT passed first (the job is
    then cancelled); the nodes are deleted once the job has gone."""
    try:
        done = client.event("BLOCK_JOB_COMPLETED", timeout)
        seconds: float | None = time.perf_counter() - start
        if "error" in done["data"]:
            raise RuntimeError(f"backup failed: {done['data']['error']}")
    except TimeoutError:
        client.execute("block-job-cancel", {"device": "j", "force": True})
        client.event("BLOCK_JOB_CANCELLED")
        seconds = None
    client.event("JOB_STATUS_CHANGE", id="j", status="null")  # auto-dismissed
    client.execute("blockdev-del", {"node-name": "tgt"})
    client.execute("blockdev-del", {"node-name": "src"})
    return seconds


def fresh_target(path: str, size: int) -> None:
    """Drop the previous target, create an empty (all-hole) one, and write back everything
    dirty so that one run's writeback does not land in the next."""
    if os.path.exists(path):
        os.remove(path)
    with open(path, "wb") as f:
        f.truncate(size)
    os.sync()


def data_extents(path: str) -> list[tuple[int, int]]:
    """The file's data ranges, by SEEK_DATA/SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, offset))
    finally:
        os.close(fd)
    return out


def same_bytes(a: str, b: str) -> bool:
    """Whether the files hold the same bytes: sizes, then every range either has data in (the
    rest is holes in both, so zeroes in both)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    ranges = sorted(data_extents(a) + data_extents(b))
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        end = 0
        for start, stop in ranges:
            for offset in range(max(start, end), stop, 8 * MIB):
                n = min(8 * MIB, stop - offset)
                if os.pread(fa.fileno(), n, offset) != os.pread(fb.fileno(), n, offset):
                    return False
            end = max(end, stop)
    return True


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@contextmanager
def both_daemons(workdir: str, clients: int = 1) -> Iterator[dict[str, list[JobClient]]]:
    """Both daemons started, CLIENTS clients connected to each (QSD: a monitor for each)."""
    with ExitStack() as stack:
        conns: dict[str, list[JobClient]] = {}
        for name, argv_of in DAEMONS.items():
            paths = [os.path.join(workdir, f"{name}-{i}.sock") for i in range(clients)]
            # QSD warns on stderr about the target's cluster size on every backup.
            quiet = subprocess.DEVNULL if name == "qemu-storage-daemon" else None
            stack.enter_context(running(argv_of(paths), paths[0], stderr=quiet))
            if name != "qemu-storage-daemon":
                paths = [paths[0]] * clients  # qmpjobd takes them all on its one socket
            conns[name] = [JobClient(path) for path in paths]
            for conn in conns[name]:
                stack.callback(conn.close)
        yield conns


@contextmanager
def bench_dir(given: str | None) -> Iterator[str]:
    """The --dir directory, or a fresh one under /var/tmp removed at the end."""
    if given is not None:
        yield given
        return
    workdir = tempfile.mkdtemp(prefix="qmpjobd-bench-", dir="/var/tmp")
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir)


def write_random(path: str, size: int, extents: list[tuple[int, int]]) -> None:
    """A SIZE-byte file with random data in EXTENTS (offset, length), holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in extents:
            f.seek(offset)
            for done in range(0, length, 64 * MIB):
                f.write(os.urandom(min(64 * MIB, length - done)))
    os.sync()
    with open(path, "rb") as f:  # warm the page cache
        while f.read(64 * MIB):
            pass


def bench_copy(given: str | None, runs: int = 3) -> None:
    with bench_dir(given) as workdir:
        source, target = os.path.join(workdir, "source.raw"), os.path.join(workdir, "target.raw")
        write_random(source, GIB, [(0, GIB)])
        seconds: dict[str, list[float]] = {name: [] for name in DAEMONS}
        with both_daemons(workdir) as conns:
            # A round untimed first: this machine's first write of a GiB of fresh pages takes
            # seconds more than later ones (dd too), whichever daemon writes it.
            for repeat in range(runs + 1):  # interleaved: a change in load weighs on both alike
                for name, (client,) in conns.items():
                    fresh_target(target, GIB)
                    result = finish_backup(client, start_backup(client, source, target))
                    assert result is not None
                    if not same_bytes(source, target):
                        raise RuntimeError(f"{name}: the target differs from the source")
                    if repeat:
                        seconds[name].append(result)
        os.remove(target)
        os.remove(source)
    print(f"copy: 1 GiB dense raw, blockdev-backup sync=full, warm cache, median of {runs} "
          "after a warm-up round (targets verified)")
    rates = {}
    for name, times in seconds.items():
        rates[name] = GIB / statistics.median(times) / 1e6
        runs_s = " ".join(f"{t:.2f}" for t in times)
        print(f"  {name:20} {rates[name]:7.0f} MB/s   runs {runs_s} s")
    print(f"  ratio qmpjobd/QSD: {rates['qmpjobd'] / rates['qemu-storage-daemon']:.2f}x")


def bench_sparse(given: str | None, runs: int = 3, qsd_timeout: float = 120.0) -> None:
    size, count = 10 * GIB, 64
    spread = size // count
    with bench_dir(given) as workdir:
        source, target = os.path.join(workdir, "source.raw"), os.path.join(workdir, "target.raw")
        write_random(source, size, [(i * spread + (i * 37 % 128) * MIB, MIB)
                                    for i in range(count)])
        seconds: dict[str, list[float | None]] = {name: [] for name in DAEMONS}
        kept: dict[str, list[int]] = {name: [] for name in DAEMONS}
        with both_daemons(workdir) as conns:
            for _ in range(runs):
                for name, (client,) in conns.items():
                    if None in seconds[name]:
                        continue  # timed out once: no more runs
                    fresh_target(target, size)
                    timeout = qsd_timeout if name == "qemu-storage-daemon" else 600.0
                    result = finish_backup(client, start_backup(client, source, target), timeout)
                    seconds[name].append(result)
                    if result is not None:
                        if not same_bytes(source, target):
                            raise RuntimeError(f"{name}: the target differs from the source")
                        kept[name].append(allocated(target))
        src_alloc = allocated(source)
        os.remove(target)
        os.remove(source)
    print(f"sparse: 10 GiB raw, {count} x 1 MiB random data ({src_alloc / MIB:.0f} MiB "
          f"allocated), backup sync=full to a sparse target, median of {runs} "
          "(targets verified)")
    medians = {}
    for name, times in seconds.items():
        if None in times:
            print(f"  {name:20} exceeded {qsd_timeout:.0f} s (cancelled)")
            continue
        medians[name] = statistics.median(t for t in times if t is not None)
        alloc = max(kept[name])
        verdict = "holes kept" if alloc <= 2 * src_alloc else "holes filled"
        runs_s = " ".join(f"{t:.2f}" for t in times if t is not None)
        print(f"  {name:20} {medians[name]:7.2f} s   runs {runs_s} s; target allocated "
              f"{alloc / MIB:.0f} MiB: {verdict}")
    if len(medians) == 2:
        ratio = medians["qmpjobd"] / medians["qemu-storage-daemon"]
        print(f"  ratio qmpjobd/QSD time: {ratio:.3f}")


def busy_samples(client: JobClient, other: JobClient, source: str, target: str,
                 want: int) -> tuple[list[float], int]:
    """query-jobs round trips (ms) on OTHER while backups run on CLIENT, backups repeated
    (fresh target) until there are WANT samples; (samples, backups)."""
    samples: list[float] = []
    backups = 0
    while len(samples) < want:
        fresh_target(target, GIB)
        start = start_backup(client, source, target)
        backups += 1
        while True:
            t0 = time.perf_counter()
            other.sock.sendall(QUERY)
            while "event" in (reply := other.message()):  # events go to every monitor
                pass
            samples.append((time.perf_counter() - t0) * 1e3)
            if not any(job["id"] == "j" and job["status"] in ("created", "running")
                       for job in reply["return"]):
                break
        finish_backup(client, start)
    return samples, backups


def bench_busy(given: str | None, want: int = 200) -> None:
    with bench_dir(given) as workdir:
        source, target = os.path.join(workdir, "source.raw"), os.path.join(workdir, "target.raw")
        write_random(source, GIB, [(0, GIB)])
        results = {}
        with both_daemons(workdir, clients=2) as conns:
            for name, (client, other) in conns.items():
                fresh_target(target, GIB)  # warm-up, untimed (as in copy)
                finish_backup(client, start_backup(client, source, target))
                results[name] = busy_samples(client, other, source, target, want)
        os.remove(target)
        os.remove(source)
    print("busy: query-jobs round trips from a second client while a 1 GiB dense backup runs")
    print(f"  {'daemon':20} {'p50':>8} {'p99':>8} {'max':>8}  samples (backups)")
    p99 = {}
    for name, (samples, backups) in results.items():
        p99[name] = statistics.quantiles(samples, n=100)[98]
        print(f"  {name:20} {statistics.median(samples):6.2f}ms {p99[name]:6.2f}ms "
              f"{max(samples):6.2f}ms  {len(samples)} ({backups})")
    print(f"  ratio qmpjobd/QSD p99: {p99['qmpjobd'] / p99['qemu-storage-daemon']:.2f}")


# -- task records ----------------------------------------------------------------------------


def fill_state_dir(state: str, count: int) -> None:
    """COUNT finished tasks (a typical record: a backup's, with its history) written into a
    state directory's database through the store itself, then the WAL checkpointed."""
    import time as clock

    from qmpjobd.tasks.model import Task, TaskStatus
    from qmpjobd.tasks.store import Change, TaskStore

    os.makedirs(state, exist_ok=True)
    store = TaskStore(state, 100_000)
    now = clock.time()
    batch: list[Change] = []
    for n in range(count):
        task = Task(uuid=f"{n:08x}-0000-4000-8000-000000000000", type=("backup", "mirror")[n % 2],
                    name_label=f"job{n}", job_id=f"job{n}", created=now + n * 1e-6,
                    started=now, finished=now, progress=1.0, status=TaskStatus.SUCCESS, seq=n + 1)
        task.set_result({"len": 1 << 30, "offset": 1 << 30}, task.type)
        for status in ("created", "running", "waiting", "pending", "concluded"):
            task.history.append((TaskStatus.PENDING if status != "concluded"
                                 else TaskStatus.SUCCESS, None, now))
        batch.append(Change(n + 1, "add", task.uuid, task.info("bench"), 1))
        if len(batch) == 10_000:
            store.commit(batch)
            batch = []
    if batch:
        store.commit(batch)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def first_reply_ms(argv: list[str], path: str) -> tuple[float, subprocess.Popen[bytes]]:
    """Exec to the reply to qmp_capabilities (the daemon has opened its state by then)."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO)
    probe = connect_when_listening(process, path)
    client = Client.__new__(Client)
    client.sock, client.buffer = probe, b""
    client.read_line()
    probe.sendall(NEGOTIATE)
    client.read_line()
    elapsed = (time.perf_counter() - start) * 1e3
    probe.close()
    return elapsed, process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait()


def progress_rate(path: str, depth: int, count: int = 20_000) -> float:
    """task-set-progress per second from one client with DEPTH requests in flight."""
    client = Client(path)
    client.sock.sendall(b'{"execute": "task-create", "arguments": {"name-label": "bench"}}\n')
    uuid = orjson.loads(client.read_line())["return"]["uuid"]

    def request(i: int) -> bytes:
        return (b'{"execute": "task-set-progress", "arguments": {"uuid": "%s", "progress": %f}}\n'
                % (uuid.encode(), i / count))

    start = time.perf_counter()
    client.sock.sendall(b"".join(request(i) for i in range(depth)))
    sent = depth
    for _ in range(count):
        client.read_line()
        if sent < count:
            client.sock.sendall(request(sent))
            sent += 1
    elapsed = time.perf_counter() - start
    client.close()
    return count / elapsed


def query_ms(client: Client, request: bytes, times: int = 200) -> list[float]:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        client.sock.sendall(request)
        client.read_line()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def bench_tasks(given: str | None) -> None:
    with bench_dir(given) as workdir:
        state = os.path.join(workdir, "state")
        # 1. What --state-dir costs the QEMU-compatible conversation (repeats interleaved).
        figures: dict[str, dict[str, list[float]]] = {}
        for repeat in range(3):
            for name, extra in (("memory", []), ("state-dir", ["--state-dir", state])):
                shutil.rmtree(state, ignore_errors=True)
                path = os.path.join(workdir, f"t{repeat}-{name}.sock")
                results = figures.setdefault(name, {"rtt": [], "pipe": [], "start": []})
                with running([*qmpjobd_argv([path]), *extra], path):
                    results["rtt"].append(rtt([path]))
                    results["pipe"].append(pipe([path]))
                    client = QmpClient(path)
                    results["start"].append(start_jobs(client, 0, 300, 64 << 20))
                    client.close()
        print("tasks: what --state-dir costs (median of 3; on/off, within 10% is the goal)")
        for figure, unit in (("rtt", "us"), ("pipe", "msg/s"), ("start", "s (300 jobs)")):
            off = statistics.median(figures["memory"][figure])
            on = statistics.median(figures["state-dir"][figure])
            print(f"  {figure:6} in memory {off:10.3f} {unit:13} state dir {on:10.3f}  "
                  f"ratio {on / off:.2f}")
        # 2. A client's pipelined task-set-progress, committed before each reply.
        shutil.rmtree(state, ignore_errors=True)
        path = os.path.join(workdir, "progress.sock")
        with running([*qmpjobd_argv([path]), "--state-dir", state], path):
            for depth in (64, 8):
                rate = progress_rate(path, depth)
                print(f"tasks: task-set-progress pipelined, {depth} in flight, state dir: "
                      f"{rate:.0f}/s (goal >= 20000/s)")
        # 3. 100,000 and 50,000 stored finished tasks: query-tasks pages, query-jobs.
        for stored in (0, 50_000, 100_000):
            shutil.rmtree(state, ignore_errors=True)
            fill_state_dir(state, stored)
            path = os.path.join(workdir, f"stored{stored}.sock")
            with running([*qmpjobd_argv([path]), "--state-dir", state, "--max-tasks",
                          "2000000"], path):
                client = Client(path)
                jobs = statistics.median(query_ms(client, QUERY, 2000))
                page = statistics.median(query_ms(client, b'{"execute": "query-tasks", '
                                                  b'"arguments": {"type": "mirror", '
                                                  b'"limit": 100}}\n'))
                client.close()
            print(f"tasks: {stored:7} stored: query-jobs {jobs * 1e3:6.0f} us, query-tasks "
                  f"page of 100 (type filter) {page:6.2f} ms (goal <= 5 ms)")
        # 4. A million stored finished tasks: memory, start-up, disk.
        measures = {}
        for stored in (0, 1_000_000):
            shutil.rmtree(state, ignore_errors=True)
            fill_state_dir(state, stored)
            size = dir_bytes(state)
            path = os.path.join(workdir, f"million{stored}.sock")
            argv = [*qmpjobd_argv([path]), "--state-dir", state, "--max-tasks", "2000000"]
            starts = []
            for _ in range(3):
                elapsed, process = first_reply_ms(argv, path)
                starts.append(elapsed)
                rss = rss_kib(process.pid)
                stop(process)
            measures[stored] = (statistics.median(starts), rss, size)
        (empty_ms, empty_rss, _), (full_ms, full_rss, full_size) = measures[0], measures[1_000_000]
        print(f"tasks: 1,000,000 stored finished tasks: RSS {full_rss / 1024:.0f} MiB (empty "
              f"{empty_rss / 1024:.0f} MiB; goal <= 100), start to first reply {full_ms:.0f} ms "
              f"vs {empty_ms:.0f} ms empty ({full_ms / empty_ms:.2f}x; goal <= 1.5x), state dir "
              f"{full_size / 1_000_000:.0f} bytes per task (goal <= 2048)")
        # 5. The monitor while 10,000 task changes a second are written.
        shutil.rmtree(state, ignore_errors=True)
        path = os.path.join(workdir, "busy-tasks.sock")
        with running([*qmpjobd_argv([path]), "--state-dir", state], path):
            samples = monitor_under_changes(path)
        p99 = statistics.quantiles(samples, n=100)[98]
        print(f"tasks: query-jobs while 10,000 task changes/s are written: p50 "
              f"{statistics.median(samples):.2f} ms, p99 {p99:.2f} ms, max {max(samples):.2f} ms "
              f"over {len(samples)} (goal p99 < 20 ms)")


def monitor_under_changes(path: str, rate: int = 10_000, seconds: float = 5.0) -> list[float]:
    """query-jobs round trips from one client while another sends RATE task-set-progress a
    second (paced, 64 in flight, over 100 tasks)."""
    import threading

    writer = Client(path)
    uuids = []
    for i in range(100):
        writer.sock.sendall(b'{"execute": "task-create", "arguments": {"name-label": "w%d"}}\n'
                            % i)
        uuids.append(orjson.loads(writer.read_line())["return"]["uuid"].encode())
    done = threading.Event()
    written = [0]

    def write() -> None:
        start = time.perf_counter()
        in_flight = 0
        n = 0
        while not done.is_set():
            due = int((time.perf_counter() - start) * rate)
            while n < due and in_flight < 64:
                writer.sock.sendall(b'{"execute": "task-set-progress", "arguments": {"uuid": '
                                    b'"%s", "progress": 0.5}}\n' % uuids[n % 100])
                n += 1
                in_flight += 1
            if in_flight:
                writer.read_line()
                in_flight -= 1
            else:
                time.sleep(0.0002)
        for _ in range(in_flight):
            writer.read_line()
        written[0] = n

    thread = threading.Thread(target=write)
    thread.start()
    reader = Client(path)
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        samples += query_ms(reader, QUERY, 50)
    done.set()
    thread.join()
    print(f"  (the writer sent {written[0] / seconds:.0f} changes/s)")
    reader.close()
    writer.close()
    return samples


# -- start-up --------------------------------------------------------------------------------


def exec_to_exit_ms(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1e3


def jobs_reply_ms(argv: list[str], path: str, env: dict[str, str] | None = None) -> float:
    """Exec to the reply to query-jobs, as a client has it: the greeting, qmp_capabilities and
    its reply, then query-jobs; each request sent once the line before it came."""
    for _ in range(3):
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=REPO, env=env)
        try:
            probe = connect_when_listening(process, path)
            probe.settimeout(STALL)
            client = Client.__new__(Client)
            client.sock, client.buffer = probe, b""
            client.read_line()
            probe.sendall(NEGOTIATE)
            client.read_line()
            probe.sendall(QUERY)
            reply = client.read_line()
            elapsed = (time.perf_counter() - start) * 1e3
            probe.close()
        except TimeoutError:
            # QSD, connected to as soon as its socket listens, now and then greets only once
            # a second client knocks (seen once in 60 starts): not a start-up time; again.
            print(f"  ({argv[0]} did not answer in {STALL:.0f} s: started again)")
            continue
        finally:
            stop(process)
        if not reply.startswith(b'{"return"'):
            raise RuntimeError(f"{argv[0]}: query-jobs: {reply!r}")
        return elapsed
    raise RuntimeError(f"{argv[0]} did not answer three times")


def paired(a: list[float], b: list[float]) -> float:
    """The median of A's runs over B's, run by run: a drift in the machine's speed between
    runs weighs on both sides of each ratio alike."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def bench_startup(given: str | None, runs: int) -> None:
    # The bytecode an install compiles (an editable checkout under PYTHONDONTWRITEBYTECODE
    # never has it, and would time the compiler instead).
    examples = REPO / "examples" / "checksum"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "qmpjobd"),
                    str(examples)], check=True)
    # The console scripts pyproject.toml declares, as a user runs them (python -m would add
    # runpy's import to the daemon's start-up).
    scripts = Path(sys.executable).parent
    qmpjob = [str(scripts / "qmpjob")] if (scripts / "qmpjob").exists() else [
        sys.executable, "-m", "qmpjobd.client"]
    daemon = [str(scripts / "qmpjobd")] if (scripts / "qmpjobd").exists() else [
        sys.executable, "-m", "qmpjobd"]
    with bench_dir(given) as workdir:
        state = os.path.join(workdir, "state")
        fill_state_dir(state, 100_000)
        counter = iter(range(1 << 30))

        def fresh() -> str:  # a socket path no earlier run left behind
            return os.path.join(workdir, f"s{next(counter)}.sock")

        # The schema cache the daemon keeps between starts: the bench's own (warmed by an
        # untimed round), and an empty one for each first start.
        warm = {**os.environ, "XDG_CACHE_HOME": os.path.join(workdir, "cache")}
        with_example = {**warm, "PYTHONPATH": str(examples)}

        def no_cache() -> dict[str, str]:
            return {**os.environ, "XDG_CACHE_HOME": tempfile.mkdtemp(dir=workdir)}

        def ours(path: str, *extra: str) -> list[str]:
            return [*daemon, "--log-level", "warning", "--socket", path, *extra]

        rows: dict[str, Callable[[], float]] = {
            "floor": lambda: exec_to_exit_ms([sys.executable, "-c", "import trio, orjson"]),
            "qsd": lambda: jobs_reply_ms(qsd_argv([path := fresh()]), path),
            "plain": lambda: jobs_reply_ms(ours(path := fresh()), path, warm),
            "cold": lambda: jobs_reply_ms(ours(path := fresh()), path, no_cache()),
            "example": lambda: jobs_reply_ms(
                ours(path := fresh(), "--handlers", "qmpjobd_checksum"), path, with_example),
            "tasks": lambda: jobs_reply_ms(
                ours(path := fresh(), "--state-dir", state, "--max-tasks", "2000000"), path,
                warm),
        }
        samples: dict[str, list[float]] = {name: [] for name in rows}
        for measure in rows.values():  # untimed: the page cache, the schema cache
            measure()
        for _ in range(runs):  # interleaved: a change in the machine's load weighs on all
            for name, measure in rows.items():
                samples[name].append(measure())
        # qmpjob list, one-shot, on an idle daemon.
        path = fresh()
        one_shots: dict[str, list[float]] = {"pass": [], "list": []}
        with running(ours(path), path, env=warm):
            exec_to_exit_ms([*qmpjob, "-s", path, "list"])  # untimed: the page cache
            for _ in range(runs):
                one_shots["pass"].append(exec_to_exit_ms([sys.executable, "-c", "pass"]))
                one_shots["list"].append(exec_to_exit_ms([*qmpjob, "-s", path, "list"]))
    median = {name: statistics.median(values) for name, values in samples.items()}
    floor = median["floor"]
    print(f"start-up: exec to the reply to query-jobs (median of {runs} runs, interleaved; "
          f"ratios taken run by run); qmpjobd is {' '.join(daemon)}")
    label = 'import floor (python -c "import trio, orjson", to exit)'
    print(f"  {label:58} {floor:6.1f} ms")
    print(f"  {'qemu-storage-daemon 7.2':58} {median['qsd']:6.1f} ms")
    for name, label in (("plain", "qmpjobd"),
                        ("cold", "qmpjobd, its schema cache empty (a first start)"),
                        ("example", "qmpjobd --handlers qmpjobd_checksum (its schema too)"),
                        ("tasks", "qmpjobd --state-dir holding 100,000 finished tasks")):
        to_floor, to_qsd = paired(samples[name], samples["floor"]), paired(samples[name],
                                                                            samples["qsd"])
        print(f"  {label:58} {median[name]:6.1f} ms  {to_floor:.2f}x the floor (goal <= 1.3), "
              f"{to_qsd:.1f}x QSD's")
    bare, listing = (statistics.median(one_shots[name]) for name in ("pass", "list"))
    ratio = paired(one_shots["list"], one_shots["pass"])
    print(f"qmpjob list on an idle daemon: {listing:.1f} ms against python -c pass "
          f"{bare:.1f} ms: {ratio:.2f}x (goal <= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("what", choices=["protocol", "scale", "schema", "copy", "sparse", "busy",
                                         "tasks", "qcow2", "mirror-sparse", "startup"])
    parser.add_argument("--runs", type=int, default=10,
                        help="for schema, startup: runs per figure")
    parser.add_argument("--dir", help="for copy, sparse, busy, qcow2, mirror-sparse, startup: "
                        "where the image files (startup: the state dir) go "
                        "(default: a fresh directory under /var/tmp, removed at the end)")
    parser.add_argument("--provisioned", action="store_true",
                        help="for qcow2, mirror-sparse: the images on a fresh ext4 over a loop "
                        "device whose blocks were all written once (root; bench_qcow2.py)")
    args = parser.parse_args()
    if args.what == "protocol":
        bench_protocol()
    elif args.what == "scale":
        bench_scale()
    elif args.what == "schema":
        bench_schema(args.runs)
    elif args.what == "copy":
        bench_copy(args.dir)
    elif args.what == "sparse":
        bench_sparse(args.dir)
    elif args.what == "tasks":
        bench_tasks(args.dir)
    elif args.what == "startup":
        bench_startup(args.dir, args.runs)
    elif args.what in ("qcow2", "mirror-sparse"):
        # Its own script (which builds on this one's daemons and clients): run, not imported.
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_qcow2.py")),
                               args.what, *(["--dir", args.dir] if args.dir else []),
                               *(["--provisioned"] if args.provisioned else [])])
        sys.exit(done.returncode)
    else:
        bench_busy(args.dir)


if __name__ == "__main__":
    main()
