"""block-stream on a node without a backing file: nothing to copy, the job ends at once.

As qemu-storage-daemon 7.2: the whole life of the job (len 0) goes by before the command
replies; while the job lasts (auto-finalize off) it holds its node.
"""

from __future__ import annotations

from ...jobs.job import Emit
from ...jobs.manager import JobManager
from ..chain import check_stream
from ..drivers.base import Node
from ..graph import BlockGraph
from .blockjob import BlockJob, new_job_id


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


def stream_job(
    graph: BlockGraph, jobs: JobManager, *, device: str, job_id: str | None,
    base: str | None, base_node: str | None, bottom: str | None, backing_file: str | None,
    auto_finalize: bool, auto_dismiss: bool,
) -> StreamJob:
    """block-stream's checks in QEMU's order, then its job (not yet created)."""
    node = graph.lookup(device)
    check_stream(
        graph, node, device, base=base, base_node=base_node, bottom=bottom,
        backing_file=backing_file,
    )
    node.check_backup_source()  # a backup's source may be streamed, not what a job writes
    return StreamJob(
        new_job_id(jobs, job_id), jobs.emit, node, auto_finalize=auto_finalize,
        auto_dismiss=auto_dismiss,
    )
