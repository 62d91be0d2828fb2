"""qmpjobd-checksum: the x-checksum command and its job kind, a SHA-256 of a block node.

Run it with `qmpjobd --handlers qmpjobd_checksum` (this directory's parent on PYTHONPATH), or
install it (`pip install examples/checksum`): its entry point in the group qmpjobd.handlers
makes every qmpjobd of that environment load it. SCHEMA names the QAPI file the daemon adds to
its own schema. docs/extending.md explains each part.
"""

from __future__ import annotations

import hashlib
from typing import Any

import trio

from qmpjobd.api import Context, Emit, Job, JobFailed, Node, handler, start_job

SCHEMA = "checksum.json"  # next to this file
CHUNK = 1 << 20  # bytes read at a time: a pause, a cancel or a new speed waits at most this


class Checksum(Job):
    """Reads NODE front to back and hashes it. The node cannot be deleted meanwhile (it is the
    source of a job, as a backup's source is)."""

    job_type = "x-checksum"
    # Also an action of transaction, its arguments in the schema's XChecksumWrapper.
    transaction_action = ("x-checksum", "XChecksumWrapper")

    def __init__(self, job_id: str, emit: Emit, node: Node, **options: bool) -> None:
        super().__init__(job_id, emit, **options)
        self.node = node
        self.digest = hashlib.sha256()
        node.source_of.append(self.job_type)
        self._holding = True

    async def run(self) -> None:
        size = self.node.size
        self.progress_total = size
        for offset in range(0, size, CHUNK):
            await self.pause_point()  # a pause takes effect here, a cancel ends the job
            length = min(CHUNK, size - offset)
            try:
                # Reading and hashing in a worker thread: the daemon answers meanwhile.
                await trio.to_thread.run_sync(self._hash, offset, length)
            except OSError as e:
                raise JobFailed(f"Could not read {self.node.name} at {offset}: "
                                f"{e.strerror}") from None
            self.charge(length)
            await self.ratelimit_sleep()

    def _hash(self, offset: int, length: int) -> None:
        data = self.node.read_sync(offset, length)
        self.digest.update(bytes(length) if data is None else data)

    def result(self) -> dict[str, Any] | None:
        return {"sha256": self.digest.hexdigest(), "bytes": self.progress_current}

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.node.source_of.remove(self.job_type)

    def commit(self) -> None:
        self._release()

    def abort(self) -> None:
        self._release()


    @classmethod
    def from_action(cls, ctx: Context, arguments: dict[str, Any]) -> Checksum:
        """The job x-checksum's ARGUMENTS (an XChecksum, checked) describe, as the command
        and the transaction action make it."""
        node = ctx.graph.find(arguments["device"])
        job = cls(arguments["job-id"], ctx.jobs.emit, node,
                  auto_finalize=arguments.get("auto-finalize", True),
                  auto_dismiss=arguments.get("auto-dismiss", True))
        job.speed = arguments.get("speed", 0)
        return job


@handler("x-checksum")
async def x_checksum(ctx: Context, arguments: dict[str, Any]) -> None:
    # (boxed: the arguments come as one object, as the transaction action gets them)
    job = Checksum.from_action(ctx, arguments)
    await start_job(ctx, job, job.speed)
