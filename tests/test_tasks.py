"""Task records over real sockets: clients' own tasks, job tasks, queries, the change feed.

Each test starts its own qmpjobd (task records in memory unless the test gives --state-dir)
and talks QMP to it. Waits are on events (JOB_STATUS_CHANGE, TASK_CHANGE), never on time.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import DaemonProcess, QmpConnection, start_qmpjobd

MiB = 1 << 20
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")




def ok(conn: QmpConnection, command: str, **arguments: Any) -> Any:
    reply = conn.execute(command, {k.replace("_", "-"): v for k, v in arguments.items()})
    assert "return" in reply, reply
    return reply["return"]


def error(conn: QmpConnection, command: str, **arguments: Any) -> str:
    reply = conn.execute(command, {k.replace("_", "-"): v for k, v in arguments.items()})
    assert reply.get("error", {}).get("class") == "GenericError", reply
    desc: str = reply["error"]["desc"]
    return desc


def create(conn: QmpConnection, label: str = "work", **extra: Any) -> str:
    uuid: str = ok(conn, "task-create", name_label=label, **extra)["uuid"]
    return uuid


def task(conn: QmpConnection, uuid: str) -> dict[str, Any]:
    record: dict[str, Any] = ok(conn, "query-task", uuid=uuid)
    return record


def wait_job(conn: QmpConnection, job: str, status: str) -> None:
    """Until JOB_STATUS_CHANGE says JOB reached STATUS (events kept aside by execute count)."""
    while not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"status": status, "id": job}
                  for e in conn.events):
        conn.events.append(conn.receive())


def next_change(conn: QmpConnection) -> dict[str, Any]:
    """The next TASK_CHANGE's data (other events are kept aside)."""
    while True:
        message = conn.receive()
        assert "event" in message, message
        if message["event"] == "TASK_CHANGE":
            data: dict[str, Any] = message["data"]
            return data
        conn.events.append(message)


def nodes(conn: QmpConnection, *names: str, size: int = MiB) -> None:
    for name in names:
        ok(conn, "blockdev-add", driver="null-co", node_name=name, size=size)


# -- clients' own tasks ------------------------------------------------------------------------


def test_a_client_task_from_create_to_success(conn: QmpConnection) -> None:
    uuid = create(conn, "copy", name_description="copy the images", type="copy",
                  other_config={"site": "a"})
    record = task(conn, uuid)
    assert record["uuid"] == uuid and "job-id" not in record
    assert (record["type"], record["name-label"], record["name-description"]) == (
        "copy", "copy", "copy the images")
    assert record["status"] == "pending" and record["progress"] == 0
    assert record["error-info"] == [] and record["allowed-operations"] == ["cancel"]
    assert record["subtasks"] == [] and record["other-config"] == {"site": "a"}
    assert record["owner"] == {"uid": os.getuid(), "pid": os.getpid()}
    assert record["resident-on"] == os.uname().nodename
    assert TIME.match(record["created"]) and "finished" not in record
    assert [h["status"] for h in record["history"]] == ["pending"]
    ok(conn, "task-set-progress", uuid=uuid, progress=0.25)
    assert task(conn, uuid)["progress"] == 0.25
    ok(conn, "task-set-result", uuid=uuid, result={"copied": [1, 2]}, result_type="copy-report")
    done = task(conn, uuid)
    assert done["status"] == "success" and done["progress"] == 1
    assert done["result"] == {"copied": [1, 2]} and done["result-type"] == "copy-report"
    assert TIME.match(done["finished"]) and done["allowed-operations"] == ["destroy"]
    assert [h["status"] for h in done["history"]] == ["pending", "success"]
    assert done["seq"] > record["seq"]


def test_failure_and_status(conn: QmpConnection) -> None:
    failing = create(conn)
    ok(conn, "task-set-error-info", uuid=failing, error_info=["DiskFull", "no space", "sdb"],
       error_code=28)
    record = task(conn, failing)
    assert record["status"] == "failure" and record["error-code"] == 28
    assert record["error-info"] == ["DiskFull", "no space", "sdb"] and "result" not in record
    other = create(conn)
    ok(conn, "task-set-status", uuid=other, status="cancelling")
    ok(conn, "task-set-status", uuid=other, status="pending")  # from cancelling: any status
    ok(conn, "task-set-status", uuid=other, status="cancelled")
    assert task(conn, other)["status"] == "cancelled"
    # A finished task's status changes no more.
    assert error(conn, "task-set-status", uuid=other, status="pending") == (
        f"Task '{other}' in status 'cancelled' cannot accept operation 'set-status'")
    assert error(conn, "task-set-progress", uuid=other, progress=0.5) == (
        f"Task '{other}' in status 'cancelled' cannot accept operation 'set-progress'")


