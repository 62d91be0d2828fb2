"""qmpjob, the command-line client, against a live qmpjobd: what it shows of jobs and task
records, what its verbs do, how `wait` and `watch` end, its exit statuses (0 done, 1 refused or
failed, 2 usage or connection) and its one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.client import render
from qmpjobd.client.main import byte_count
from tests.daemons import DaemonProcess, QmpConnection, ok, start_qmpjobd
from tests.test_hostile_clients import wait_for_log

QMPJOB = Path(sys.executable).parent / "qmpjob"  # the console script pyproject.toml declares
SIZE = 64 << 20
WAIT = 30.0


@pytest.fixture
def monitor(conn: QmpConnection) -> QmpConnection:
    """conftest's connection to the daemon, by the name these tests give it."""
    return conn


def qmpjob(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(QMPJOB), "-s", str(daemon.socket_path), *args],
                          capture_output=True, text=True, timeout=WAIT)


def start_qmpjob(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(QMPJOB), "-s", str(daemon.socket_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def until_status(conn: QmpConnection, job: str, status: str) -> None:
    """Wait for job JOB's JOB_STATUS_CHANGE to STATUS (among the events kept, then new)."""
    while True:
        for n, event in enumerate(conn.events):
            if (event["event"] == "JOB_STATUS_CHANGE" and event["data"]["id"] == job
                    and event["data"]["status"] == status):
                del conn.events[:n + 1]
                return
        conn.events.clear()
        conn.events.append(conn.receive(WAIT))


def slow_backup(conn: QmpConnection, job: str = "j", **options: Any) -> None:
    """A backup between null-co nodes at 1 MiB/s: it runs for a minute unless sped up."""
    for node in (f"{job}-src", f"{job}-dst"):
        ok(conn, "blockdev-add", {"driver": "null-co", "node-name": node, "size": SIZE,
                                  "read-zeroes": True})
    ok(conn, "blockdev-backup", {"job-id": job, "device": f"{job}-src",
                                 "target": f"{job}-dst", "sync": "full", "speed": 1 << 20,
                                 "x-perf": {"max-chunk": 65536}, **options})
    until_status(conn, job, "running")


def until_printed(conn: QmpConnection, tail: subprocess.Popen[str]) -> None:
    """Pause and resume job j (events each time) until TAIL, an `events` view that may not
    be listening yet, has printed something; the job is left running."""
    assert tail.stdout is not None
    while True:
        for verb, status in (("job-pause", "paused"), ("job-resume", "running")):
            ok(conn, verb, {"id": "j"})
            until_status(conn, "j", status)
        ready, _, _ = select.select([tail.stdout], [], [], 0.1)
        if ready:
            return


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert done.returncode == code, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("qmpjob"), done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_list_shows_a_running_job_with_its_progress_and_task(
        daemon: DaemonProcess, monitor: QmpConnection) -> None:
    slow_backup(monitor)
    table = qmpjob(daemon, "list")
    assert table.returncode == 0, table
    header, row = table.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "ETA", "AGE"]
    assert row.split()[:3] == ["j", "backup", "running"]
    assert "[" in row and "%" in row and "(max 1.0 MiB/s)" in row
    done = qmpjob(daemon, "list", "--json")
    (line,) = done.stdout.splitlines()
    found = json.loads(line)
    (task,) = ok(monitor, "query-tasks", {"job-id": "j"})
    assert found["kind"] == "job" and found["uuid"] == task["uuid"]
    assert 0 <= found["progress"] < 1 and found["total-progress"] == SIZE
    assert found["speed-limit"] == 1 << 20 and found["age"] >= 0
    # Once over, a job's task shows only with --all.
    ok(monitor, "block-job-set-speed", {"device": "j", "speed": 0})
    until_status(monitor, "j", "null")
    assert qmpjob(daemon, "list", "--json").stdout == ""
    (line,) = qmpjob(daemon, "list", "--all", "--json").stdout.splitlines()
    assert json.loads(line) | {"age": 0} == {
        "kind": "task", "id": "j", "uuid": task["uuid"], "type": "backup", "status": "success",
        "progress": 1.0, "speed": None, "speed-limit": None, "eta": None, "age": 0}


def test_verbs_steer_the_job(daemon: DaemonProcess, monitor: QmpConnection) -> None:
    slow_backup(monitor, **{"auto-finalize": False, "auto-dismiss": False})
    assert qmpjob(daemon, "pause", "j").returncode == 0
    until_status(monitor, "j", "paused")
    assert qmpjob(daemon, "resume", "j").returncode == 0
    until_status(monitor, "j", "running")
    assert qmpjob(daemon, "set-speed", "j", "0").returncode == 0
    until_status(monitor, "j", "pending")
    assert qmpjob(daemon, "finalize", "j").returncode == 0
    until_status(monitor, "j", "concluded")
    assert qmpjob(daemon, "dismiss", "j").returncode == 0
    until_status(monitor, "j", "null")
    one_line_error(qmpjob(daemon, "pause", "j"), 1, "pause j:")


def test_set_speed_takes_binary_suffixes(daemon: DaemonProcess, monitor: QmpConnection) -> None:
    slow_backup(monitor)
    assert qmpjob(daemon, "set-speed", "j", "3M").returncode == 0
    (job,) = ok(monitor, "query-block-jobs")
    assert job["speed"] == 3 << 20
    one_line_error(qmpjob(daemon, "set-speed", "j", "fast"), 2, "not a byte count")
    ok(monitor, "job-cancel", {"id": "j"})


def test_wait_reports_a_job_that_ended_and_was_dismissed_before(
        daemon: DaemonProcess, monitor: QmpConnection) -> None:
    slow_backup(monitor)
    ok(monitor, "block-job-set-speed", {"device": "j", "speed": 0})
    until_status(monitor, "j", "null")
    assert ok(monitor, "query-jobs") == []
    done = qmpjob(daemon, "wait", "j")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_wait_ends_when_the_jobs_do(daemon: DaemonProcess, monitor: QmpConnection) -> None:
    slow_backup(monitor, "a")
    slow_backup(monitor, "b")
    waiter = start_qmpjob(daemon, "wait", "a", "b")
    ok(monitor, "block-job-set-speed", {"device": "a", "speed": 0})
    until_status(monitor, "a", "null")
    # (Had the waiter ended with a, it would have ended 0, without b's outcome.)
    ok(monitor, "job-cancel", {"id": "b"})
    out, err = waiter.communicate(timeout=WAIT)
    assert waiter.returncode == 1
    assert (out, err) == ("", "qmpjob: b: cancelled\n")


def test_wait_reports_a_client_task_failure(daemon: DaemonProcess,
                                            monitor: QmpConnection) -> None:
    uuid = ok(monitor, "task-create", {"name-label": "import", "type": "x-import"})["uuid"]
    waiter = start_qmpjob(daemon, "wait", uuid)
    ok(monitor, "task-set-error-info", {"uuid": uuid,  # (which makes it a failure)
                                        "error-info": ["ImportFailed", "disk full"]})
    out, err = waiter.communicate(timeout=WAIT)
    assert (waiter.returncode, out, err) == (1, "", f"qmpjob: {uuid}: failed: disk full\n")


def test_cancel_of_a_client_task(daemon: DaemonProcess, monitor: QmpConnection) -> None:
    uuid = ok(monitor, "task-create", {"name-label": "import"})["uuid"]
    assert qmpjob(daemon, "cancel", uuid).returncode == 0
    assert ok(monitor, "query-task", {"uuid": uuid})["status"] in ("cancelling", "cancelled")


def test_tasks_filters(daemon: DaemonProcess, monitor: QmpConnection) -> None:
    made = {}
    for label, type_ in (("one", "x-a"), ("two", "x-b"), ("three", "x-a")):
        made[label] = ok(monitor, "task-create", {"name-label": label, "type": type_})["uuid"]
    ok(monitor, "task-set-status", {"uuid": made["three"], "status": "success"})

    def uuids(*args: str) -> list[str]:
        done = qmpjob(daemon, "tasks", "--json", *args)
        assert done.returncode == 0, done
        return [json.loads(line)["uuid"] for line in done.stdout.splitlines()]

    assert uuids("--type", "x-a") == [made["one"]]  # pending ones unless --all
    assert uuids("--type", "x-a", "--all") == [made["three"], made["one"]]  # newest first
    assert uuids("--label", "two") == [made["two"]]
    assert uuids("--status", "success") == [made["three"]]
    table = qmpjob(daemon, "tasks").stdout.splitlines()
    assert table[0].split()[:4] == ["UUID", "TYPE", "NAME", "STATUS"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted([made["one"], made["two"]])


def test_events_tail_every_event(daemon: DaemonProcess, monitor: QmpConnection) -> None:
    slow_backup(monitor)
    tails = [start_qmpjob(daemon, "events", "--json"), start_qmpjob(daemon, "events")]
    try:
        # Until both tails have printed an event they are connected: pause and resume the job
        # (two events each time), looking at their output in between.
        pending = list(tails)
        while pending:
            for verb, status in (("job-pause", "paused"), ("job-resume", "running")):
                ok(monitor, verb, {"id": "j"})
                until_status(monitor, "j", status)
            ready, _, _ = select.select([tail.stdout for tail in pending], [], [], 0.1)
            pending = [tail for tail in pending if tail.stdout not in ready]
        ok(monitor, "job-cancel", {"id": "j"})
        lines = []
        for tail, last in zip(tails, ('"status":"null"', "status=null"), strict=True):
            assert tail.stdout is not None
            seen = [tail.stdout.readline()]
            while last not in seen[-1]:
                seen.append(tail.stdout.readline())
            lines.append(seen)
        # --json: each event as the daemon sent it (its compact text, its key order).
        assert all(line == json.dumps(json.loads(line), separators=(",", ":")) + "\n"
                   for line in lines[0]), lines[0]
        statuses = [event["data"]["status"] for event in map(json.loads, lines[0])
                    if event["event"] == "JOB_STATUS_CHANGE"]
        assert statuses[-3:] == ["aborting", "concluded", "null"]
        assert any(json.loads(line)["event"] == "BLOCK_JOB_CANCELLED" for line in lines[0])
        assert len(lines[1]) >= 3 and all(re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} [A-Z_]+( [a-z-]+=\S+)+\n", line)
            for line in lines[1])
        assert lines[1][-1].endswith(" JOB_STATUS_CHANGE status=null id=j\n")  # wire order
    finally:
        for tail in tails:
            tail.kill()
            tail.communicate()


def test_events_json_from_a_pretty_monitor_is_one_line_each(tmp_path: Path) -> None:
    pretty = tmp_path / "pretty.sock"
    with start_qmpjobd(tmp_path, "--chardev", f"socket,id=p,path={pretty},server=on,wait=off",
                       "--monitor", "chardev=p,pretty=on") as daemon, \
            daemon.connect() as monitor:
        tail = subprocess.Popen([str(QMPJOB), "-s", str(pretty), "events", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert tail.stdout is not None
        try:
            slow_backup(monitor)
            until_printed(monitor, tail)
            line = tail.stdout.readline()
            assert json.loads(line)["event"] == "JOB_STATUS_CHANGE", line
            assert line.count("\n") == 1 and "\r" not in line
        finally:
            tail.kill()
            tail.communicate()
        ok(monitor, "job-cancel", {"id": "j"})


def test_schema_reads_a_commands_signature(daemon: DaemonProcess) -> None:
    done = qmpjob(daemon, "schema", "block-job-set-speed")
    assert done.stdout.splitlines() == ["block-job-set-speed", "  arguments:",
                                        "    device: str", "    speed: int",
                                        "  returns: nothing"]
    names = qmpjob(daemon, "schema").stdout.splitlines()
    assert "query-jobs" in names and "task-watch" in names and names == sorted(names)
    one_line_error(qmpjob(daemon, "schema", "no-such-command"), 1, "no-such-command")


def test_watch_draws_the_job_and_ends_with_it(daemon: DaemonProcess,
                                               monitor: QmpConnection) -> None:
    slow_backup(monitor)
    watcher = start_qmpjob(daemon, "watch", "j")
    ok(monitor, "block-job-set-speed", {"device": "j", "speed": 0})
    out, err = watcher.communicate(timeout=WAIT)
    assert (watcher.returncode, err) == (0, "")
    assert out.split()[:3] == ["j", "backup", "success"], out  # however soon it ended


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_watch_on_a_terminal_draws_bars_that_advance(daemon: DaemonProcess,
                                                     monitor: QmpConnection) -> None:
    """On a pseudo-terminal: rich's live view, redrawn in place; the job's bar moves on as
    the job does, and the command ends with the job."""
    slow_backup(monitor)
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    watcher = subprocess.Popen([str(QMPJOB), "-s", str(daemon.socket_path), "watch", "j"],
                               stdin=follower, stdout=follower, stderr=follower,
                               env={**os.environ, "TERM": "xterm-256color"})
    os.close(follower)
    drawn = b""
    running = re.compile(r"j +backup +running +\S* +(\d+)%")
    shown: list[int] = []  # the percentages the job's row showed, frame after frame
    # Once its row shows, 2 MiB/s; once the row has shown three values, no limit: it ends.
    stages = [(1, 2 << 20), (3, 0)]
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], WAIT)
            assert ready, f"no frame in {WAIT} s: {drawn[-500:]!r}"
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            drawn += chunk
            now = [int(p) for p in running.findall(ANSI.sub("", drawn.decode(errors="replace")))]
            shown = now
            if stages and len(set(shown)) >= stages[0][0]:
                ok(monitor, "block-job-set-speed", {"device": "j", "speed": stages.pop(0)[1]})
    finally:
        os.close(leader)
    assert watcher.wait(timeout=WAIT) == 0
    text = drawn.decode(errors="replace")
    assert "\x1b[" in text  # drawn for a terminal: moved over and redrawn in place
    assert shown == sorted(shown) and len(set(shown)) >= 3, shown
    last = ANSI.sub("", text).rstrip().splitlines()[-1]
    assert re.match(r"j +backup +success +\S+ +100%", last), last


def test_errors_are_one_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    one_line_error(qmpjob(daemon, "wait", "nothing"), 1, "no job or task 'nothing'")
    one_line_error(qmpjob(daemon, "frobnicate"), 2, "invalid choice")
    one_line_error(qmpjob(daemon, "wait"), 2, "required")
    missing = subprocess.run([str(QMPJOB), "-s", str(tmp_path / "none.sock"), "list"],
                             capture_output=True, text=True, timeout=WAIT)
    one_line_error(missing, 2, "cannot connect", "none.sock")


def test_one_shot_subcommands_load_neither_trio_nor_rich(daemon: DaemonProcess) -> None:
    probe = ("import sys; from qmpjobd.client.main import main; "
             f"code = main(['-s', {str(daemon.socket_path)!r}, 'list']); "
             "assert code == 0; print(sorted({'trio', 'rich', 'orjson'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=WAIT, check=True)
    assert done.stdout.splitlines()[-1] == "[]"


def test_lists_go_past_a_page_of_task_records(daemon: DaemonProcess,
                                              monitor: QmpConnection) -> None:
    for n in range(1001):  # the daemon answers a page of 1000 at a time
        ok(monitor, "task-create", {"name-label": f"t{n}"})
    assert len(qmpjob(daemon, "tasks", "--json").stdout.splitlines()) == 1001
    assert len(qmpjob(daemon, "list", "--json").stdout.splitlines()) == 1001


def test_a_concluded_job_shows_once_with_its_task(daemon: DaemonProcess,
                                                  monitor: QmpConnection) -> None:
    slow_backup(monitor, **{"auto-dismiss": False})
    ok(monitor, "block-job-set-speed", {"device": "j", "speed": 0})
    until_status(monitor, "j", "concluded")
    (line,) = qmpjob(daemon, "list", "--json").stdout.splitlines()
    found = json.loads(line)
    assert (found["kind"], found["status"]) == ("job", "concluded")
    assert found["uuid"] is not None and found["age"] is not None


def test_interrupted_wait_and_views(tmp_path: Path) -> None:
    with start_qmpjobd(tmp_path, "--log-level", "debug") as daemon, \
            daemon.connect() as monitor:
        uuid = ok(monitor, "task-create", {"name-label": "long"})["uuid"]
        log = tmp_path / "qmpjobd.log"
        waiter = start_qmpjob(daemon, "wait", uuid)
        wait_for_log(log, lambda text: "task-watch: ok" in text)
        waiter.send_signal(signal.SIGINT)
        assert waiter.communicate(timeout=WAIT) == ("", "")
        assert waiter.returncode == 130  # given up: not done
        tail = start_qmpjob(daemon, "events")
        assert tail.stdout is not None
        slow_backup(monitor)  # (the tail may miss the first events, not all of them)
        until_printed(monitor, tail)
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=WAIT)
        assert (tail.returncode, err) == (0, "")  # a view ended by its reader: done
        ok(monitor, "job-cancel", {"id": "j"})


def test_a_daemon_that_goes_away_is_a_one_line_error(tmp_path: Path) -> None:
    with start_qmpjobd(tmp_path, "--log-level", "debug") as daemon:
        with daemon.connect() as monitor:
            uuid = ok(monitor, "task-create", {"name-label": "long"})["uuid"]
        waiter = start_qmpjob(daemon, "wait", uuid)
        wait_for_log(tmp_path / "qmpjobd.log", lambda text: "task-watch: ok" in text)
        # Killed: no goodbye (a quit would first end the task, and the waiter with it).
        daemon.wait(signal.SIGKILL)
        out, err = waiter.communicate(timeout=WAIT)
        assert (waiter.returncode, out) == (2, "")
        # (End of file, or a reset if the kernel had unread bytes of the dead daemon's.)
        assert err.count("\n") == 1 and ("closed the connection" in err
                                          or "went away: Connection reset" in err), err


@pytest.mark.parametrize(("reply", "command", "said"), [
    (b'{"return": {"bad": 1}, "id": "%s"}', "list", "unexpected reply from the daemon ("),
    (b'{"return": ' + b"[" * 100_000 + b"]" * 100_000 + b', "id": "%s"}', "list",
     "nested too deep"),
    (b'{"return": ' + b"[" * 100_000 + b"]" * 100_000 + b', "id": "%s"}', "watch",
     "nested too deep"),
])
def test_a_reply_not_shaped_as_the_schema_says(tmp_path: Path, reply: bytes, command: str,
                                               said: str) -> None:
    """A fake daemon whose query-jobs returns an object, or arrays nested past any
    decoder's depth: one line, exit 2, no traceback, from a one-shot and from a view."""
    path = tmp_path / "fake.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        # (The client may go away before it has read all: a reset, not a failure.)
        with conn, conn.makefile("rwb") as f, contextlib.suppress(ConnectionError):
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            f.flush()
            while line := f.readline():
                request = json.loads(line)
                if request["execute"] == "query-jobs":
                    f.write(reply % request["id"].encode() + b"\r\n")
                else:
                    f.write(json.dumps({"return": {}, "id": request["id"]}).encode() + b"\r\n")
                f.flush()

    thread = threading.Thread(target=serve)
    thread.start()
    done = subprocess.run([str(QMPJOB), "-s", str(path), command], capture_output=True,
                          text=True, timeout=WAIT)
    thread.join(WAIT)
    server.close()
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.startswith("qmpjob: ") and said in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1


def test_against_qemu_storage_daemon_list_shows_its_jobs(tmp_path: Path) -> None:
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("needs qemu-storage-daemon")
    second = tmp_path / "second.sock"  # QSD serves one client per monitor socket
    with DaemonProcess.start(tmp_path, "--chardev", f"socket,id=m1,path={second},server=on,"
                             "wait=off", "--monitor", "chardev=m1") as qsd, \
            qsd.connect() as monitor:
        slow_backup(monitor)

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(QMPJOB), "-s", str(second), *args],
                                  capture_output=True, text=True, timeout=WAIT)

        (line,) = run("list", "--json").stdout.splitlines()
        found = json.loads(line)
        assert (found["id"], found["type"], found["status"]) == ("j", "backup", "running")
        assert found["uuid"] is None and found["speed-limit"] == 1 << 20
        one_line_error(run("wait", "j"), 1, "needs the daemon's task records")
        assert run("pause", "j").returncode == 0
        until_status(monitor, "j", "paused")
        ok(monitor, "job-cancel", {"id": "j"})


def test_times_and_byte_counts() -> None:
    rnd = random.Random(7)
    for _ in range(2000):
        moment = rnd.uniform(-5e9, 1.6e10)
        stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC)
        if stamp.year < 1000:
            continue
        text = stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert render.parse_time(text) == pytest.approx(moment, abs=1e-5), text
    for bad in (None, 5, "", "2026-12-07T03:12:42.5", "2026-12-07T03:12:nanZ",
                "2026-12-07T03:12:infZ", "yyyy-12-07T03:12:42.000000Z"):
        assert render.parse_time(bad) is None  # type: ignore[arg-type]
    assert [byte_count(text) for text in ("0", "512", "512k", "64M", "1G", "2t")] == [
        0, 512, 512 << 10, 64 << 20, 1 << 30, 2 << 40]
    for bad in ("", "-1", "1.5M", "fast", "M"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_count(bad)
