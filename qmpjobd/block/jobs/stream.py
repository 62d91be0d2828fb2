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
        super(BlockJob, self).__init__(
            job_id, emit, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss
        )
        self.source = node
        self.target = node
        node.source_of.append(self.job_type)
        node.target_of = self.job_type
        self._holding = True

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.source.source_of.remove(self.job_type)
            self.target.target_of = None

    async def run(self) -> None:
        await self.pause_point()
