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

Timings are printed, never asserted: the test suite has no timed tests.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUERY = b'{"execute": "query-jobs"}\n'
NEGOTIATE = b'{"execute": "qmp_capabilities"}\n'
REPEATS = 5


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


@contextmanager
def running(argv: list[str], path: str) -> Iterator[float]:
    """Start a daemon; yield the milliseconds from exec to its greeting."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO)
    try:
        while True:  # a benchmark may poll: it measures, it does not assert
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                break
            except OSError:
                probe.close()
                if process.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {process.returncode}") from None
                time.sleep(0.0005)
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("what", choices=["protocol", "scale", "schema"])
    parser.add_argument("--runs", type=int, default=10, help="for schema: runs per figure")
    args = parser.parse_args()
    if args.what == "protocol":
        bench_protocol()
    elif args.what == "scale":
        bench_scale()
    else:
        bench_schema(args.runs)


if __name__ == "__main__":
    main()
