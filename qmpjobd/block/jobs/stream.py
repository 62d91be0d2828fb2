"""block-stream on a node without a backing file: nothing to copy, the job ends at once.

As qemu-storage-daemon 7.2: the whole life of the job (len 0) goes by before the command
replies; while the job lasts (auto-finalize off) it holds its node.
"""

from __future__ import annotations

from ...jobs.job import Emit
from ..drivers.base import Node
from .blockjob import BlockJob


class StreamJob(BlockJob):
    job_type = "stream"

    def __init__(
        self, job_id: str, emit: Emit, node: Node, *, auto_finalize: bool, auto_dismiss: bool
    ) -> None:
        # The node is both what is read and what is written; streaming nothing takes no lock.
        super().__init__(
            job_id, emit, node, node, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
            lock_target=False,
        )

    async def run(self) -> None:
        await self.pause_point()
