"""block-stream: copy into a node what its backing chain holds above a base, then make the base
its backing file (none, when the whole chain was streamed).

As QEMU's stream: the node is walked in pieces of at most 512 KiB; a piece this layer holds is
passed over; one that a layer down to the base's overlay holds is read through the chain and
written into the node (as zeroes, by the image's zero write, where all of it reads as zeroes,
as QEMU's copy-on-read does); the rest (what only the base holds) stays where it is. Progress
counts every piece, copied or not; only copied pieces count against the speed. Once done, the
node's header names the base (by `backing-file`, or the base node's file name) and its format,
the node's backing node is the base, and the images between, if the node opened them from
headers, are closed.

A node without a backing file has nothing to stream: the job ends at once (len 0).
"""

from __future__ import annotations

from typing import Any

from ...jobs.job import Emit
from ...jobs.manager import JobManager
from ..chain import StreamPlan, allocated_above, drop_intermediate, plan_stream
from ..drivers.base import is_zero
from ..errors import CopyFailed
from ..graph import BlockGraph
from .blockjob import BlockJob, new_job_id

# QEMU's STREAM_CHUNK.
CHUNK = 512 << 10


class StreamJob(BlockJob):
    job_type = "stream"
    flushes_target = True  # before its header names the base

    def __init__(
        self, job_id: str, emit: Emit, graph: BlockGraph, plan: StreamPlan, **options: Any
    ) -> None:
        top = plan.top
        streams = top is not plan.base_overlay
        # The node is both what is read and what is written; streaming nothing takes no lock.
        super().__init__(job_id, emit, top, top, lock_target=streams, **options)
        self.graph = graph
        self.plan = plan

    async def run(self) -> None:
        plan = self.plan
        top = plan.top
        if top is not plan.base_overlay:
            await self.walk(top.size, self._step_sync)
        if top.backing is not None:
            await self._rebase()

    def _step_sync(self, offset: int) -> tuple[int, bool]:
        top = self.plan.top
        length = min(CHUNK, top.size - offset)
        try:
            own, n = top.allocation(offset, length)
            if own:
                return n, False
            assert top.backing is not None
            held, n = allocated_above(top.backing, self.plan.base_overlay, offset, n)
            if not held:
                return (n or top.size - offset), False
            data = top.read_sync(offset, n)
        except OSError as e:
            raise CopyFailed("read", e, 0) from None
        try:
            # Copy-on-read: what reads as zeroes is written as zeroes.
            top.write_sync(offset, None if data is None or is_zero(data) else data, n)
        except OSError as e:
            # QEMU's stream reports every failure as a read's (its copy-on-read is a read).
            raise CopyFailed("read", e, 0) from None
        return n, True

    async def _rebase(self) -> None:
        """The base becomes the node's backing file, in its header and in the graph."""
        plan = self.plan
        await drop_intermediate(self.graph, plan.top, plan.base, plan.backing_file)


def stream_job(
    graph: BlockGraph, jobs: JobManager, *, device: str, job_id: str | None,
    base: str | None, base_node: str | None, bottom: str | None, backing_file: str | None,
    auto_finalize: bool, auto_dismiss: bool, on_error: str = "report",
) -> StreamJob:
    """block-stream's checks in QEMU's order, then its job (not yet created)."""
    node = graph.lookup(device)
    plan = plan_stream(
        graph, node, device, base=base, base_node=base_node, bottom=bottom,
        backing_file=backing_file,
    )
    return StreamJob(
        new_job_id(jobs, job_id), jobs.emit, graph, plan, auto_finalize=auto_finalize,
        auto_dismiss=auto_dismiss, on_source_error=on_error, on_target_error=on_error,
    )
