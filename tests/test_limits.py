"""The daemon-wide limits (qmpjobd/limits.py), each set low on the command line and met for real:
clients, the input budget, the output budget, jobs and nodes. Past each, the client is told in
one QMP error (or, for output it does not read, simply disconnected), everyone else goes on,
and nothing that existed is lost.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import QMPJOBD, DaemonProcess, QmpConnection, daemon_env
from tests.test_hostile_clients import wait_for_log
from tests.test_server import TEST_SCHEMA

WAIT = 30.0


@pytest.fixture
def start(tmp_path: Path) -> Iterator[object]:
    """start(*options) -> a qmpjobd with the test schema and those limits."""
    stack: list[object] = []

    def run(*options: str) -> DaemonProcess:
        args = ["--schema", str(TEST_SCHEMA), "--handlers", "tests.extra_handlers",
                "--log", str(tmp_path / "qmpjobd.log"), *options]
        context = DaemonProcess.start(tmp_path, *args, program=QMPJOBD, env=daemon_env())
        stack.append(context)
        return context.__enter__()

    yield run
    for context in reversed(stack):
        context.__exit__(None, None, None)  # type: ignore[attr-defined]


def negotiated(daemon: DaemonProcess) -> QmpConnection:
    conn = QmpConnection(daemon.socket_path, timeout=WAIT)
    assert conn.execute("qmp_capabilities") == {"return": {}}
    return conn


def read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_one_client_too_many_is_told_and_closed(start: object, tmp_path: Path) -> None:
    daemon = start("--max-clients", "3")  # type: ignore[operator]
    clients = [negotiated(daemon) for _ in range(3)]
    extra = socket.socket(socket.AF_UNIX)
    extra.connect(str(daemon.socket_path))
    lines = read_to_end(extra).splitlines()
    assert [json.loads(line) for line in lines] == [{"error": {
        "class": "GenericError",
        "desc": "Too many clients: the daemon serves at most 3 at once"}}]
    extra.close()
    for conn in clients:
        assert conn.execute("query-jobs") == {"return": []}
    # A place is free again once the daemon has seen a client leave (it may take a
    # newcomer or two to get there: each is told, as above).
    clients.pop().close()
    for _ in range(1000):
        again = QmpConnection(daemon.socket_path, timeout=WAIT)
        if "QMP" in again.greeting:
            break
        again.close()
    assert again.execute("qmp_capabilities") == {"return": {}}
    again.close()
    for conn in clients:
        conn.close()


PARTIAL = b'{"execute": "query-jobs", "arguments": {"x": "'


def test_input_budget_closes_the_client_holding_most(start: object) -> None:
    """Three clients each hold 400 KB of an unfinished message: 1.2 MB against a 1 MiB budget.
    One of them (the one holding most when the budget ran out) is told and closed; the other
    two finish their messages and are answered."""
    daemon = start("--input-budget", str(1 << 20))  # type: ignore[operator]
    clients = [negotiated(daemon) for _ in range(3)]
    for conn in clients:
        conn.sock.sendall(PARTIAL + b"a" * 400_000)
    readable, _, _ = select.select([c.sock for c in clients], [], [], WAIT)
    assert len(readable) == 1
    victim = next(c for c in clients if c.sock is readable[0])
    assert victim.receive() == {"error": {
        "class": "GenericError",
        "desc": "The daemon's input budget is exhausted; closing the connection that holds "
                "the most"}}
    assert victim.stream.read() == b""
    for conn in clients:
        if conn is not victim:
            conn.sock.sendall(b'"}}\n')
            reply = conn.receive()
            assert reply["error"]["class"] == "GenericError", reply  # 'x' is unexpected
            assert conn.execute("query-jobs") == {"return": []}
        conn.close()


def test_one_message_may_not_take_the_whole_budget(start: object) -> None:
    """A message far below QEMU's 64 MiB per-message limit, but larger than the daemon-wide
    budget, costs its sender the connection; another client is not disturbed."""
    daemon = start("--input-budget", str(1 << 20))  # type: ignore[operator]
    bystander = negotiated(daemon)
    big = negotiated(daemon)
    # Refused while we are still sending: the daemon reads and drops the rest.
    big.sock.sendall(PARTIAL + b"a" * (2 << 20) + b'"}}\n')
    assert [json.loads(line) for line in read_to_end(big.sock).splitlines()] == [{"error": {
        "class": "GenericError",
        "desc": "The daemon's input budget is exhausted; closing the connection that holds "
                "the most"}}]
    assert bystander.execute("query-jobs") == {"return": []}
    big.close()
    bystander.close()


def test_output_budget_cuts_off_the_slowest_readers(start: object, tmp_path: Path) -> None:
    """Two clients that read nothing while 4 MB of events go out: each stays under its own
    8 MiB bound, but together they pass the 256 KiB budget, so each is cut off in turn. The
    client that reads gets every event."""
    daemon = start("--output-budget", str(256 << 10))  # type: ignore[operator]
    sleepers = [negotiated(daemon) for _ in range(2)]
    with daemon.connect() as worker:
        for _ in range(100):
            assert worker.execute("x-test-emit", {"count": 10, "size": 4000}) == {"return": {}}
        assert len(worker.events) == 1000
        assert worker.execute("query-jobs") == {"return": []}
    for sleeper in sleepers:
        assert len(sleeper.stream.read()) < 2_000_000  # what the kernel held, then EOF
        sleeper.close()
    log = (tmp_path / "qmpjobd.log").read_text()
    assert log.count("all clients together more than the budget") == 2


def _node(name: str) -> dict[str, object]:
    return {"driver": "null-co", "node-name": name}


def test_job_limit(start: object) -> None:
    daemon = start("--max-jobs", "2", "--blockdev", "driver=null-co,node-name=src",  # type: ignore[operator]
                   "--blockdev", "driver=null-co,node-name=d1",
                   "--blockdev", "driver=null-co,node-name=d2",
                   "--blockdev", "driver=null-co,node-name=d3")
    with daemon.connect() as conn:
        def backup(job: str, target: str) -> dict[str, object]:
            return conn.execute("blockdev-backup", {
                "job-id": job, "device": "src", "target": target, "sync": "full", "speed": 1})

        assert backup("j1", "d1") == {"return": {}}
        assert backup("j2", "d2") == {"return": {}}
        jobs = conn.execute("query-jobs")
        assert backup("j3", "d3") == {"error": {
            "class": "GenericError",
            "desc": "Too many jobs: the daemon holds at most 2; dismiss some first"}}
        assert conn.execute("query-jobs") == jobs
        assert conn.execute("job-cancel", {"id": "j1"}) == {"return": {}}
        assert backup("j3", "d3") == {"return": {}}  # j1 ended and was dismissed


def test_node_limit(start: object) -> None:
    daemon = start("--max-nodes", "3")  # type: ignore[operator]
    with daemon.connect() as conn:
        assert conn.execute("blockdev-add", _node("a")) == {"return": {}}
        assert conn.execute("blockdev-add", _node("b")) == {"return": {}}
        nodes = conn.execute("query-named-block-nodes")
        too_many = {"error": {"class": "GenericError",
                              "desc": "Too many block nodes: the daemon holds at most 3"}}
        # A raw node with an inline child is two nodes: it does not fit.
        raw = {"driver": "raw", "node-name": "r", "file": _node("c")}
        assert conn.execute("blockdev-add", raw) == too_many
        assert conn.execute("query-named-block-nodes") == nodes
        assert conn.execute("blockdev-add", _node("c")) == {"return": {}}
        assert conn.execute("blockdev-add", _node("d")) == too_many
        assert conn.execute("blockdev-del", {"node-name": "a"}) == {"return": {}}
        assert conn.execute("blockdev-add", _node("d")) == {"return": {}}


def test_out_of_descriptors_waits_for_a_client_to_leave(tmp_path: Path) -> None:
    """With the process's descriptor limit at 64, clients past it wait in the listen backlog
    (accept fails with EMFILE: the daemon logs it and retries) and are served as soon as
    others leave; the daemon never falls over."""
    program = ["prlimit", "--nofile=64:64", *QMPJOBD]
    log = tmp_path / "qmpjobd.log"
    with DaemonProcess.start(tmp_path, "--log", str(log), program=program,
                             env=daemon_env()) as daemon:
        socks = []
        for _ in range(80):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(daemon.socket_path))  # into the backlog at worst
            sock.settimeout(WAIT)
            socks.append(sock)
        wait_for_log(log, lambda text: "cannot accept a client now" in text)
        # The first ones were accepted (the backlog is first come, first served): leaving,
        # they make room; then every other client is greeted in turn as the one before leaves.
        for sock in socks[:20]:
            sock.close()
        for sock in socks[20:]:
            assert json.loads(sock.makefile("rb").readline())["QMP"]
            sock.close()
        with daemon.connect() as conn:
            assert conn.execute("query-jobs") == {"return": []}
    assert "cannot accept a client now: Too many open files" in log.read_text()
