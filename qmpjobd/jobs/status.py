"""A job's statuses and the verbs a client may apply to it: QEMU's two tables.

The transition table says which status may follow which; the verb table says in which
statuses each verb is accepted. Both are QEMU's, checked against qemu-storage-daemon
(docs/job-model.md, section 2). The names are QAPI's JobStatus and JobVerb values.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"

    @property
    def finished(self) -> bool:
        """Concluded or dismissed: the job's work and its outcome are final."""
        return self in _FINISHED

    @property
    def parked(self) -> bool:
        """Paused, or the paused form of ready (standby)."""
        return self in _PARKED


class JobVerb(StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


S = JobStatus
_FINISHED = frozenset({S.CONCLUDED, S.NULL})
_PARKED = frozenset({S.PAUSED, S.STANDBY})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _LIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _LIVE,
    JobVerb.RESUME: _LIVE,
    JobVerb.SET_SPEED: _LIVE,
    JobVerb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
}
