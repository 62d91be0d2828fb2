"""The errors the job model raises. The dispatcher reports them as QMP errors of class `cls`;
the model itself knows nothing of the protocol."""

from __future__ import annotations


class JobError(Exception):
    cls = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc
