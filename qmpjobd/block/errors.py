"""The errors of the block layer.

A BlockError is a JobError (the block layer sits on the job layer), so the dispatcher reports
both alike: a QMP error of class `cls` with QEMU's words. CopyFailed never reaches a client: it
tells a block job which side of a copy failed, so that the job can apply its error policy.
"""

from __future__ import annotations

from ..jobs.errors import JobError


class BlockError(JobError):
    """A block layer error (GenericError unless a subclass says otherwise)."""


class DeviceNotFound(BlockError):
    cls = "DeviceNotFound"


class CopyFailed(Exception):
    """A copy stopped after DONE bytes: OPERATION ('read' or 'write') failed with ERROR."""

    def __init__(self, operation: str, error: OSError, done: int) -> None:
        super().__init__(operation, error, done)
        self.operation = operation
        self.error = error
        self.done = done
