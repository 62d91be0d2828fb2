"""Slow and hostile clients, and restarts, against a real qmpjobd over real sockets.

- One client floods commands without ever reading a reply while 300 others each negotiate and
  run 20 commands one at a time: all 300 are served correctly, their commands' round trips
  stay under 1 s at the 99th percentile, and the daemon's memory stays under the bound its
  limits state (qmpjobd/limits.py). The flooder is cut off by its output limit.
- Clients that vanish mid-message, half-close, trickle a byte at a time, never send anything,
  or ask for a lot and never read it, 200 and more of them: afterwards the daemon holds as
  many file descriptors and threads as before, every connection it logged as connected it
  logged as disconnected (so none of its tasks is left), nothing they held still counts
  against the daemon-wide budgets, and it still answers.
- After SIGKILL (jobs running, clients connected) a new daemon takes the stale socket path
  over and serves; the files the killed daemon had open (and locked) are usable again.
  (SIGTERM during a copy: tests/test_block_files.py::test_sigterm_during_copy.)

Figures are printed (pytest -s shows them). Synchronisation is by replies, end-of-file and
the daemon's own log lines; the only timed waits are the pacing of the slow client.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.limits import Limits
from tests.daemons import QMPJOBD, DaemonProcess, QmpConnection, daemon_env
from tests.test_server import TEST_SCHEMA

WAIT = 30.0
MiB = 1 << 20


@contextmanager
def qmpjobd(workdir: Path, *options: str, check_replies: bool = True) -> Iterator[DaemonProcess]:
    """A qmpjobd with the test schema, logging to workdir/qmpjobd.log; CHECK_REPLIES: the
    daemon checks every reply against its schema type (costly for query-qmp-schema)."""
    args = ["--schema", str(TEST_SCHEMA), "--handlers", "tests.extra_handlers",
            "--log", str(workdir / "qmpjobd.log"), *options]
    env = daemon_env()
    if not check_replies:
        del env["QMPJOBD_CHECK_REPLIES"]
    with DaemonProcess.start(workdir, *args, program=QMPJOBD, env=env) as daemon:
        yield daemon


def status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS (KiB), threads and open descriptors of process PID."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0])
    found["threads"] = len(os.listdir(f"/proc/{pid}/task"))
    found["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return found


_IN_MODIFY = 0x2


def wait_for_log(log: Path, done: Callable[[str], bool], timeout: float = WAIT) -> str:
    """The log's text once DONE(text) holds; woken by inotify whenever the daemon writes to it
    (the watch is in place before the first look, so no write is missed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.inotify_add_watch(fd, bytes(log), _IN_MODIFY) >= 0
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text()
            if done(text):
                return text
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the log never got there; it ends with:\n{text[-2000:]}"
            select.select([fd], [], [], remaining)
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 65536)  # the events themselves say nothing more
    finally:
        os.close(fd)


# The debug log's line for a new connection (with its peer's credentials on a socket).
CONNECTED = re.compile(r": connected(?: \(uid \d+, pid \d+\))?\n")


def still_connected(text: str) -> int:
    """Connections the daemon logged (debug) as connected and not yet as disconnected, which
    it does once the connection's tasks have all ended and its descriptor is closed."""
    return len(re.findall(CONNECTED, text)) - text.count(": disconnected\n")


def messages(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def replies(data: bytes) -> list[dict[str, Any]]:
    """The messages in DATA that are not events."""
    return [m for m in messages(data) if "event" not in m]


def read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class Background(threading.Thread):
    """A thread whose exception, if any, `finish` raises in the test."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # handed to the test by finish()
            self.error = exc

    def finish(self) -> None:
        self.join(WAIT)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


# -- 1. a flooder and 300 well-behaved clients --------------------------------------------------

CLIENTS = 300
COMMANDS = 20
GOAL_P99 = 1.0  # seconds, the goal

# The flooder's stream: 30 KB replies (costly to make: the test daemon checks each against
# the schema), a few small ones, now and then an event for everybody.
FLOOD = (b'{"execute": "query-qmp-schema"}\n' + b'{"execute": "query-jobs"}\n' * 4) * 20 + (
    b'{"execute": "x-test-emit", "arguments": {"count": 1}}\n')


@dataclass
class Flooder:
    """Connects, negotiates and sends FLOOD forever without reading a byte; when the daemon
    cuts it off, it connects again, until stopped."""

    path: Path
    stop: threading.Event = field(default_factory=threading.Event)
    was_cut_off: threading.Event = field(default_factory=threading.Event)
    connections: int = 0
    cut_off: int = 0
    sent: int = 0

    def run(self) -> None:
        while not self.stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.path))
            sock.settimeout(0.5)  # to look at `stop` now and then while the daemon is busy
            self.connections += 1
            try:
                sock.sendall(b'{"execute": "qmp_capabilities"}\n')
                while not self.stop.is_set():
                    try:
                        sock.sendall(FLOOD)
                        self.sent += len(FLOOD)
                    except TimeoutError:
                        pass
            except (BrokenPipeError, ConnectionResetError):
                self.cut_off += 1
                self.was_cut_off.set()
            finally:
                sock.close()


class Client:
    """A well-behaved client driven by `serve_all`: greeting, qmp_capabilities, then its
    script of commands, each sent once the previous reply is in."""

    def __init__(self, n: int, path: Path, script: list[tuple[bytes, dict[str, Any]]]) -> None:
        self.n = n
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.script = script
        self.step = -1  # waiting for the greeting
        self.buffer = b""
        self.sent_at = 0.0
        self.latencies: list[float] = []
        self.events = 0

    def send_next(self) -> None:
        self.step += 1
        request = self.script[self.step][0]
        self.sent_at = time.perf_counter()
        assert self.sock.send(request) == len(request)

    @property
    def done(self) -> bool:
        return self.step == len(self.script)

    def received(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\r\n")
        for line in lines:
            message = json.loads(line)
            if "event" in message:
                assert message["event"] == "X_TEST_EVENT", message
                self.events += 1
            elif self.step == -1:
                assert "QMP" in message, message
                self.send_next()
            else:
                self.latencies.append(time.perf_counter() - self.sent_at)
                expected = self.script[self.step][1]
                assert message == expected, (self.n, self.step, message, expected)
                if self.step + 1 < len(self.script):
                    self.send_next()
                else:
                    self.step += 1


def serve_all(clients: list[Client], timeout: float) -> None:
    """Drive every client through its script at once (one thread, a selector)."""
    with selectors.DefaultSelector() as selector:
        for each in clients:
            selector.register(each.sock, selectors.EVENT_READ, each)
        left = len(clients)
        deadline = time.monotonic() + timeout
        while left:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{left} clients were not fully served"
            for key, _ in selector.select(remaining):
                client: Client = key.data
                data = client.sock.recv(1 << 20)
                assert data, f"client {client.n} was disconnected at step {client.step}"
                client.received(data)
                if client.done:
                    selector.unregister(client.sock)
                    left -= 1


def scripts(reference: QmpConnection, clients: int) -> list[list[tuple[bytes, dict[str, Any]]]]:
    """Each client's requests with the replies they must get (ids included); the replies of
    the queries are the reference connection's, taken before the load."""
    mix: list[tuple[str, dict[str, Any] | None]] = [
        ("query-jobs", None), ("query-version", None), ("query-block-jobs", None),
        ("job-pause", {"id": "nope"}), ("query-named-block-nodes", None),
        ("no-such-command", None), ("query-jobs", None), ("x-test-release", {"key": "k"}),
    ]
    expected: dict[str, dict[str, Any]] = {}
    for name, arguments in [*mix, ("query-qmp-schema", None)]:
        reply = reference.execute(name, arguments)
        expected[name] = reply
    result = []
    for n in range(clients):
        script = [(b'{"execute": "qmp_capabilities", "id": 0}\n', {"return": {}, "id": 0})]
        for step in range(1, COMMANDS + 1):
            # One big reply in each client's twenty, at a step of its own.
            name, arguments = (("query-qmp-schema", None) if step == 1 + n % COMMANDS
                               else mix[(n + step) % len(mix)])
            request: dict[str, Any] = {"execute": name, "id": f"c{n}.{step}"}
            if arguments is not None:
                request["arguments"] = arguments
            script.append((json.dumps(request).encode() + b"\n",
                           {**expected[name], "id": f"c{n}.{step}"}))
        result.append(script)
    return result


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def test_a_flooder_does_not_hold_up_300_clients(tmp_path: Path) -> None:
    started = time.monotonic()
    with qmpjobd(tmp_path) as daemon:
        before = status(daemon.pid)
        with daemon.connect() as reference:
            plan = scripts(reference, CLIENTS)
        flooder = Flooder(daemon.socket_path)
        thread = Background(flooder.run)
        thread.start()
        try:
            clients = [Client(n, daemon.socket_path, plan[n]) for n in range(CLIENTS)]
            serve_all(clients, timeout=60)
            # Its output limit cuts it off sooner or later (if not already).
            assert flooder.was_cut_off.wait(WAIT)
        finally:
            flooder.stop.set()
            thread.finish()
        after = status(daemon.pid)
        for client in clients:
            client.sock.close()
        with daemon.connect() as conn:
            assert conn.execute("query-jobs") == {"return": []}
    log = (tmp_path / "qmpjobd.log").read_text()

    latencies = [t for client in clients for t in client.latencies]
    assert len(latencies) == CLIENTS * (COMMANDS + 1)
    p50, p99, worst = (percentile(latencies, 0.5), percentile(latencies, 0.99), max(latencies))
    limits = Limits()
    # What the daemon may hold by its limits: the input budget and the output budget across
    # all clients, on top of what it held before anyone connected (the schema, the code).
    bound_kib = before["VmRSS"] + (limits.input_budget + limits.output_budget) // 1024
    print(f"\n300 clients x {COMMANDS + 1} commands beside a flooder: "
          f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms; "
          f"events seen per client {min(c.events for c in clients)}-"
          f"{max(c.events for c in clients)}; flooder: {flooder.connections} connections, "
          f"{flooder.sent / MiB:.1f} MiB sent, {log.count('the client is not reading')} cut "
          f"off; RSS {before['VmRSS'] // 1024} MiB before, {after['VmRSS'] // 1024} MiB after, "
          f"peak {after['VmHWM'] // 1024} MiB (bound {bound_kib // 1024} MiB); "
          f"{time.monotonic() - started:.1f} s")
    assert p99 < GOAL_P99
    assert after["VmHWM"] < bound_kib
    # The flooder was cut off by its own output limit, not by the daemon-wide budgets.
    assert log.count("the client is not reading") >= 1
    assert f"(limit {limits.output_limit})" in log
    assert "budget" not in log
    assert "Traceback" not in log


def test_a_pipelining_client_lets_others_in_between(tmp_path: Path) -> None:
    """120 costly requests in one write (one read for the daemon, parsed inline: under
    server.PARSE_INLINE_MAX): the daemon lets other clients in between them, so a bystander's
    request sent after them is answered before the event the 121st request emits. (Served
    back to back, they held everyone else up for the whole read: over a second here.)"""
    with qmpjobd(tmp_path) as daemon:
        piper = QmpConnection(daemon.socket_path, timeout=WAIT)
        assert piper.execute("qmp_capabilities") == {"return": {}}
        bystander = QmpConnection(daemon.socket_path, timeout=WAIT)
        assert bystander.execute("qmp_capabilities") == {"return": {}}
        received: list[dict[str, Any]] = []
        reader = threading.Thread(target=lambda: received.extend(
            messages(read_to_end(piper.sock))), daemon=True)
        reader.start()
        piper.sock.sendall(b'{"execute": "query-qmp-schema"}\n' * 120
                           + b'{"execute": "x-test-emit", "arguments": {"count": 1}}\n')
        bystander.send({"execute": "query-jobs", "id": "b"})
        assert bystander.receive() == {"return": [], "id": "b"}
        assert bystander.receive()["event"] == "X_TEST_EVENT"
        piper.sock.shutdown(socket.SHUT_WR)
        reader.join(WAIT)
        assert len(received) == 122
        assert [m.get("event") for m in received[-2:]] == ["X_TEST_EVENT", None]
        assert all(len(m["return"]) > 100 for m in received[:120])
        piper.close()
        bystander.close()


def test_nothing_a_client_sent_is_served_once_it_is_cut_off(tmp_path: Path) -> None:
    """A client that does not read is cut off at its output limit in the middle of its
    pipelined requests: the ones after that point are not run (here one that adds a node)."""
    with qmpjobd(tmp_path, "--output-limit", "65536", check_replies=False) as daemon:
        greedy = QmpConnection(daemon.socket_path, timeout=WAIT)
        greedy.sock.sendall(
            b'{"execute": "qmp_capabilities"}\n' + b'{"execute": "query-qmp-schema"}\n' * 40
            + b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
              b'"node-name": "late"}}\n')
        log = tmp_path / "qmpjobd.log"
        wait_for_log(log, lambda text: "the client is not reading" in text)
        with contextlib.suppress(ConnectionResetError):
            read_to_end(greedy.sock)  # what the kernel holds, then the end
        greedy.close()
        with daemon.connect() as conn:
            assert conn.execute("query-named-block-nodes") == {"return": []}


# -- 2. clients that vanish, half-close, trickle or say nothing ---------------------------------

NEGOTIATE = b'{"execute": "qmp_capabilities"}\n'
QUERY = b'{"execute": "query-jobs", "id": 1}\n'
# A message cut short, and one cut short after 300 KB (held against the input budget).
HALF = b'{"execute": "query-jobs", "arguments": {"x": [1, 2'
BIG_HALF = b'{"execute": "query-jobs", "arguments": {"x": "' + b"a" * 300_000
TRICKLE_PACE = 0.01  # seconds between a slow client's bytes


def connect(daemon: DaemonProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(str(daemon.socket_path))
    return sock


def vanish_mid_message(daemon: DaemonProcess, n: int, watcher: QmpConnection) -> None:
    sock = connect(daemon)
    sock.sendall((NEGOTIATE if n % 2 else b"") + (BIG_HALF if n % 3 == 0 else HALF))
    sock.close()


def half_close(daemon: DaemonProcess, n: int, watcher: QmpConnection) -> None:
    """A whole command, then end-of-file: the replies still come, then the daemon's end
    (a message left unfinished at the end is dropped)."""
    sock = connect(daemon)
    sock.sendall(NEGOTIATE + QUERY + (HALF if n % 2 else b""))
    sock.shutdown(socket.SHUT_WR)
    got = replies(read_to_end(sock))
    assert got[1:] == [{"return": {}}, {"return": [], "id": 1}], got
    sock.close()


def silent(daemon: DaemonProcess, n: int, watcher: QmpConnection) -> None:
    """Connects and closes without a word (every other one reads the greeting first)."""
    sock = connect(daemon)
    if n % 2:
        assert b"QMP" in sock.recv(4096)
    sock.close()


def non_reader(daemon: DaemonProcess, n: int, watcher: QmpConnection) -> None:
    """Asks for 360 KB (more than the socket holds) and closes without reading any of it, once
    the daemon holds what the socket did not take: its last request emits an event, which
    the WATCHER sees after the replies before it were made."""
    sock = connect(daemon)
    sock.sendall(NEGOTIATE + b'{"execute": "query-qmp-schema"}\n' * 12
                 + b'{"execute": "x-test-emit", "arguments": {"count": 1, "size": %d}}\n' % n)
    while len(watcher.receive()["data"]["padding"]) != n:
        pass
    sock.close()


def trickle(daemon: DaemonProcess, count: int) -> None:
    """COUNT clients each send a command a byte at a time, TRICKLE_PACE apart; a fifth of them
    go away in the middle, the rest read their replies and close (half of them half-closing
    first and reading to the end)."""
    data = NEGOTIATE + QUERY
    socks = [connect(daemon) for _ in range(count)]
    quitters = set(range(0, count, 5))
    for at in range(len(data)):
        for n, sock in enumerate(socks):
            if n in quitters and at == len(data) // 2:
                sock.close()
            elif not (n in quitters and at > len(data) // 2):
                sock.sendall(data[at:at + 1])
        time.sleep(TRICKLE_PACE)  # pacing the client, not waiting for the daemon
    for n, sock in enumerate(socks):
        if n in quitters:
            continue
        stream = sock.makefile("rb")
        got: list[dict[str, Any]] = []
        while len(got) < 3:
            got.extend(replies(stream.readline()))
        assert got[1:] == [{"return": {}}, {"return": [], "id": 1}], got
        if n % 2:
            sock.shutdown(socket.SHUT_WR)
            assert replies(stream.read()) == []  # events, if any, then the end
        stream.close()
        sock.close()


KINDS = (vanish_mid_message, half_close, silent, non_reader)


def idle_workers(pid: int) -> int:
    """The daemon's threads besides its main thread, each checked to be one of trio's cached
    worker threads, idle ("Trio thread N" while it has no job)."""
    names = [Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
             for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert all(name.startswith("Trio thread") for name in names), names
    return len(names)


def test_vanishing_and_slow_clients_leak_nothing(tmp_path: Path) -> None:
    from qmpjobd.server import PARSE_THREADS

    started = time.monotonic()
    log = tmp_path / "qmpjobd.log"
    # Small budgets: were the input or output of a client that went away still counted, a few
    # dozen such clients would exhaust them, and the log would say so.
    input_budget, output_budget = 4 * MiB, 2 * MiB
    with qmpjobd(tmp_path, "--log-level", "debug", "--input-budget", str(input_budget),
                 "--output-budget", str(output_budget), check_replies=False) as daemon:
        # Warm-up: one of each, so that whatever the daemon sets up once (its parse workers
        # among them) is there before the count.
        watcher = QmpConnection(daemon.socket_path, timeout=WAIT)
        assert watcher.execute("qmp_capabilities") == {"return": {}}
        for kind in KINDS:
            kind(daemon, 0, watcher)
        trickle(daemon, 2)
        wait_for_log(log, lambda text: still_connected(text) == 1)
        before = status(daemon.pid)
        workers_before = idle_workers(daemon.pid)

        slow = Background(lambda: trickle(daemon, 50))
        slow.start()
        for n in range(50):
            for kind in KINDS:
                kind(daemon, n, watcher)
        slow.finish()
        text = wait_for_log(log, lambda text: still_connected(text) == 1)
        after = status(daemon.pid)
        workers_after = idle_workers(daemon.pid)
        connects = len(re.findall(CONNECTED, text))
        print(f"\n{connects - 7} hostile clients: fds {before['fds']} -> "
              f"{after['fds']}, threads {before['threads']} -> {after['threads']} "
              f"(idle trio workers {workers_before} -> {workers_after}), RSS "
              f"{before['VmRSS'] // 1024} -> {after['VmRSS'] // 1024} MiB; "
              f"{time.monotonic() - started:.1f} s")
        assert connects == 7 + 4 * 50 + 50
        assert after["fds"] == before["fds"]
        # The main thread and at most PARSE_THREADS idle workers, which trio keeps for 10 s
        # after their last job (large messages are parsed in worker threads, server.py).
        assert workers_after <= PARSE_THREADS
        assert after["threads"] == 1 + workers_after
        assert "budget" not in text and "Traceback" not in text

        # Nothing of theirs is still counted: a message of 3 MiB fits the input budget, and
        # the daemon still answers.
        with daemon.connect() as conn:
            conn.sock.sendall(BIG_HALF + b"a" * (3 * MiB) + b'"}}\n')
            assert conn.receive() == {"error": {
                "class": "GenericError", "desc": "Parameter 'x' is unexpected"}}
            assert conn.execute("query-jobs") == {"return": []}
        watcher.close()


# -- 3. SIGKILL, then a new daemon on the same socket path --------------------------------------


def test_after_sigkill_a_new_daemon_takes_the_socket_over(tmp_path: Path) -> None:
    size = 16 * MiB
    for name in ("src", "dst"):
        (tmp_path / f"{name}.img").write_bytes(b"")
        os.truncate(tmp_path / f"{name}.img", size)
    with open(tmp_path / "src.img", "r+b") as f:
        f.write(b"data" * 1024)
    nodes = [arg for n in ("src", "dst")
             for arg in ("--blockdev", f"driver=file,node-name={n},filename={tmp_path / n}.img")]
    with qmpjobd(tmp_path, *nodes) as first:
        path = first.socket_path
        worker = QmpConnection(path, timeout=WAIT)
        assert worker.execute("qmp_capabilities") == {"return": {}}
        assert worker.execute("blockdev-backup", {
            "job-id": "j", "device": "src", "target": "dst", "sync": "full", "speed": 1,
        }) == {"return": {}}
        waiting = QmpConnection(path, timeout=WAIT)
        assert waiting.execute("qmp_capabilities") == {"return": {}}
        waiting.send({"execute": "x-test-hold", "arguments": {"key": "never"}, "id": 1})
        assert [job["status"] for job in worker.execute("query-jobs")["return"]] == ["running"]
        first.wait(signal.SIGKILL)
        for conn in (worker, waiting):
            with pytest.raises(ConnectionError):
                while True:
                    conn.receive()
            conn.close()
    assert path.is_socket()  # left behind: nobody listens on it
    with pytest.raises(ConnectionRefusedError):
        socket.socket(socket.AF_UNIX).connect(str(path))

    with qmpjobd(tmp_path, *nodes) as second:
        assert second.socket_path == path
        with second.connect() as conn:
            assert conn.execute("query-jobs") == {"return": []}
            # The killed daemon's files (and their locks) are free: the copy runs again.
            assert conn.execute("blockdev-backup", {
                "job-id": "j", "device": "src", "target": "dst", "sync": "full",
            }) == {"return": {}}
            while {"id": "j", "status": "null"} not in [e["data"] for e in conn.events]:
                conn.events.append(conn.receive())
            assert [e["event"] for e in conn.events if e["event"].startswith("BLOCK_JOB")] == [
                "BLOCK_JOB_COMPLETED"]
    assert (tmp_path / "dst.img").read_bytes() == (tmp_path / "src.img").read_bytes()
