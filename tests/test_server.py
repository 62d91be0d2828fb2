"""The daemon over real sockets: sessions, many clients, events, limits, oob, lifecycle."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpjobd.cli import DEFAULT_SCHEMA, SCHEMA_DEFINES
from qmpjobd.qapi import load_schema
from qmpjobd.qapi.tables import build_tables
from tests.conftest import REPO
from tests.daemons import QMPJOBD, DaemonProcess, QmpConnection, daemon_env

TEST_SCHEMA = REPO / "tests" / "schema" / "test-schema.json"


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[DaemonProcess]:
    args = ["--schema", str(TEST_SCHEMA), "--handlers", "tests.extra_handlers",
            "--log", str(tmp_path / "qmpjobd.log"), "--log-level", "debug"]
    with DaemonProcess.start(tmp_path, *args, program=QMPJOBD, env=daemon_env()) as daemon:
        yield daemon


def raw(daemon: DaemonProcess) -> QmpConnection:
    return QmpConnection(daemon.socket_path)


def test_greeting_and_negotiation(ours: DaemonProcess) -> None:
    conn = raw(ours)
    assert conn.greeting == {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "qmpjobd 0.1.0"},
            "capabilities": ["oob"],
        }
    }
    assert conn.execute("query-jobs") == {"error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    assert conn.execute("qmp_capabilities", {"enable": ["bogus"]}) == {"error": {
        "class": "GenericError", "desc": "Parameter 'null' does not accept value 'bogus'"}}
    assert conn.execute("qmp_capabilities") == {"return": {}}
    assert conn.execute("qmp_capabilities") == {"error": {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"}}
    conn.close()


def test_control_commands(ours: DaemonProcess) -> None:
    # As the daemon loads it: the product's schema, then the test file as if included last.
    tables = build_tables(load_schema(str(DEFAULT_SCHEMA), [str(TEST_SCHEMA)]), SCHEMA_DEFINES)
    with ours.connect() as conn:
        assert conn.execute("query-version") == {"return": {
            "qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "qmpjobd 0.1.0"}}
        commands = conn.execute("query-commands")["return"]
        assert [c["name"] for c in commands] == list(reversed(tables.commands))
        assert conn.execute("query-qmp-schema") == {"return": tables.schema_info}
        assert conn.execute("query-jobs") == {"return": []}
        for verb in ("pause", "resume", "cancel", "complete", "dismiss", "finalize"):
            assert conn.execute(f"job-{verb}", {"id": "j"}) == {
                "error": {"class": "GenericError", "desc": "Job not found"}}
        assert conn.execute("job-pause") == {
            "error": {"class": "GenericError", "desc": "Parameter 'id' is missing"}}
        assert conn.execute("no-such-command") == {"error": {
            "class": "CommandNotFound", "desc": "The command no-such-command has not been found"}}


def test_input_framing_over_a_socket(ours: DaemonProcess) -> None:
    conn = raw(ours)
    conn.stream.write(
        b'{"execute": "qmp_capabilities", "id": 1}{"execute":\n "query-jobs",\n "id": 2}\n'
        b"{'execute': 'query-jobs', 'id': 'it''s'}\n\n"  # two strings: a parse error
        b"{'execute': 'query-jobs', 'id': 'it\\'s'}\n"
        b'{"execute": "query-jobs", "id": 123456789012345678901234567890}\n'
    )
    conn.stream.flush()
    replies = [conn.receive() for _ in range(5)]
    assert replies[:2] == [{"return": {}, "id": 1}, {"return": [], "id": 2}]
    assert replies[2]["error"]["class"] == "GenericError"
    assert replies[2]["error"]["desc"].startswith("JSON parse error")
    assert replies[3:] == [{"return": [], "id": "it's"},
                           {"return": [], "id": 123456789012345678901234567890}]
    conn.close()


def test_many_clients_each_negotiate(ours: DaemonProcess) -> None:
    clients = [raw(ours) for _ in range(40)]
    for i, conn in enumerate(clients):
        if i % 2 == 0:
            assert conn.execute("qmp_capabilities") == {"return": {}}
    for i, conn in enumerate(clients):
        reply = conn.execute("query-jobs", None)
        if i % 2 == 0:
            assert reply == {"return": []}
        else:
            assert reply["error"]["class"] == "CommandNotFound"
    for conn in clients:
        conn.close()


def test_events_go_to_negotiated_clients_before_the_reply(ours: DaemonProcess) -> None:
    listener, bystander, caller = raw(ours), raw(ours), raw(ours)
    listener.execute("qmp_capabilities")
    caller.execute("qmp_capabilities")
    caller.send({"execute": "x-test-emit", "arguments": {"count": 3}, "id": "e"})
    # The caller sees its events first, then the reply; no event may follow the reply.
    got = [caller.receive() for _ in range(4)]
    assert [m.get("event") for m in got[:3]] == ["X_TEST_EVENT"] * 3
    assert [m["data"]["n"] for m in got[:3]] == [0, 1, 2]
    assert got[3] == {"return": {}, "id": "e"}
    for message in got[:3]:
        assert set(message["timestamp"]) == {"seconds", "microseconds"}
    # The other negotiated client gets the same three; the one still negotiating gets none.
    assert [listener.receive()["data"]["n"] for _ in range(3)] == [0, 1, 2]
    assert bystander.execute("qmp_capabilities") == {"return": {}}
    assert bystander.execute("query-jobs") == {"return": []}
    assert bystander.events == []
    for conn in (listener, bystander, caller):
        conn.close()


def test_a_client_that_does_not_read_is_disconnected_and_others_go_on(tmp_path: Path) -> None:
    log = tmp_path / "qmpjobd.log"
    args = ["--schema", str(TEST_SCHEMA), "--handlers", "tests.extra_handlers",
            "--output-limit", "65536", "--log", str(log)]
    with DaemonProcess.start(tmp_path, *args, program=QMPJOBD, env=daemon_env()) as daemon:
        sleeper = raw(daemon)
        sleeper.execute("qmp_capabilities")
        with daemon.connect() as worker:
            # 4 MB of events in bursts of 40 KB: far beyond the socket buffers and the 64 KiB
            # output bound for the client that does not read; the caller reads them all.
            for _ in range(100):
                reply = worker.execute("x-test-emit", {"count": 10, "size": 4000})
                assert reply == {"return": {}}
            assert len(worker.events) == 1000
            assert worker.execute("query-jobs") == {"return": []}
        # The sleeper was cut off: what the kernel still holds for it ends in EOF, well short
        # of the 4 MB (the last message may be cut in the middle).
        rest = sleeper.stream.read()
        assert len(rest) < 2_000_000
        sleeper.close()
        text = log.read_text()
        assert "disconnecting" in text and "the client is not reading" in text


def test_oob_overtakes_queued_inband_requests(ours: DaemonProcess) -> None:
    conn = raw(ours)
    assert conn.execute("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
    conn.send({"execute": "x-test-hold", "arguments": {"key": "a"}, "id": "hold"})
    conn.send({"execute": "query-jobs", "id": "queued"})
    conn.send({"exec-oob": "x-test-release", "arguments": {"key": "a"}, "id": "oob"})
    # The oob command runs at once, releasing the hold; the queued request follows in order.
    assert conn.receive() == {"return": {}, "id": "oob"}
    assert conn.receive() == {"return": {"key": "a"}, "id": "hold"}
    assert conn.receive() == {"return": [], "id": "queued"}
    conn.send({"exec-oob": "query-jobs", "id": 9})
    assert conn.receive() == {"id": 9, "error": {
        "class": "GenericError", "desc": "The command query-jobs does not support OOB"}}
    conn.close()


def test_without_oob_requests_run_one_at_a_time(ours: DaemonProcess) -> None:
    conn, other = raw(ours), raw(ours)
    conn.execute("qmp_capabilities")
    other.execute("qmp_capabilities")
    conn.send({"execute": "x-test-hold", "arguments": {"key": "b"}, "id": 1})
    conn.send({"execute": "x-test-release", "arguments": {"key": "b"}, "id": 2})
    # exec-oob is refused without oob negotiated, and only once its turn comes.
    conn.send({"exec-oob": "x-test-release", "arguments": {"key": "b"}, "id": 3})
    # The hold waits; the release behind it cannot overtake it on the same connection.
    assert other.execute("x-test-release", {"key": "b"}) == {"return": {}}
    assert conn.receive() == {"return": {"key": "b"}, "id": 1}
    assert conn.receive() == {"return": {}, "id": 2}
    assert conn.receive() == {"id": 3, "error": {
        "class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}
    for c in (conn, other):
        c.close()


def test_quit_replies_then_exits_and_removes_the_socket(tmp_path: Path) -> None:
    with DaemonProcess.start(tmp_path, program=QMPJOBD, env=daemon_env()) as daemon:
        pidfile = tmp_path / "qmpjobd.pid"
        assert pidfile.read_text().strip() == str(daemon.pid)
        assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o600
        with daemon.connect() as conn:
            assert conn.execute("quit") == {"return": {}}
            with pytest.raises(ConnectionError):
                conn.receive()
        daemon.wait()
        assert not daemon.socket_path.exists()
        assert not pidfile.exists()


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    with DaemonProcess.start(tmp_path, program=QMPJOBD, env=daemon_env()) as daemon:
        conn = raw(daemon)
        os.kill(daemon.pid, signal.SIGTERM)
        daemon.wait()
        assert not daemon.socket_path.exists()
        conn.close()


def test_a_live_socket_is_never_taken_over_and_a_stale_one_is(tmp_path: Path) -> None:
    path = tmp_path / "q.sock"
    with DaemonProcess.start(tmp_path, program=QMPJOBD, env=daemon_env()) as daemon:
        second = subprocess.run(
            [*QMPJOBD, "--socket", str(daemon.socket_path)], env=daemon_env(),
            capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 1
        assert "is in use by a running daemon" in second.stderr
        with daemon.connect() as conn:
            assert conn.execute("query-jobs") == {"return": []}
    # A socket file nobody listens on (its daemon was killed) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with DaemonProcess.start(tmp_path, "--socket", str(path), program=QMPJOBD,
                             env=daemon_env()) as daemon:
        conn = QmpConnection(path)
        assert conn.execute("qmp_capabilities") == {"return": {}}
        conn.close()


def test_default_socket_path_is_printed(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    proc = subprocess.Popen(
        [*QMPJOBD], env=daemon_env(XDG_RUNTIME_DIR=str(runtime)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        printed = proc.stdout.readline().strip()
        assert printed == str(runtime / "qmpjobd.sock")
        conn = QmpConnection(Path(printed))
        assert conn.execute("qmp_capabilities") == {"return": {}}
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    assert not (runtime / "qmpjobd.sock").exists()


def test_stdio_monitor_keeps_logs_off_stdout() -> None:
    requests = b'{"execute": "qmp_capabilities"}\n{"execute": "query-jobs", "id": 1}\n' \
               b'{"execute": "quit"}\n'
    result = subprocess.run(
        [*QMPJOBD, "--chardev", "stdio,id=m0", "--monitor", "chardev=m0,pretty=on",
         "--log-level", "debug"],
        input=requests, capture_output=True, env=daemon_env(), timeout=30,
    )
    assert result.returncode == 0
    decoder = json.JSONDecoder()
    text, messages, at = result.stdout.decode(), [], 0
    while at < len(text.rstrip()):
        value, end = decoder.raw_decode(text, at)
        messages.append(value)
        at = end + 2  # CRLF after every message
    assert "QMP" in messages[0]
    assert messages[1:] == [{"return": {}}, {"return": [], "id": 1}, {"return": {}}]
    assert b"\r\n    " in result.stdout  # pretty printed
    assert b"listening" in result.stderr


def test_bad_command_lines() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*QMPJOBD, *args], capture_output=True, text=True,
                              env=daemon_env(), timeout=30)

    result = run("--monitor", "chardev=nope")
    assert result.returncode == 2 and "chardev 'nope' not found" in result.stderr
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("qmpjobd 0.1.0")


@pytest.mark.parametrize(
    ("args", "status", "error"),
    [
        (["--socket", "{tmp}/missing/q.sock"], 1,
         "--socket {tmp}/missing/q.sock: cannot listen on {tmp}/missing/q.sock: "
         "No such file or directory"),
        (["--chardev", "socket,id=m,path={tmp}/missing/q.sock,server=on,wait=off",
          "--monitor", "m"], 1,
         "--chardev socket,id=m,path={tmp}/missing/q.sock,server=on,wait=off: cannot listen on "
         "{tmp}/missing/q.sock: No such file or directory"),
        (["--socket", "{tmp}/file"], 1,
         "--socket {tmp}/file: {tmp}/file exists and is not a socket"),
        (["--max-jobs", "abc"], 2,
         "error: argument --max-jobs: expects a whole number of at least 1, not 'abc'"),
        (["--max-clients", "0"], 2,
         "error: argument --max-clients: expects a whole number of at least 1, not '0'"),
        (["--socket", "{tmp}/q.sock", "--pidfile", "{tmp}/missing/q.pid"], 1,
         "--pidfile {tmp}/missing/q.pid: cannot write: No such file or directory"),
        (["--socket", "{tmp}/q.sock", "--log", "{tmp}/missing/q.log"], 1,
         "--log {tmp}/missing/q.log: cannot open: No such file or directory"),
        (["--socket", "{tmp}/q.sock", "--schema", "{tmp}/missing.json"], 1,
         "--schema {tmp}/missing.json: can't read schema file '{tmp}/missing.json': "
         "No such file or directory"),
        (["--socket", "{tmp}/q.sock", "--handlers", "no_such_module"], 1,
         "--handlers no_such_module: cannot import: No module named 'no_such_module'"),
        (["--chardev", "socket,id=m,path={tmp}/q.sock,server=on,wait=off,,x", "--monitor", "m"],
         2, "--chardev socket,id=m,path={tmp}/q.sock,server=on,wait=off,,x: "
         "Parameter 'wait' expects 'on' or 'off'"),
        (["--chardev", "socket,id=m,path={tmp}/q.sock,server=on,wait=off,path=y",
          "--monitor", "m"], 2,
         "--chardev socket,id=m,path={tmp}/q.sock,server=on,wait=off,path=y: "
         "Parameter 'path' given more than once"),
        (["--chardev", "stdio,id=m", "--monitor", "m,pretty=maybe"], 2,
         "--monitor m,pretty=maybe: Parameter 'pretty' expects 'on' or 'off'"),
    ],
)
def test_command_line_errors_name_option_value_and_path(
    args: list[str], status: int, error: str, tmp_path: Path
) -> None:
    """Each error is one line naming the option, its value and the path involved; nothing is
    left behind (no socket, no pid file)."""
    (tmp_path / "file").write_text("not a socket")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    result = subprocess.run([*QMPJOBD, *argv], capture_output=True, text=True,
                            env=daemon_env(), timeout=30)
    assert result.returncode == status
    assert result.stderr.splitlines()[-1] == "qmpjobd: " + error.replace("{tmp}", str(tmp_path))
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]



def test_a_daemon_that_fails_to_start_leaves_an_existing_pid_file_alone(tmp_path: Path) -> None:
    pidfile = tmp_path / "q.pid"
    pidfile.write_text("12345\n")  # another daemon's, say
    result = subprocess.run(
        [*QMPJOBD, "--socket", str(tmp_path / "missing" / "q.sock"), "--pidfile", str(pidfile)],
        capture_output=True, text=True, env=daemon_env(), timeout=30,
    )
    assert result.returncode == 1 and "cannot listen on" in result.stderr
    assert pidfile.read_text() == "12345\n"


def test_default_socket_path_without_xdg_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qmpjobd.cli import UsageError, default_socket_path

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    path = default_socket_path(str(tmp_path))
    private = tmp_path / f"qmpjobd-{os.getuid()}"
    assert path == str(private / "qmp.sock")
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert default_socket_path(str(tmp_path)) == path  # the same directory again is fine
    private.chmod(0o755)  # others could plant a socket there: refuse it
    with pytest.raises(UsageError, match="not a private directory"):
        default_socket_path(str(tmp_path))


@pytest.mark.parametrize(
    ("blockdev", "error"),
    [
        ("driver=null-co,node-name=src,size=4M", "Parameter 'size' expects integer"),
        ("driver=null-co,node-name=x,read-zeroes=maybe",
         "Parameter 'read-zeroes' expects 'on' or 'off'"),
        ("driver=foo,node-name=x", "Parameter 'driver' does not accept value 'foo'"),
        # QSD 7.2 aborts on this one, printing the message (docs/compat.md).
        ("driver=null-co,node-name=x,size=-1",
         "Parameter 'size' expects a non-negative number below 2^64"),
        ('{"driver": "null-co", "node-name": "x", "bogus": 1}', "Parameter 'bogus' is unexpected"),
    ],
)
def test_bad_blockdev_options(blockdev: str, error: str, tmp_path: Path) -> None:
    """The same messages as qemu-storage-daemon gives for the same --blockdev."""
    result = subprocess.run(
        [*QMPJOBD, "--socket", str(tmp_path / "q.sock"), "--blockdev", blockdev],
        capture_output=True, text=True, env=daemon_env(), timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"qmpjobd: --blockdev {blockdev}: {error}"


def test_blockdev_options_make_nodes(tmp_path: Path) -> None:
    """Both of QSD's forms: key=value (dotted) and JSON."""
    args = ["--blockdev", "driver=null-co,node-name=src,size=4194304,read-zeroes=on",
            "--blockdev", '{"driver": "null-co", "node-name": "dst", "size": 4194304}']
    with DaemonProcess.start(tmp_path, *args, program=QMPJOBD, env=daemon_env()) as daemon, \
            daemon.connect() as conn:
        assert conn.execute("blockdev-add", {"driver": "null-co", "node-name": "src"}) == {
            "error": {"class": "GenericError", "desc": "Duplicate nodes with node-name='src'"}}
        reply = conn.execute("blockdev-backup", {"job-id": "j", "device": "src", "target": "dst",
                                                 "sync": "full"})
        assert reply == {"return": {}}
        events = list(conn.events)
        while {"status": "null", "id": "j"} not in [e.get("data") for e in events]:
            events.append(conn.receive())
        assert [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE"] == [
            "created", "running", "waiting", "pending", "concluded", "null"]


