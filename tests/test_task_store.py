"""Task records that survive restarts and crashes (--state-dir), and a state directory that
cannot be used: a clear start-up error, and the files left as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qmpjobd.tasks.model import timestamp
from tests.daemons import QMPJOBD, DaemonProcess, daemon_env, start_qmpjobd
from tests.test_tasks import create, error, nodes, ok, task

MiB = 1 << 20


def test_records_and_the_feed_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as conn:
        kept = create(conn, "kept", other_config={"k": "v"})
        done = create(conn, "done")
        ok(conn, "task-set-result", uuid=done, result=[1, 2, 3])
        nodes(conn, "src", "dst", size=64 * MiB)
        ok(conn, "blockdev-backup", job_id="j", device="src", target="dst", sync="full",
           speed=1)
        before = ok(conn, "query-task-changes")["seq"]
        d.wait(signal.SIGKILL)
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as conn:
        assert task(conn, kept)["status"] == "pending"
        assert task(conn, kept)["other-config"] == {"k": "v"}
        assert task(conn, done)["result"] == [1, 2, 3]
        # The job did not survive (nor did its nodes): its task says so, in a new change.
        (job,) = ok(conn, "query-tasks", job_id="j")
        assert job["status"] == "failure" and "job-status" not in job
        assert job["error-info"] == ["Interrupted", "the daemon stopped while the job was running"]
        assert job["seq"] == before + 1
        feed = ok(conn, "query-task-changes", since=before)
        assert [c["uuid"] for c in feed["changes"]] == [job["uuid"]]
        # Sequence numbers go on from there.
        ok(conn, "task-set-progress", uuid=kept, progress=0.5)
        assert task(conn, kept)["seq"] == before + 2
        ok(conn, "quit")
    check_integrity(state)


def check_integrity(state: Path) -> None:
    db = sqlite3.connect(state / "tasks.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


class Storm:
    """Clients changing tasks as fast as they can, each remembering what was acknowledged."""

    def __init__(self, daemon: DaemonProcess, clients: int, seed: int) -> None:
        self.acked: dict[str, dict[str, Any]] = {}  # uuid -> what its last acked change set
        # uuid -> what was sent after that and not (yet) acknowledged
        self.sent: dict[str, list[dict[str, Any]]] = {}
        self.seqs: list[int] = []
        self.count = 0
        self._lock = threading.Lock()
        self._enough = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(daemon, seed + i),
                                         daemon=True) for i in range(clients)]

    def run_until(self, acknowledgements: int) -> None:
        self.target = acknowledgements
        for thread in self.threads:
            thread.start()
        assert self._enough.wait(60), "the storm got no acknowledgements"

    def _send(self, uuid: str, state: dict[str, Any]) -> None:
        with self._lock:
            self.sent.setdefault(uuid, []).append(state)

    def _ack(self, uuid: str, state: dict[str, Any]) -> None:
        with self._lock:
            self.acked[uuid] = state
            self.sent[uuid] = []
            self.count += 1
            if self.count >= self.target:
                self._enough.set()

    def _client(self, daemon: DaemonProcess, seed: int) -> None:
        rng = random.Random(seed)
        try:
            with daemon.connect() as conn:
                mine: list[str] = []
                while True:
                    if not mine or rng.random() < 0.3:
                        uuid = ok(conn, "task-create", name_label=f"s{seed}")["uuid"]
                        mine.append(uuid)
                        self._ack(uuid, {"status": "pending", "progress": 0})
                    uuid = rng.choice(mine)
                    if rng.random() < 0.8:
                        change = {"status": "pending", "progress": round(rng.random(), 6)}
                        self._send(uuid, change)
                        ok(conn, "task-set-progress", uuid=uuid, progress=change["progress"])
                    else:
                        change = {"status": "success", "result": seed}
                        self._send(uuid, change)
                        ok(conn, "task-set-result", uuid=uuid, result=seed)
                        mine.remove(uuid)
                    self._ack(uuid, change)
        except (ConnectionError, OSError, AssertionError, ValueError):
            return  # the daemon was killed under us


@pytest.mark.parametrize("seed", range(20))
def test_acknowledged_changes_survive_sigkill(tmp_path: Path, seed: int) -> None:
    """SIGKILL at a random moment of a storm of changes from several clients: after a restart
    every acknowledged change is there, sequence numbers go on, the file is sound."""
    state = tmp_path / "state"
    rng = random.Random(seed)
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d:
        with d.connect() as conn:
            nodes(conn, "src", "dst", size=64 * MiB)
            ok(conn, "blockdev-backup", job_id="j", device="src", target="dst", sync="full",
               speed=1)
        storm = Storm(d, clients=3, seed=seed * 10)
        storm.run_until(rng.randrange(1, 300))
        d.wait(signal.SIGKILL)
        for thread in storm.threads:
            thread.join()
        acked, sent = storm.acked, storm.sent
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as conn:
        records = {r["uuid"]: r for r in ok(conn, "query-tasks", limit=10000)}
        assert acked
        for uuid, state_acked in acked.items():
            record = records[uuid]
            found = {"status": record["status"]}
            found.update({"progress": record["progress"]} if record["status"] == "pending"
                         else {"result": record.get("result")})
            # The acknowledged state, or one sent after it whose commit beat the kill.
            if state_acked["status"] == "pending" and "progress" in state_acked:
                state_acked = {**state_acked, "progress": float(state_acked["progress"])}
            assert found in [state_acked, *sent.get(uuid, [])], (found, state_acked)
        (job,) = ok(conn, "query-tasks", job_id="j")
        assert job["status"] == "failure" and job["error-info"][0] == "Interrupted"
        last = ok(conn, "query-task-changes")["seq"]
        assert last >= max(r["seq"] for r in records.values())
        uuid = create(conn)
        assert task(conn, uuid)["seq"] == last + 1
        ok(conn, "quit")
    check_integrity(state)


def test_progress_acknowledged_is_never_older_on_restart(tmp_path: Path) -> None:
    """One client, strictly increasing progress: after SIGKILL the record holds the last
    acknowledged value or a later one, never an earlier."""
    state = tmp_path / "state"
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d:
        with d.connect() as conn:
            uuid = create(conn)
            last = 0.0
            for step in range(1, 200):
                ok(conn, "task-set-progress", uuid=uuid, progress=step / 1000)
                last = step / 1000
        d.wait(signal.SIGKILL)
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as conn:
        assert task(conn, uuid)["progress"] == last


# -- state directories that cannot be used ---------------------------------------------------


def start_error(tmp_path: Path, state: Path) -> str:
    result = subprocess.run(
        [*QMPJOBD, "--socket", str(tmp_path / "q.sock"), "--state-dir", str(state)],
        capture_output=True, text=True, env=daemon_env(), timeout=30,
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    line: str = result.stderr.strip().splitlines()[-1]
    return line


def digest(path: Path) -> tuple[str, list[str]]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), sorted(os.listdir(path.parent))


def test_a_second_daemon_on_the_same_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with start_qmpjobd(tmp_path, "--state-dir", str(state)):
        message = start_error(tmp_path, state)
        assert message == (f"qmpjobd: --state-dir {state}: {state}/tasks.lock is locked: another "
                           f"qmpjobd uses the state directory {state}")


def test_a_damaged_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    database = state / "tasks.sqlite3"
    database.write_bytes(b"this is not a database, but somebody's data" * 100)
    before = digest(database)
    message = start_error(tmp_path, state)
    assert message.startswith(f"qmpjobd: --state-dir {state}: {database}: not a task database, "
                              "or damaged")
    assert message.endswith("left as it is")
    assert digest(database) == (before[0], ["tasks.lock", "tasks.sqlite3"])


def test_a_newer_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as conn:
        create(conn)
        ok(conn, "quit")
    database = state / "tasks.sqlite3"
    db = sqlite3.connect(database)
    db.execute("PRAGMA user_version = 99")
    db.close()
    before = digest(database)
    assert start_error(tmp_path, state) == (
        f"qmpjobd: --state-dir {state}: {database}: written by a newer qmpjobd (layout 99, this "
        "one knows 2); left as it is")
    assert digest(database) == before


def test_another_programs_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    database = state / "tasks.sqlite3"
    db = sqlite3.connect(database)
    db.execute("CREATE TABLE theirs (x)")
    db.execute("INSERT INTO theirs VALUES (1)")
    db.commit()
    db.close()
    before = digest(database)
    assert start_error(tmp_path, state) == (
        f"qmpjobd: --state-dir {state}: {database}: not a qmpjobd task database; left as it is")
    assert digest(database)[0] == before[0]


def test_a_state_directory_that_is_a_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file")
    assert start_error(tmp_path, state) == (
        f"qmpjobd: --state-dir {state}: cannot create: File exists")
    assert state.read_text() == "a file"


def test_a_read_only_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    if subprocess.run(["chattr", "+i", str(state)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a file system that has it")
    try:
        assert start_error(tmp_path, state) == (
            f"qmpjobd: --state-dir {state}: {state}/tasks.lock: cannot open: Operation not "
            "permitted")
    finally:
        subprocess.run(["chattr", "-i", str(state)], check=True)
    assert os.listdir(state) == []


def test_without_a_state_directory_nothing_is_written(tmp_path: Path) -> None:
    with start_qmpjobd(tmp_path) as d, d.connect() as conn:
        create(conn)
        assert error(conn, "query-task", uuid="x") == "Task 'x' not found"
    assert sorted(os.listdir(tmp_path)) == ["qmpjobd.log"]


def test_a_job_outcome_is_committed_before_any_client_sees_it_conclude(tmp_path: Path) -> None:
    """The moment a client sees `concluded`, the task's outcome is on disk: SIGKILL right then
    and restart, and the task says success, not interrupted."""
    state = tmp_path / "state"
    for round_ in range(5):
        with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as conn:
            nodes(conn, "src", "dst")
            job = f"j{round_}"
            conn.send({"execute": "blockdev-backup", "arguments": {
                "job-id": job, "device": "src", "target": "dst", "sync": "full"}})
            while True:
                message = conn.receive()
                if message.get("event") == "JOB_STATUS_CHANGE" and message["data"] == {
                        "status": "concluded", "id": job}:
                    break
            d.wait(signal.SIGKILL)
        with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as conn:
            (record,) = ok(conn, "query-tasks", job_id=job)
            assert record["status"] == "success" and record["result"] == {"len": MiB,
                                                                          "offset": MiB}
            ok(conn, "quit")


def test_an_older_database_is_migrated_in_place(tmp_path: Path) -> None:
    """A database of layout 1 (the first: no filter indexes) gets layout 2, its records kept."""
    from qmpjobd.tasks import store

    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "tasks.sqlite3", isolation_level=None)
    store._create(db, version=1)
    now = time.time()  # (an older task would expire at once)
    record = {
        "uuid": "u1", "type": "old", "name-label": "kept", "name-description": "",
        "status": "success", "created": timestamp(now), "finished": timestamp(now + 1),
        "progress": 1.0, "error-info": [],
        "allowed-operations": ["destroy"], "subtasks": [], "other-config": {},
        "resident-on": "h", "history": [], "seq": 1,
    }
    db.execute("INSERT INTO tasks VALUES ('u1', 1, ?, ?, 'success', 'old', 'kept', NULL, NULL, "
               "0, ?)", (now, now + 1, json.dumps(record)))
    db.execute("INSERT INTO changes VALUES ('u1', 1, 'add')")
    db.execute("UPDATE meta SET value = 1 WHERE key IN ('last_seq', 'finished')")
    assert db.execute("PRAGMA user_version").fetchone() == (1,)
    db.close()
    with start_qmpjobd(tmp_path, "--state-dir", str(state)) as d, d.connect() as conn:
        assert [r["name-label"] for r in ok(conn, "query-tasks", type="old")] == ["kept"]
        assert create(conn) and task(conn, "u1")["status"] == "success"
        ok(conn, "quit")
    db = sqlite3.connect(state / "tasks.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (store.VERSION,) == (2,)
    indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"tasks_by_type", "tasks_by_label", "tasks_by_status", "tasks_by_job"} <= indexes
    db.close()
    check_integrity(state)