def test_cancel_and_destroy_a_client_task(conn: QmpConnection) -> None:
    uuid = create(conn)
    assert error(conn, "task-destroy", uuid=uuid) == (
        f"Task '{uuid}' in status 'pending' cannot accept operation 'destroy'")
    ok(conn, "task-cancel", uuid=uuid)
    assert task(conn, uuid)["status"] == "cancelling"
    assert error(conn, "task-cancel", uuid=uuid) == (
        f"Task '{uuid}' in status 'cancelling' cannot accept operation 'cancel'")
    ok(conn, "task-set-status", uuid=uuid, status="cancelled")
    ok(conn, "task-destroy", uuid=uuid)
    assert error(conn, "query-task", uuid=uuid) == f"Task '{uuid}' not found"


def test_names_and_other_config_of_finished_tasks_can_change(conn: QmpConnection) -> None:
    uuid = create(conn, other_config={"a": "1", "b": "2"})
    ok(conn, "task-set-result", uuid=uuid)
    ok(conn, "task-set-name-label", uuid=uuid, name_label="renamed")
    ok(conn, "task-set-name-description", uuid=uuid, name_description="described")
    ok(conn, "task-add-to-other-config", uuid=uuid, key="c", value="3")
    ok(conn, "task-remove-from-other-config", uuid=uuid, key="a")
    ok(conn, "task-remove-from-other-config", uuid=uuid, key="nope")
    record = task(conn, uuid)
    assert (record["name-label"], record["name-description"]) == ("renamed", "described")
    assert record["other-config"] == {"b": "2", "c": "3"} and record["status"] == "success"
    ok(conn, "task-set-other-config", uuid=uuid, other_config={"x": "y"})
    assert task(conn, uuid)["other-config"] == {"x": "y"}


@pytest.mark.parametrize(
    ("command", "arguments", "message"),
    [
        ("query-task", {"uuid": "nope"}, "Task 'nope' not found"),
        ("task-set-progress", {"uuid": "nope", "progress": 0.5}, "Task 'nope' not found"),
        ("task-destroy", {"uuid": "nope"}, "Task 'nope' not found"),
        ("task-cancel", {"uuid": "nope"}, "Task 'nope' not found"),
        ("task-set-name-label", {"uuid": "nope", "name-label": "x"}, "Task 'nope' not found"),
        ("task-set-progress", {"uuid": "U", "progress": 1.5},
         "Parameter 'progress' expects a number from 0 to 1"),
        ("task-set-progress", {"uuid": "U", "progress": -0.1},
         "Parameter 'progress' expects a number from 0 to 1"),
        ("task-set-result", {"uuid": "U", "result": "x" * (64 << 10)},
         "A task's result may have at most 65536 bytes (as JSON)"),
        ("task-create", {"name-label": "x", "other-config": {str(i): "v" for i in range(65)}},
         "other-config may have at most 64 keys"),
        ("task-create", {"name-label": "x", "other-config": {"k" * 257: "v"}},
         "other-config keys and values may have at most 256 bytes each"),
        ("task-add-to-other-config", {"uuid": "U", "key": "k", "value": "v" * 257},
         "other-config keys and values may have at most 256 bytes each"),
        ("task-create", {"name-label": "x", "other-config": {"k": 1}},
         "Parameter 'other-config' expects an object of strings"),
        ("task-create", {"name-label": "x", "other-config": ["k"]},
         "Parameter 'other-config' expects an object of strings"),
        ("task-create", {"name-label": "x", "subtask-of": "nope"}, "Task 'nope' not found"),
        ("task-set-status", {"uuid": "U", "status": "done"},
         "Parameter 'status' does not accept value 'done'"),
        ("query-tasks", {"limit": 0}, "Parameter 'limit' expects a value from 1 to 10000"),
        ("query-tasks", {"limit": 10001}, "Parameter 'limit' expects a value from 1 to 10000"),
        ("query-tasks", {"after": "nope"}, "Task 'nope' not found"),
        ("query-tasks", {"created-after": "yesterday"},
         "Parameter 'created-after' expects an ISO 8601 time"),
        ("query-task-changes", {"since": -1},
         "Parameter 'since' expects a non-negative sequence number"),
        ("query-task-changes", {"since": 10**6}, "Parameter 'since' (1000000) is beyond the "
         "last change (SEQ)"),
        ("task-watch", {"since": 10**6}, "Parameter 'since' (1000000) is beyond the "
         "last change (SEQ)"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(
    conn: QmpConnection, command: str, arguments: dict[str, Any], message: str
) -> None:
    uuid = create(conn)
    before = ok(conn, "query-task-changes")
    arguments = {k: uuid if v == "U" else v for k, v in arguments.items()}
    assert error(conn, command, **arguments) == message.replace("SEQ", str(before["seq"]))
    assert ok(conn, "query-task-changes") == before


def test_pending_tasks_are_bounded(tmp_path: Path) -> None:
    with start_qmpjobd(tmp_path, "--max-pending-tasks", "2") as d, d.connect() as conn:
        first = create(conn)
        create(conn)
        assert error(conn, "task-create", name_label="third") == (
            "Too many pending tasks: the daemon holds at most 2; finish some first")
        ok(conn, "task-set-result", uuid=first)
        create(conn)


# -- subtasks ------------------------------------------------------------------------------------


def test_subtasks_and_destroying_them_with_their_parent(conn: QmpConnection) -> None:
    parent = create(conn, "parent")
    children = [create(conn, f"child{i}", subtask_of=parent) for i in range(2)]
    assert task(conn, parent)["subtasks"] == children
    assert task(conn, children[0])["subtask-of"] == parent
    ok(conn, "task-set-result", uuid=parent)
    assert error(conn, "task-destroy", uuid=parent) == (
        f"Task '{parent}' cannot be destroyed: its subtask '{children[0]}' is pending")
    for child in children:
        ok(conn, "task-set-result", uuid=child)
    ok(conn, "task-destroy", uuid=children[1])
    assert task(conn, parent)["subtasks"] == [children[0]]
    ok(conn, "task-destroy", uuid=parent)
    for gone in (parent, *children):
        assert error(conn, "query-task", uuid=gone) == f"Task '{gone}' not found"


# -- job tasks -----------------------------------------------------------------------------------


def test_a_job_task_follows_the_job_and_outlives_it(conn: QmpConnection) -> None:
    nodes(conn, "src", "dst")
    ok(conn, "blockdev-backup", job_id="j", device="src", target="dst", sync="full",
       auto_dismiss=False)
    wait_job(conn, "j", "concluded")
    (record,) = ok(conn, "query-tasks", job_id="j")
    assert record["type"] == "backup" and record["name-label"] == "j"
    assert record["status"] == "success" and record["job-status"] == "concluded"
    assert record["result"] == {"len": MiB, "offset": MiB} and record["result-type"] == "backup"
    assert record["allowed-operations"] == ["dismiss"]  # QEMU's verb table, in concluded
    assert TIME.match(record["started"]) and TIME.match(record["finished"])
    assert [(h["status"], h.get("job-status")) for h in record["history"]] == [
        ("pending", "created"), ("pending", "running"), ("pending", "waiting"),
        ("pending", "pending"), ("success", "concluded"),
    ]
    assert error(conn, "task-destroy", uuid=record["uuid"]) == (
        f"Task '{record['uuid']}' cannot be destroyed: its job 'j' still exists (status "
        "'concluded')")
    for command, arguments in [("task-set-progress", {"progress": 0.5}),
                               ("task-set-result", {}), ("task-set-status", {"status": "pending"})]:
        assert "belongs to job 'j'" in error(conn, command, uuid=record["uuid"], **arguments)
    ok(conn, "job-dismiss", id="j")
    assert ok(conn, "query-jobs") == []  # exactly as QEMU: the job is gone
    gone = task(conn, record["uuid"])
    assert "job-status" not in gone and gone["allowed-operations"] == ["destroy"]
    ok(conn, "task-set-name-label", uuid=record["uuid"], name_label="nightly")
    ok(conn, "task-destroy", uuid=record["uuid"])
    # The job id may be used again; the new job gets a new task.
    ok(conn, "blockdev-backup", job_id="j", device="src", target="dst", sync="full")
    wait_job(conn, "j", "null")
    (again,) = ok(conn, "query-tasks", job_id="j")
    assert again["uuid"] != record["uuid"] and again["status"] == "success"


def test_cancelling_a_job_through_its_task(conn: QmpConnection) -> None:
    nodes(conn, "src", "dst", size=64 * MiB)
    ok(conn, "blockdev-backup", job_id="slow", device="src", target="dst", sync="full",
       speed=1)
    (record,) = ok(conn, "query-tasks", job_id="slow")
    assert record["status"] == "pending" and record["job-status"] == "running"
    assert record["allowed-operations"] == ["cancel", "pause", "resume", "set-speed"]
    ok(conn, "task-cancel", uuid=record["uuid"])
    wait_job(conn, "slow", "null")
    done = task(conn, record["uuid"])
    assert done["status"] == "cancelled" and "result" not in done
    statuses = [h["status"] for h in done["history"]]
    assert statuses[-2:] == ["cancelling", "cancelled"]


def test_a_failed_job(tmp_path: Path, conn: QmpConnection) -> None:
    """A job that fails: failure, with QEMU's error string."""
    source = tmp_path / "src.img"
    source.write_bytes(bytes(MiB))
    ok(conn, "blockdev-add", driver="file", node_name="f", filename=str(source))
    ok(conn, "blockdev-add", driver="null-co", node_name="n", size=2 * MiB)
    ok(conn, "blockdev-mirror", job_id="m", device="f", target="n", sync="full")
    wait_job(conn, "m", "null")
    (record,) = ok(conn, "query-tasks", job_id="m")
    assert record["status"] == "failure"
    assert record["error-info"] == ["JobFailed", "Source and target image have different sizes"]


def test_a_transaction_has_a_task_whose_subtasks_are_its_jobs(conn: QmpConnection) -> None:
    nodes(conn, "a1", "a2", "b1", "b2")
    actions = [{"type": "blockdev-backup", "data": {"job-id": job, "device": f"{n}1",
                                                    "target": f"{n}2", "sync": "full"}}
               for job, n in (("ja", "a"), ("jb", "b"))]
    ok(conn, "transaction", actions=actions, properties={"completion-mode": "grouped"})
    wait_job(conn, "ja", "null")
    wait_job(conn, "jb", "null")
    (parent,) = ok(conn, "query-tasks", type="transaction")
    children = ok(conn, "query-tasks", subtask_of=parent["uuid"])
    jobs = {record["job-id"]: record for record in children}
    assert sorted(jobs) == ["ja", "jb"]
    assert sorted(parent["subtasks"]) == sorted(record["uuid"] for record in jobs.values())
    assert all(record["status"] == "success" for record in jobs.values())
    parent = task(conn, parent["uuid"])
    assert parent["status"] == "success"


# -- queries -------------------------------------------------------------------------------------


def test_query_tasks_filters_and_pages(conn: QmpConnection) -> None:
    made = [create(conn, f"t{i}", type="even" if i % 2 == 0 else "odd",
                   other_config={"n": str(i), "site": "a" if i < 3 else "b"}) for i in range(6)]
    ok(conn, "task-set-result", uuid=made[0])
    newest_first = list(reversed(made))
    assert [r["uuid"] for r in ok(conn, "query-tasks")] == newest_first
    assert [r["uuid"] for r in ok(conn, "query-tasks", type="even")] == newest_first[1::2]
    assert [r["uuid"] for r in ok(conn, "query-tasks", name_label="t4")] == [made[4]]
    assert [r["uuid"] for r in ok(conn, "query-tasks", status=["success"])] == [made[0]]
    assert [r["uuid"] for r in ok(conn, "query-tasks", other_config={"site": "a", "n": "1"})] == [
        made[1]]
    first = ok(conn, "query-tasks", limit=4)
    rest = ok(conn, "query-tasks", limit=4, after=first[-1]["uuid"])
    assert [r["uuid"] for r in first + rest] == newest_first
    middle = task(conn, made[2])["created"]
    assert [r["uuid"] for r in ok(conn, "query-tasks", created_after=middle)] == newest_first[:3]
    assert [r["uuid"] for r in ok(conn, "query-tasks", created_before=middle)] == made[1::-1]


# -- the change feed -----------------------------------------------------------------------------


def test_query_task_changes_gives_each_task_its_latest_change(conn: QmpConnection) -> None:
    start = ok(conn, "query-task-changes")["seq"]
    a = create(conn, "a")
    b = create(conn, "b")
    ok(conn, "task-set-progress", uuid=a, progress=0.5)
    ok(conn, "task-set-result", uuid=b)
    ok(conn, "task-destroy", uuid=b)
    feed = ok(conn, "query-task-changes", since=start)
    assert [(c["change"], c["uuid"]) for c in feed["changes"]] == [("mod", a), ("del", b)]
    assert feed["changes"][0]["task"]["progress"] == 0.5 and "task" not in feed["changes"][1]
    assert feed["seq"] == feed["changes"][-1]["seq"] == start + 5
    page = ok(conn, "query-task-changes", since=start, limit=1)
    assert page["seq"] == page["changes"][0]["seq"] and len(page["changes"]) == 1
    assert ok(conn, "query-task-changes", since=feed["seq"]) == {"seq": feed["seq"], "changes": []}


def test_only_watchers_get_task_changes(daemon: DaemonProcess) -> None:
    with daemon.connect() as watcher, daemon.connect() as other:
        start = ok(watcher, "task-watch")["seq"]
        uuid = create(other, "w")
        change = next_change(watcher)
        assert (change["seq"], change["change"], change["uuid"]) == (start + 1, "add", uuid)
        assert change["task"]["name-label"] == "w"
        ok(other, "task-set-progress", uuid=uuid, progress=0.5)
        assert next_change(watcher)["task"]["progress"] == 0.5
        ok(watcher, "task-unwatch")
        ok(other, "task-set-result", uuid=uuid)
        # The other client, which never watched, got no TASK_CHANGE; neither does the
        # watcher after task-unwatch: its next message is the reply to what it sends next.
        assert ok(watcher, "query-jobs") == [] and watcher.events == []
        assert other.events == []


def test_a_watch_resumes_without_gap_or_duplicate(daemon: DaemonProcess) -> None:
    with daemon.connect() as writer:
        seen = ok(writer, "query-task-changes")["seq"]
        a = create(writer, "a")
        b = create(writer, "b")
        ok(writer, "task-set-result", uuid=a)
        with daemon.connect() as watcher:
            start = ok(watcher, "task-watch", since=seen)["seq"]
            assert start == seen + 3
            # First the missed changes, each task's latest, as query-task-changes gives them.
            backlog = [next_change(watcher) for _ in range(2)]
            assert [(c["uuid"], c["change"]) for c in backlog] == [(b, "add"), (a, "mod")]
            assert backlog[1]["task"]["status"] == "success"
            # Then live ones.
            ok(writer, "task-set-progress", uuid=b, progress=0.75)
            live = next_change(watcher)
            assert (live["seq"], live["uuid"]) == (start + 1, b)


# -- retention -----------------------------------------------------------------------------------


def test_finished_tasks_expire_after_the_retention(tmp_path: Path) -> None:
    with start_qmpjobd(tmp_path, "--task-retention", "0.2") as d, d.connect() as conn:
        ok(conn, "task-watch")
        pending = create(conn, "stays")
        done = create(conn, "goes")
        ok(conn, "task-set-result", uuid=done)
        while (change := next_change(conn))["change"] != "del":
            pass
        assert change["uuid"] == done and "task" not in change
        assert error(conn, "query-task", uuid=done) == f"Task '{done}' not found"
        assert task(conn, pending)["status"] == "pending"  # pending tasks never expire


def test_the_oldest_finished_tasks_expire_beyond_max_tasks(tmp_path: Path) -> None:
    with start_qmpjobd(tmp_path, "--max-tasks", "2") as d, d.connect() as conn:
        ok(conn, "task-watch")
        made = [create(conn, f"t{i}") for i in range(3)]
        for uuid in made:
            ok(conn, "task-set-result", uuid=uuid)
        while (change := next_change(conn))["change"] != "del":
            pass
        assert change["uuid"] == made[0]
        assert [r["uuid"] for r in ok(conn, "query-tasks")] == made[:0:-1]


def test_changes_older_than_those_kept_are_refused(tmp_path: Path) -> None:
    with start_qmpjobd(tmp_path, "--task-changes-kept", "5") as d, d.connect() as conn:
        uuids = [create(conn, f"t{i}") for i in range(10)]
        last = task(conn, uuids[-1])["seq"]
        assert last == 10
        expected = ("The changes after 0 are no longer kept (the oldest kept follows 5): list "
                    "the tasks again (query-tasks)")
        assert error(conn, "query-task-changes", since=0) == expected
        assert error(conn, "task-watch", since=0) == expected
        assert ok(conn, "query-task-changes", since=5)["seq"] == last


def test_job_progress_is_coalesced_and_the_last_value_sent(conn: QmpConnection) -> None:
    """A backup whose progress changes every 10 ms: at most one progress change per 100 ms
    reaches the feed, and the final record says 1."""
    nodes(conn, "src", "dst", size=64 * MiB)
    ok(conn, "task-watch")
    ok(conn, "blockdev-backup", job_id="j", device="src", target="dst", sync="full",
       speed=100 * MiB)
    progress = []
    while True:
        change = next_change(conn)
        record = change["task"]
        if record.get("job-id") != "j":
            continue
        progress.append(record["progress"])
        if record["status"] != "pending":
            break
    assert record["status"] == "success" and progress[-1] == 1
    moves = [p for p, q in itertools.pairwise(progress) if q != p]
    # 64 chunks in about 0.64 s: without coalescing there would be 64 changes.
    assert 1 <= len(moves) <= 20, progress


def test_a_watcher_resumes_across_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d:
        with d.connect() as watcher:
            seen = ok(watcher, "task-watch")["seq"]
            with d.connect() as writer:
                a = create(writer, "a")
                assert next_change(watcher)["uuid"] == a
                seen += 1
        with d.connect() as writer:  # while nobody watches
            b = create(writer, "b")
            ok(writer, "task-set-progress", uuid=a, progress=0.5)
            ok(writer, "quit")
        d.wait()
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as writer:
        ok(writer, "task-set-result", uuid=b)
        with d.connect() as watcher:
            start = ok(watcher, "task-watch", since=seen)["seq"]
            missed = [next_change(watcher) for _ in range(2)]
            assert [(c["uuid"], c["change"]) for c in missed] == [(a, "mod"), (b, "mod")]
            assert missed[0]["task"]["progress"] == 0.5
            assert missed[1]["task"]["status"] == "success"
            assert missed[1]["seq"] == start
            c = create(writer, "c")
            live = next_change(watcher)
            assert (live["uuid"], live["seq"], live["change"]) == (c, start + 1, "add")


def test_a_clients_progress_is_stored_at_once_announced_coalesced_last_value_sent(
    daemon: DaemonProcess,
) -> None:
    with daemon.connect() as watcher, daemon.connect() as writer:
        ok(watcher, "task-watch")
        uuid = create(writer)
        assert next_change(watcher)["change"] == "add"
        for step in range(1, 51):
            ok(writer, "task-set-progress", uuid=uuid, progress=step / 50)
        assert task(writer, uuid)["progress"] == 1.0  # the stored record is current
        announced = []
        while not announced or announced[-1] != 1.0:
            announced.append(next_change(watcher)["task"]["progress"])
        # Far fewer changes than updates (at most one per task per 100 ms), the last value
        # among them.
        assert len(announced) < 10, announced


def test_task_cancel_of_a_jobs_task_is_job_cancel_with_its_errors(conn: QmpConnection) -> None:
    nodes(conn, "src", "dst")
    ok(conn, "blockdev-backup", job_id="j", device="src", target="dst", sync="full",
       auto_dismiss=False)
    wait_job(conn, "j", "concluded")
    (record,) = ok(conn, "query-tasks", job_id="j")
    # What job-cancel says of a concluded job, word for word.
    assert error(conn, "task-cancel", uuid=record["uuid"]) == error(conn, "job-cancel", id="j")
    ok(conn, "job-dismiss", id="j")
    assert error(conn, "task-cancel", uuid=record["uuid"]) == (
        f"Task '{record['uuid']}' in status 'success' cannot accept operation 'cancel'")
