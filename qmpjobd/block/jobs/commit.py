"""block-commit: merge the upper images of a backing chain into an image below them.

Commit of an intermediate image (TOP below the device's own image), as QEMU's commit job: the
chain from TOP down to the base's overlay is walked in pieces of at most 512 KiB; a piece one
of those layers holds is read through TOP and written into the base as it reads, zeroes
included (QEMU's commit writes the buffer it read), its data copied in the kernel (by the
base's copier process, without a speed limit); the rest is passed over. Progress counts
every piece, only copied ones count against the speed. A base smaller than TOP is grown
first. Once done, the image above TOP names the base in its header and falls through to it,
and the images between, if the chain opened them from headers, are closed.

Commit of the active layer (TOP is the device's image), as QEMU's: a mirror with the base as
its target, of what the layers above the base hold, in pieces of the base's cluster size (4 to
64 KiB): READY once copied; job-complete or block-job-cancel end it, and the graph stays as it
is (QEMU would put the base in place of TOP under TOP's parents: a root node has none).

Either way a base opened read-only (a backing file) is made writable for the job; an
intermediate commit makes it read-only again at the end, an active commit leaves it writable,
as QSD does.
"""

from __future__ import annotations

from typing import Any

import trio

from ...jobs.job import Emit
from ...jobs.manager import JobManager
from ..chain import CommitPlan, allocated_above, drop_intermediate, plan_commit
from ..datapath import copy_as_read_sync, copy_by_status
from ..drivers.base import Node
from ..errors import CopyFailed
from ..graph import BlockGraph
from .blockjob import BlockJob, new_job_id
from .mirror import MirrorJob, allocated_ranges, bitmap_granularity

# QEMU's COMMIT_BUFFER_SIZE.
CHUNK = 512 << 10


class CommitJob(BlockJob):
    """The commit of an intermediate image."""

    job_type = "commit"
    flushes_target = True  # before the overlay's header names the base
    defers_copies = True

    def __init__(self, job_id: str, emit: Emit, graph: BlockGraph, plan: CommitPlan, *,
                 base_reopened: bool, **options: Any) -> None:
        super().__init__(job_id, emit, plan.top, plan.base, **options)
        self.graph = graph
        self.plan = plan
        self.base_reopened = base_reopened

    async def run(self) -> None:
        plan = self.plan
        try:
            await _grow_base(plan.top, plan.base)
            await self.walk(plan.top.size, self._step_sync)
            if not self.is_cancelled:
                assert plan.overlay is not None
                await drop_intermediate(self.graph, plan.overlay, plan.base, plan.backing_file)
        finally:
            if self.base_reopened:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(plan.base.reopen, True)

    def _step_sync(self, offset: int) -> tuple[int, bool]:
        plan = self.plan
        length = min(CHUNK, plan.top.size - offset)
        try:
            held, n = allocated_above(plan.top, plan.base_overlay, offset, length)
        except OSError as e:
            raise CopyFailed("read", e, 0) from None
        if not held:
            return n, False
        copy_as_read_sync(plan.top, plan.base, offset, n)
        return n, True


class ActiveCommitJob(MirrorJob):
    """The commit of the device's own image: a mirror into the base of what lies above it."""

    job_type = "commit"

    def __init__(self, job_id: str, emit: Emit, plan: CommitPlan, **options: Any) -> None:
        super().__init__(job_id, emit, plan.top, plan.base, sync="full",
                         granularity=bitmap_granularity(plan.base), buf_size=0, **options)
        self.plan = plan

    async def _check_sizes(self) -> None:
        await _grow_base(self.plan.top, self.plan.base)

    async def _dirty_ranges(self) -> list[tuple[int, int]]:
        return await trio.to_thread.run_sync(
            allocated_ranges, self.plan.top, self.plan.base_overlay, self.granularity)

    async def _copy_range(self, offset: int, length: int) -> None:
        await copy_by_status(self.source, self.target, offset, length,
                             granularity=self.granularity, unmap=True)


async def _grow_base(top: Node, base: Node) -> None:
    if base.size < top.size:
        await trio.to_thread.run_sync(base.grow_sync, top.size)


async def commit_job(
    graph: BlockGraph, jobs: JobManager, *, device: str, job_id: str | None,
    top: str | None, top_node: str | None, base: str | None, base_node: str | None,
    backing_file: str | None, auto_finalize: bool, auto_dismiss: bool, on_error: str,
) -> BlockJob:
    """block-commit's checks in QEMU's order, then its job (not yet created); the base is
    writable from here on."""
    plan = plan_commit(graph, device, top=top, top_node=top_node, base=base,
                       base_node=base_node, backing_file=backing_file)
    job_id = new_job_id(jobs, job_id)
    options: dict[str, Any] = {"auto_finalize": auto_finalize, "auto_dismiss": auto_dismiss,
                               "on_source_error": on_error, "on_target_error": on_error}
    reopened = plan.base.read_only
    if reopened:
        await trio.to_thread.run_sync(plan.base.reopen, False)
    try:
        if plan.overlay is None:
            return ActiveCommitJob(job_id, jobs.emit, plan, **options)
        return CommitJob(job_id, jobs.emit, graph, plan, base_reopened=reopened, **options)
    except BaseException:
        if reopened:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(plan.base.reopen, True)
        raise
