"""Jobs and clients' tasks driven at random; every task record checked against a model, against
its job's QEMU status, and against a replica built from the change feed alone.

A hypothesis state machine on one live qmpjobd. Rules create, change, cancel and destroy
clients' tasks, and start jobs (backups at speed 1, which stay running; auto-finalize and
auto-dismiss off, so every status lasts) and send them verbs. After each step:
- each client task's record is what the model says;
- each job task's record says the job's status as query-jobs has it, the task status that
  status maps to, and QEMU's verbs for it as allowed operations;
- a second connection watches the feed (task-watch) from the start: applying its TASK_CHANGE
  events (add/mod/del, the record as of the change) gives exactly the records query-tasks
  returns (but for a client's progress, announced coalesced). Its sync point is its own
  query-task-changes, whose reply follows the events of every change committed before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from qmpjobd.jobs.status import VERBS, JobStatus
from tests.daemons import DaemonProcess, QmpConnection, start_qmpjobd

SIZE = 4 << 20
FINISHED = ("success", "failure", "cancelled")
_names = itertools.count()


@dataclass
class ClientTask:
    status: str = "pending"
    progress: float = 0.0
    result: Any = None
    error_info: list[str] = field(default_factory=list)


class TaskMachine(RuleBasedStateMachine):
    daemon: DaemonProcess

    def __init__(self) -> None:
        super().__init__()
        self.conn = QmpConnection(self.daemon.socket_path)
        self.call("qmp_capabilities")
        self.watcher = QmpConnection(self.daemon.socket_path)
        self.watcher.execute("qmp_capabilities")
        # Each task's records as the feed gave them, by sequence number (None: deleted).
        self.replica: dict[str, dict[int, dict[str, Any] | None]] = {}
        start = self.watcher.execute("task-watch")["return"]["seq"]
        # The records there were before this example started, as the feed would give them.
        for record in self.call("query-tasks", limit=10000):
            self.replica.setdefault(record["uuid"], {})[record["seq"]] = record
        self.start = start
        self.clients: dict[str, ClientTask] = {}
        self.jobs: list[str] = []  # job ids that may still exist

    def teardown(self) -> None:
        for job in self.jobs:
            self.conn.execute("job-cancel", {"id": job})
        self.conn.close()
        self.watcher.close()

    def call(self, command: str, **arguments: Any) -> Any:
        reply = self.conn.execute(command, {k.replace("_", "-"): v for k, v in arguments.items()})
        assert "return" in reply, (command, arguments, reply)
        return reply["return"]

    def refused(self, command: str, **arguments: Any) -> str:
        reply = self.conn.execute(command, {k.replace("_", "-"): v for k, v in arguments.items()})
        assert "error" in reply, (command, arguments, reply)
        desc: str = reply["error"]["desc"]
        return desc

    # -- clients' tasks --------------------------------------------------------------------

    @rule()
    def create(self) -> None:
        uuid = self.call("task-create", name_label=f"c{next(_names)}")["uuid"]
        self.clients[uuid] = ClientTask()

    def _pick(self, data: st.DataObject, finished: bool | None = None) -> str | None:
        choices = [u for u, t in self.clients.items()  # in creation order: replays alike
                   if finished is None or (t.status in FINISHED) == finished]
        return data.draw(st.sampled_from(choices)) if choices else None

    @rule(data=st.data(), progress=st.floats(0, 1))
    def progress(self, data: st.DataObject, progress: float) -> None:
        uuid = self._pick(data)
        if uuid is None:
            return
        model = self.clients[uuid]
        if model.status in FINISHED:
            assert "cannot accept operation 'set-progress'" in self.refused(
                "task-set-progress", uuid=uuid, progress=progress)
        else:
            self.call("task-set-progress", uuid=uuid, progress=progress)
            model.progress = progress

    @rule(data=st.data(), outcome=st.sampled_from(["result", "error", *FINISHED, "cancelling"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        uuid = self._pick(data)
        if uuid is None:
            return
        model = self.clients[uuid]
        if model.status in FINISHED:
            command = {"result": "task-set-result", "error": "task-set-error-info"}.get(
                outcome, "task-set-status")
            arguments = {"error_info": ["E"]} if outcome == "error" else (
                {} if outcome == "result" else {"status": outcome})
            assert "cannot accept operation" in self.refused(command, uuid=uuid, **arguments)
            return
        if outcome == "result":
            self.call("task-set-result", uuid=uuid, result=[uuid])
            model.status, model.result, model.error_info = "success", [uuid], []
        elif outcome == "error":
            self.call("task-set-error-info", uuid=uuid, error_info=["E", uuid])
            model.status, model.result, model.error_info = "failure", None, ["E", uuid]
        else:
            self.call("task-set-status", uuid=uuid, status=outcome)
            model.status = outcome
        if model.status in FINISHED:
            model.progress = 1.0

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        uuid = self._pick(data)
        if uuid is None:
            return
        model = self.clients[uuid]
        if model.status == "pending":
            self.call("task-cancel", uuid=uuid)
            model.status = "cancelling"
        else:
            assert "cannot accept operation 'cancel'" in self.refused("task-cancel", uuid=uuid)

    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        uuid = self._pick(data)
        if uuid is None:
            return
        if self.clients[uuid].status in FINISHED:
            self.call("task-destroy", uuid=uuid)
            del self.clients[uuid]
        else:
            assert "cannot accept operation 'destroy'" in self.refused("task-destroy", uuid=uuid)

    # -- jobs ------------------------------------------------------------------------------

    @precondition(lambda self: len(self.jobs) < 4)
    @rule()
    def start_job(self) -> None:
        n = next(_names)
        for node in (f"s{n}", f"t{n}"):
            self.call("blockdev-add", driver="null-co", node_name=node, size=SIZE)
        job = f"j{n}"
        self.call("blockdev-backup", job_id=job, device=f"s{n}", target=f"t{n}", sync="full",
                  speed=1, auto_finalize=False, auto_dismiss=False)
        self.jobs.append(job)

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data(), verb=st.sampled_from(
        ["job-pause", "job-resume", "job-cancel", "job-finalize", "job-dismiss", "task-cancel",
         "speed-up"]))
    def job_verb(self, data: st.DataObject, verb: str) -> None:
        job = data.draw(st.sampled_from(self.jobs))
        if verb == "task-cancel":
            (record,) = self.call("query-tasks", job_id=job, status=["pending", "cancelling",
                                                                      "success", "failure",
                                                                      "cancelled"], limit=1)
            reply = self.conn.execute("task-cancel", {"uuid": record["uuid"]})
        elif verb == "speed-up":
            reply = self.conn.execute("block-job-set-speed", {"device": job, "speed": 0})
        else:
            reply = self.conn.execute(verb, {"id": job})
        if verb == "job-dismiss" and "return" in reply:
            self.jobs.remove(job)

    # -- checks ----------------------------------------------------------------------------

    @invariant()
    def records_agree(self) -> None:
        jobs = {info["id"]: info for info in self.call("query-jobs")}
        records = {r["uuid"]: r for r in self.call("query-tasks", limit=10000)}
        for uuid, model in self.clients.items():
            record = records[uuid]
            assert (record["status"], record["progress"]) == (model.status, model.progress)
            assert record["error-info"] == model.error_info
            assert record.get("result") == model.result
        for record in records.values():
            job = record.get("job-id")
            if job not in self.jobs:
                continue
            status = jobs[job]["status"]
            assert record["job-status"] == status
            expected = [verb.value for verb, allowed in VERBS.items()
                        if JobStatus(status) in allowed]
            assert record["allowed-operations"] == expected
            if status == "concluded":
                assert record["status"] in FINISHED
                assert (record["status"] == "success") == ("error" not in jobs[job])
            elif record["status"] != "cancelling":
                assert record["status"] == "pending"
        # The feed, replayed up to a point after that query, has given every record it
        # returned (changes may have come since: jobs change by themselves).
        self.watcher.send({"execute": "query-task-changes", "arguments": {"since": self.start,
                                                                           "limit": 1}})
        while "event" in (message := self.watcher.receive()):
            if message["event"] != "TASK_CHANGE":
                continue
            data = message["data"]
            self.replica.setdefault(data["uuid"], {})[data["seq"]] = data.get("task")
        assert "return" in message, message
        for uuid, record in records.items():
            replayed = self.replica[uuid].get(record["seq"])
            if uuid in self.clients and replayed is not None:
                # A client's progress is stored at once but announced coalesced (at most one
                # change per task per 100 ms): the record may be ahead of its last change.
                replayed = {**replayed, "progress": record["progress"]}
            assert replayed == record, uuid
        living = {uuid for uuid, versions in self.replica.items()
                  if versions[max(versions)] is not None}
        assert living == set(records)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with start_qmpjobd(tmp_path_factory.mktemp("tasks-sm")) as d:
        yield d


def test_tasks_follow_jobs_and_clients_and_the_feed_replays_them(daemon: DaemonProcess) -> None:
    TaskMachine.daemon = daemon
    run_state_machine_as_test(
        TaskMachine,
        settings=settings(max_examples=25, stateful_step_count=30, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )

