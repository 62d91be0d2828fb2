"""The errors of the task layer. The dispatcher reports a TaskError as a QMP error of class
`cls` (GenericError); a StoreError stops the daemon at start-up with its message."""

from __future__ import annotations


class TaskError(Exception):
    """What a client asked of a task cannot be done; `desc` says why, in QEMU's style."""

    cls = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class StoreError(Exception):
    """The state directory cannot be used (locked by another daemon, damaged, newer): the
    message names the file, which is left as it is."""
