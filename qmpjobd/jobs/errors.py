"""The errors of the job layer. The dispatcher reports a JobError (and the block layer's, which
derive from it) as a QMP error of class `cls`; the model itself knows nothing of the protocol."""

from __future__ import annotations

# The error of a job that was cancelled, and of the others of its group that were cancelled
# with it.
CANCELED = "Operation canceled"


class JobError(Exception):
    """What a client asked of a job cannot be done; `desc` is QEMU's message."""

    cls = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class DeviceNotActive(JobError):
    """The block-job-* commands' "no such job"."""

    cls = "DeviceNotActive"


class InvalidTransition(RuntimeError):
    """A status change the transition table forbids: a bug in the daemon, never the client's
    doing (the dispatcher logs it and answers with an internal error)."""


class JobCancelled(Exception):
    """Raised inside a job's work when it has been cancelled; the job then aborts."""
