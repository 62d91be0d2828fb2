"""qmpjob, the command-line client, against a live qmpjobd: what it shows of jobs and task
records, what its verbs do, how `wait` and `watch` end, its exit statuses (0 done, 1 refused or
failed, 2 usage or connection) and its one-line errors."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import DaemonProcess, QmpConnection, start_qmpjobd

QMPJOB = Path(sys.executable).parent / "qmpjob"  # the console script pyproject.toml declares
SIZE = 64 << 20
WAIT = 30.0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with start_qmpjobd(tmp_path) as process:
        yield process


@pytest.fixture
def monitor(daemon: DaemonProcess) -> Iterator[QmpConnection]:
    with daemon.connect() as conn:
        yield conn


def qmpjob(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(QMPJOB), "-s", str(daemon.socket_path), *args],
                          capture_output=True, text=True, timeout=WAIT)


def start_qmpjob(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(QMPJOB), "-s", str(daemon.socket_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ok(conn: QmpConnection, command: str, arguments: dict[str, Any] | None = None) -> Any:
    reply = conn.execute(command, arguments)
    assert "return" in reply, reply
    return reply["return"]


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
    with pytest.raises(subprocess.TimeoutExpired):
        waiter.wait(0.5)  # b still runs (a bound on a wait that must not end, not a sleep)
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
        for tail in tails:
            assert tail.stdout is not None
            seen = [tail.stdout.readline()]
            while '"status": "null"' not in seen[-1] and "status=null" not in seen[-1]:
                seen.append(tail.stdout.readline())
            lines.append(seen)
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
