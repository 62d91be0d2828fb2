"""Random verb sequences against qmpjobd's jobs, checked against a model written here.

A hypothesis state machine holds two jobs on a live qmpjobd (over its socket): a backup at speed
1 (its first 1 MiB chunk is copied at once, the next would be due in 29 hours, so it never
finishes by itself) and a mirror without a speed (ready at once; a ready mirror waits for the
client).  Both have auto-finalize and auto-dismiss off, so that `pending` and `concluded` last.
Each step sends one verb to one job; the expected reply and the status it leads to come from
the model below, written from docs/job-model.md (sections 2-5, QSD's observed tables), not from
qmpjobd's own tables.  After each step the test waits for the job's events to reach the
expected status (QSD sends some of them after the reply), then checks query-jobs.

test_job_differential.py checks the same table against QSD itself, one verb at a time.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.daemons import DaemonProcess, QmpConnection, start_qmpjobd

SIZE = 4 * 1024 * 1024
WAIT = 10.0

# -- the model ---------------------------------------------------------------------------------

GONE = "gone"  # dismissed: the id is unknown again


def verb_error(job: str, status: str, verb: str) -> dict[str, Any]:
    return generic(f"Job '{job}' in state '{status}' cannot accept command verb '{verb}'")


def generic(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


OK: dict[str, Any] = {"return": {}}


@dataclass
class ModelJob:
    """What the client knows of a job: its status, its speed, a completion asked for while
    it was on standby."""

    id: str
    kind: str  # backup | mirror
    status: str
    speed: int
    complete_on_resume: bool = False

    def apply(self, verb: str, argument: int | None) -> dict[str, Any]:
        """The reply to VERB (and ARGUMENT: set-speed's speed); moves the model along."""
        status = self.status
        assert status != GONE
        if verb == "pause":
            if status in ("running", "ready"):
                self.status = "paused" if status == "running" else "standby"
                return OK
            if status in ("paused", "standby"):
                return generic("Job is already paused")
            return verb_error(self.id, status, "pause")
        if verb == "resume":
            # The client's pause flag is checked before the status, in every status.
            if status not in ("paused", "standby"):
                return generic("Can't resume a job that was not paused")
            self.status = self._resumed()
            return OK
        if verb in ("cancel", "soft-cancel"):
            if status == "concluded":
                return verb_error(self.id, status, "cancel")
            if verb == "soft-cancel" and status in ("paused", "standby"):
                return generic(f"The block job for device '{self.id}' is currently paused")
            if verb == "soft-cancel" and status == "ready":
                self.status = "pending"  # a ready mirror completes (without pivot) instead
            else:
                self.status = "concluded"
            return OK
        if verb == "complete":
            if status == "ready":
                self.status = "pending"
                return OK
            if status == "standby":
                self.complete_on_resume = True  # accepted; the completion happens on resume
                return OK
            return verb_error(self.id, status, "complete")
        if verb == "finalize":
            if status != "pending":
                return verb_error(self.id, status, "finalize")
            self.status = "concluded"
            return OK
        if verb == "dismiss":
            if status != "concluded":
                return verb_error(self.id, status, "dismiss")
            self.status = GONE
            return OK
        assert verb == "set-speed" and argument is not None
        if status not in ("running", "paused", "ready", "standby"):
            return verb_error(self.id, status, "set-speed")
        if argument < 0:
            return generic("Parameter 'speed' expects a non-negative value")
        self.speed = argument
        if status == "running" and self.kind == "backup" and argument == 0:
            self.status = "pending"  # unlimited: the rest is copied at once
        return OK

    def _resumed(self) -> str:
        if self.status == "standby":
            return "pending" if self.complete_on_resume else "ready"
        return "pending" if self.kind == "backup" and self.speed == 0 else "running"



# -- the wire ----------------------------------------------------------------------------------

# verb -> api -> (command, arguments for job J)
COMMANDS = {
    "pause": {"job": ("job-pause", "id"), "block-job": ("block-job-pause", "device")},
    "resume": {"job": ("job-resume", "id"), "block-job": ("block-job-resume", "device")},
    "cancel": {"job": ("job-cancel", "id"), "block-job": ("block-job-cancel", "device")},
    "soft-cancel": {"block-job": ("block-job-cancel", "device")},
    "complete": {"job": ("job-complete", "id"), "block-job": ("block-job-complete", "device")},
    "finalize": {"job": ("job-finalize", "id"), "block-job": ("block-job-finalize", "id")},
    "dismiss": {"job": ("job-dismiss", "id"), "block-job": ("block-job-dismiss", "id")},
    "set-speed": {"block-job": ("block-job-set-speed", "device")},
}


def request(verb: str, api: str, job: str, argument: int | None) -> tuple[str, dict[str, Any]]:
    command, key = COMMANDS[verb][api]
    arguments: dict[str, Any] = {key: job}
    if verb == "cancel" and api == "block-job":
        arguments["force"] = True
    if verb == "set-speed":
        arguments["speed"] = argument
    return command, arguments


def expected_reply(model: ModelJob, verb: str, api: str, argument: int | None) -> dict[str, Any]:
    if model.status == GONE:
        if api == "job":
            return generic("Job not found")
        return {"error": {"class": "DeviceNotActive", "desc": f"Block job '{model.id}' not found"}}
    return model.apply(verb, argument)


class Client:
    """A QMP connection that keeps each job's latest status from its events."""

    def __init__(self, path: Path) -> None:
        self.conn = QmpConnection(path, timeout=WAIT)
        self.status: dict[str, str] = {}
        assert self.execute("qmp_capabilities") == OK

    def _take(self, message: dict[str, Any]) -> bool:
        if "event" not in message:
            return False
        if message["event"] == "JOB_STATUS_CHANGE":
            self.status[message["data"]["id"]] = message["data"]["status"]
        return True

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.conn.send(message)
        deadline = time.monotonic() + WAIT
        while self._take(reply := self.conn.receive(deadline - time.monotonic())):
            pass
        return reply

    def wait(self, job: str, status: str) -> None:
        deadline = time.monotonic() + WAIT
        while self.status.get(job) != status:
            try:
                message = self.conn.receive(deadline - time.monotonic())
            except TimeoutError:
                raise AssertionError(
                    f"job {job} is {self.status.get(job)}, not {status}, after {WAIT} s"
                ) from None
            assert self._take(message), message

    def close(self) -> None:
        self.conn.close()


_examples = itertools.count()
JOBS = st.sampled_from(["backup", "mirror"])
APIS = st.sampled_from(["job", "block-job"])


class JobMachine(RuleBasedStateMachine):
    daemon: DaemonProcess  # set by the test

    @initialize()
    def start_jobs(self) -> None:
        self.client = Client(self.daemon.socket_path)
        self.prefix = f"s{next(_examples)}-"
        self.nodes = [self.prefix + name for name in ("src", "dst", "msrc", "mdst")]
        for node in self.nodes:
            assert self.client.execute("blockdev-add", {
                "driver": "null-co", "node-name": node, "size": SIZE, "read-zeroes": True,
            }) == OK
        self.jobs: dict[str, ModelJob] = {}
        self.start("backup")
        self.start("mirror")

    def start(self, kind: str) -> None:
        """A new job of KIND (reusing the id of a dismissed one)."""
        manual = {"job-id": self.prefix + kind, "sync": "full", "auto-finalize": False,
                  "auto-dismiss": False}
        if kind == "backup":
            model = ModelJob(self.prefix + kind, kind, "running", 1)
            reply = self.client.execute("blockdev-backup", {
                "device": self.nodes[0], "target": self.nodes[1], "speed": 1, **manual})
        else:
            model = ModelJob(self.prefix + kind, kind, "ready", 0)
            reply = self.client.execute("blockdev-mirror", {
                "device": self.nodes[2], "target": self.nodes[3], **manual})
        assert reply == OK
        self.jobs[kind] = model
        self.client.wait(model.id, model.status)
        self.check_statuses()

    @precondition(lambda self: any(job.status == GONE for job in self.jobs.values()))
    @rule(which=st.sampled_from(["backup", "mirror"]))
    def restart(self, which: str) -> None:
        if self.jobs[which].status == GONE:
            self.start(which)

    def send(self, which: str, verb: str, api: str, argument: int | None = None) -> None:
        model = self.jobs[which]
        command, arguments = request(verb, api, model.id, argument)
        before = model.status
        expected = expected_reply(model, verb, api, argument)
        reply = self.client.execute(command, arguments)
        assert reply == expected, f"{command} {arguments} in {before!r}"
        self.client.wait(model.id, "null" if model.status == GONE else model.status)
        self.check_statuses()

    @rule(which=JOBS, api=APIS)
    def pause(self, which: str, api: str) -> None:
        self.send(which, "pause", api)

    @rule(which=JOBS, api=APIS)
    def resume(self, which: str, api: str) -> None:
        self.send(which, "resume", api)

    @rule(which=JOBS, api=APIS)
    def cancel(self, which: str, api: str) -> None:
        self.send(which, "cancel", api)  # job-cancel, block-job-cancel with force

    @rule(which=JOBS)
    def soft_cancel(self, which: str) -> None:
        self.send(which, "soft-cancel", "block-job")  # block-job-cancel without force

    @rule(which=JOBS, api=APIS)
    def complete(self, which: str, api: str) -> None:
        self.send(which, "complete", api)

    @rule(which=JOBS, api=APIS)
    def finalize(self, which: str, api: str) -> None:
        self.send(which, "finalize", api)

    @rule(which=JOBS, api=APIS)
    def dismiss(self, which: str, api: str) -> None:
        self.send(which, "dismiss", api)

    @rule(which=JOBS, speed=st.sampled_from([0, 1, 65536, -1]))
    def set_speed(self, which: str, speed: int) -> None:
        self.send(which, "set-speed", "block-job", speed)

    def check_statuses(self) -> None:
        jobs = {job["id"]: job for job in self.client.execute("query-jobs")["return"]}
        for model in self.jobs.values():
            if model.status == GONE:
                assert model.id not in jobs
            else:
                assert jobs[model.id]["status"] == model.status, jobs[model.id]

    def teardown(self) -> None:
        """Cancel, dismiss, delete: best effort (a failed step has already been reported, and
        every example has names of its own)."""
        client = getattr(self, "client", None)
        if client is None:
            return
        try:
            for model in self.jobs.values():
                if client.status.get(model.id) not in ("concluded", "null"):
                    client.execute("job-cancel", {"id": model.id})
                    client.wait(model.id, "concluded")
                if client.status.get(model.id) == "concluded":
                    client.execute("job-dismiss", {"id": model.id})
            for node in self.nodes:
                client.execute("blockdev-del", {"node-name": node})
        except (AssertionError, OSError):
            pass
        finally:
            client.close()


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with start_qmpjobd(tmp_path_factory.mktemp("qmpjobd")) as daemon:
        yield daemon


def test_random_verb_sequences_follow_the_model(ours: DaemonProcess) -> None:
    JobMachine.daemon = ours
    run_state_machine_as_test(JobMachine, settings=settings(
        max_examples=30, stateful_step_count=15, deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ))
