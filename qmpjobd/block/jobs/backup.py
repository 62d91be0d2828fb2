"""backup: copy a node to a target of the same size, chunk by chunk, at the job's speed.

The first chunk goes at once; after each chunk the job charges the bytes to its rate limit and
sleeps as long as the speed asks, which is also where pause and cancel take effect. Without a
speed a step is 64 MiB (datapath.py copies it in one worker-thread call), and between formats
one trip to the worker thread takes steps until 64 MiB of data are copied or 20 ms have passed
(a stretch of zeroes is one step however long). sync=full copies everything, sync=top what
the source's own layer holds (all of it for a node without a backing file); sync=none copies
nothing and keeps the job running until it is cancelled. A chunk that fails is passed over
and retried in the next pass, as the error policy says (blockjob.py).
"""

from __future__ import annotations

import time
from typing import Any

import trio

from ...jobs.job import Emit
from ...jobs.manager import JobManager
from ..datapath import copy, copy_by_status_sync
from ..drivers.base import Extent, Node
from ..errors import BlockError, CopyFailed
from ..graph import BlockGraph
from .blockjob import BlockJob, DeferredCopies, dirty_bitmap, new_job_id, piece_at
from .mirror import allocated_ranges

CLUSTER = 65536
DEFAULT_CHUNK = 1 << 20
# An unthrottled backup without x-perf.max-chunk copies this much per step: fewer trips to a
# worker thread, still a pause point every few tens of milliseconds.
FAST_CHUNK = 64 << 20
# The longest an unthrottled backup between formats works in one worker-thread call.
TRIP_NS = 20_000_000


def chunk_size(max_chunk: int) -> int:
    """Bytes per chunk for x-perf.max-chunk (0: the default), rounded up to whole clusters."""
    if not max_chunk:
        return DEFAULT_CHUNK
    return -(-max_chunk // CLUSTER) * CLUSTER


class BackupJob(BlockJob):
    job_type = "backup"

    def __init__(
        self, job_id: str, emit: Emit, source: Node, target: Node, *, sync: str, max_chunk: int,
        **options: Any,
    ) -> None:
        super().__init__(job_id, emit, source, target, **options)
        self.sync = sync
        self.chunk = chunk_size(max_chunk)
        self.fast_chunk = FAST_CHUNK if not max_chunk else self.chunk
        # QEMU's backup works in whole clusters: its length and progress are the source's
        # size rounded up to one.
        self.progress_total = -(-source.size // CLUSTER) * CLUSTER

    async def run(self) -> None:
        if self.sync == "none":
            # Only copies what the guest would overwrite; there is no guest: wait for cancel.
            while True:
                await self.sleep_ns(1 << 62)
        # Each pass tries every range still to copy; a chunk that fails is left for the next
        # pass, and the pass goes on with the rest, as QEMU's backup does: its progress counts
        # the chunks that were copied, and the first error is acted on once the pass is over.
        todo = [(0, self.progress_total)]
        if self.sync == "top" and self.source.backing is not None:
            # Only what the source's own layer holds, in whole clusters (QEMU drops the rest
            # from its copy bitmap, and from the job's length, as it goes).
            todo = [(start, start + length) for start, length in await trio.to_thread.run_sync(
                allocated_ranges, self.source, self.source,
                max(CLUSTER, self.target.cluster_size))]
            self.progress_total = sum(end - start for start, end in todo)
        while todo:
            failed: list[tuple[int, int]] = []
            first: CopyFailed | None = None
            for start, end in todo:
                offset = start
                while offset < end:
                    await self.pause_point()
                    if not self.speed and (self.source.cluster_size
                                           or self.target.cluster_size):
                        # Unthrottled, from or into a format: as many steps as fit in one
                        # trip to the worker thread.
                        n, failure = await self._steps(offset, end)
                    else:
                        n = 0
                        step = min(self.fast_chunk if not self.speed else self.chunk,
                                   end - offset)
                        try:
                            await self._copy(offset, step)
                            n = step
                            failure = None
                        except CopyFailed as e:
                            failure = e
                    offset += n
                    self.charge(n)
                    if failure is not None:
                        first = first or failure
                        # What was copied before the chunk that failed counts; that chunk is
                        # the next pass's.
                        done = failure.done - failure.done % self.chunk
                        bad = min(self.chunk, end - offset - done)
                        failed.append((offset + done, offset + done + bad))
                        offset += done + bad
                        self.charge(done)
                    if offset < self.progress_total:
                        await self.ratelimit_sleep()
            if first is None:
                return
            action = self.io_failed(first)
            if action == "report":
                raise first.error
            await self.retry_after(action)
            todo = failed

    async def _steps(self, offset: int, end: int) -> tuple[int, CopyFailed | None]:
        """Steps from OFFSET towards END in one worker-thread call: (bytes done, the failure
        that stopped them, its `done` counted from the start of the step that failed)."""
        self.io_begin()
        try:
            return await trio.to_thread.run_sync(self._steps_sync, offset, end)
        finally:
            self.io_end()

    def _steps_sync(self, offset: int, end: int) -> tuple[int, CopyFailed | None]:
        """_steps, in the worker thread: steps until FAST_CHUNK bytes of data are copied or
        TRIP_NS have passed (a pause or cancel waits no longer than that). A stretch that
        reads as zeroes is one step (a sparse image's zeroes are written in whole L2 tables'
        worth at once, so that the job's time goes with its data, not its size). The target
        may make the copies in a process of its own meanwhile (defer_copies_sync): all are
        done before the trip ends, and a failed one counts as its step's failure."""
        start = offset
        deadline = time.monotonic_ns() + TRIP_NS
        copied = 0
        steps: list[int] = []  # where each step began
        failure: CopyFailed | None = None
        with DeferredCopies(self.target) as copies:
            while offset < end:
                step = min(self.fast_chunk, end - offset)
                extent: Extent | None = None
                try:
                    extent = self.source.block_status(offset, end - offset)
                    if extent.zero and extent.length > step:
                        step = max(step, extent.length - extent.length % CLUSTER)
                    elif not extent.zero and extent.length < step:
                        # Data that ends short of the step: the step ends with it, so that
                        # the zeroes after it are one step of their own, as long as they run.
                        unit = max(CLUSTER, self.target.cluster_size)
                        step = min(step, -(-extent.length // unit) * unit)
                except OSError:
                    pass  # the copy meets the error, and the error policy acts on it
                steps.append(offset)
                try:
                    copied += self._copy_sync(offset, step, extent)
                except CopyFailed as e:
                    failure = e
                    break
                offset += step
                if copied >= self.fast_chunk or time.monotonic_ns() >= deadline:
                    break
        late = copies.failed
        if late is not None and (failure is None or late[0] < steps[-1] + failure.done):
            # A deferred write failed first: the trip ends at it, as if it had failed there.
            at, error = late
            began = steps[piece_at(steps, at)]
            return began - start, CopyFailed("write", error, at - began)
        if failure is not None:
            return steps[-1] - start, failure
        return offset - start, None

    def source_bitmap(self) -> dict[str, Any]:
        # QEMU's copy bitmap: what is left to copy (cluster-aligned, like the job's progress).
        count = max(self.progress_total - self.progress_current, 0)
        return dirty_bitmap(count, CLUSTER, recording=False)

    async def _copy(self, offset: int, step: int) -> None:
        self.io_begin()
        try:
            if not (self.source.cluster_size or self.target.cluster_size):
                # The last cluster may hold fewer bytes than a cluster: copy only those.
                await copy(self.source, self.target, offset,
                           min(step, self.source.size - offset))
            else:
                await trio.to_thread.run_sync(self._copy_sync, offset, step)
        finally:
            self.io_end()

    def _copy_sync(self, offset: int, step: int, first: Extent | None = None) -> int:
        """QEMU's block-copy between formats, in a worker thread: by the source's block
        status, in clusters of at least 64 KiB (the target's, if larger); zeroes are written
        as zeroes. (The last cluster may hold fewer bytes than a cluster: only those.) The
        bytes written as data."""
        return copy_by_status_sync(
            self.source, self.target, offset, min(step, self.source.size - offset),
            max(CLUSTER, self.target.cluster_size), False, first)


def backup_job(
    graph: BlockGraph, jobs: JobManager, args: dict[str, Any], target: Node | None = None
) -> BackupJob:
    """A blockdev-backup's checks in QEMU's order, then the job (not yet created). ARGS: the
    BackupCommon members by their wire names. TARGET: a drive-backup's own target node, in
    place of the node args['target'] names."""
    source = graph.lookup(args["device"])
    if target is None:
        target = graph.lookup(args["target"])
    if source is target:
        raise BlockError("Source and target cannot be the same")
    if args.get("compress"):
        if not target.cluster_size:
            # QEMU's words, with the device name its nodes do not have.
            raise BlockError("Compression is not supported for this drive ")
        raise BlockError("qmpjobd does not write compressed clusters: backup 'compress' into "
                         f"node '{target.name}' is not supported")
    source.check_backup_source()
    target.check_target()
    perf = args.get("x-perf", {})
    workers = perf.get("max-workers", 64)
    if workers < 1 or workers > 2147483647:
        raise BlockError("max-workers must be between 1 and 2147483647")
    max_chunk = perf.get("max-chunk", 0)
    if max_chunk < 0:
        raise BlockError("max-chunk must be zero (which means no limit) or positive")
    sync = args["sync"]
    if sync in ("incremental", "bitmap") and "bitmap" not in args:
        raise BlockError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if source.size != target.size:
        raise BlockError("Source and target image have different sizes")
    if max_chunk and max_chunk < CLUSTER:
        raise BlockError(
            f"Required max-chunk ({max_chunk}) is less than backup cluster size ({CLUSTER})"
        )
    job_id = new_job_id(jobs, args.get("job-id"))
    try:
        return BackupJob(
            job_id, jobs.emit, source, target, sync=sync, max_chunk=max_chunk,
            auto_finalize=args.get("auto-finalize", True),
            auto_dismiss=args.get("auto-dismiss", True),
            on_source_error=args.get("on-source-error", "report"),
            on_target_error=args.get("on-target-error", "report"),
        )
    except BlockError as e:
        # QEMU meets the target's image lock while inserting its copy-before-write node.
        raise BlockError(f"Could not create node: {e}") from None