def test_sigterm_cancels_running_jobs_and_clients_see_them_end(tmp_path: Path) -> None:
    args = ["--blockdev", "driver=null-co,node-name=src,size=4194304",
            "--blockdev", "driver=null-co,node-name=dst,size=4194304"]
    with DaemonProcess.start(tmp_path, *args, program=QMPJOBD, env=daemon_env()) as daemon:
        conn = raw(daemon)
        conn.execute("qmp_capabilities")
        assert conn.execute("blockdev-backup", {"job-id": "j", "device": "src", "target": "dst",
                                                "sync": "full", "speed": 1}) == {"return": {}}
        os.kill(daemon.pid, signal.SIGTERM)
        events = list(conn.events)
        with pytest.raises(ConnectionError):
            while True:
                events.append(conn.receive())
        statuses = [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE"]
        assert statuses == ["created", "running", "aborting", "concluded", "null"]
        assert [e["event"] for e in events if e["event"].startswith("BLOCK_JOB")] == [
            "BLOCK_JOB_CANCELLED"]
        daemon.wait()
        assert not daemon.socket_path.exists()
        conn.close()


def test_stdio_monitor_reading_a_file(tmp_path: Path) -> None:
    """stdin may be a regular file (`qmpjobd ... < commands`): read it all, answer it all."""
    commands = tmp_path / "commands.json"
    commands.write_bytes(b'{"execute": "qmp_capabilities"}\n{"execute": "query-jobs", "id": 1}\n'
                         b'{"execute": "quit"}\n')
    with commands.open("rb") as stdin:
        result = subprocess.run(
            [*QMPJOBD, "--chardev", "stdio,id=m0", "--monitor", "chardev=m0"],
            stdin=stdin, capture_output=True, env=daemon_env(), timeout=30,
        )
    assert result.returncode == 0
    replies = [json.loads(line) for line in result.stdout.splitlines()[1:]]
    assert replies == [{"return": {}}, {"return": [], "id": 1}, {"return": {}}]


def test_oob_queue_is_answered_at_end_of_input(ours: DaemonProcess) -> None:
    """A client that enables oob, sends requests and half-closes gets every reply."""
    conn = raw(ours)
    assert conn.execute("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
    for i in range(5):
        conn.send({"execute": "query-jobs", "id": i})
    conn.sock.shutdown(socket.SHUT_WR)
    assert [conn.receive() for _ in range(5)] == [{"return": [], "id": i} for i in range(5)]
    with pytest.raises(ConnectionError):
        conn.receive()
    conn.close()


def test_a_large_message_does_not_stall_other_clients(ours: DaemonProcess) -> None:
    """512 KiB of small tokens, sent in pieces, takes QEMU's lexer (ours, in Python) about a
    second; it is parsed in a worker thread, so another client's requests are answered
    meanwhile, before the large one's reply."""
    big = raw(ours)
    big.execute("qmp_capabilities")
    bystander = raw(ours)
    bystander.execute("qmp_capabilities")
    message = b'{"execute": "query-jobs", "arguments": {"a": [' + b"1," * (1 << 18) + b'1]}}\n'
    big.sock.sendall(message)
    for _ in range(20):
        assert bystander.execute("query-jobs") == {"return": []}
    # Had the loop parsed it inline, the 20 replies could not have come first: the large
    # message must still be in progress, its reply not yet sent.
    readable, _, _ = select.select([big.sock], [], [], 0)
    assert not readable
    assert big.receive()["error"]["desc"] == "Parameter 'a' is unexpected"
    big.close()
    bystander.close()
