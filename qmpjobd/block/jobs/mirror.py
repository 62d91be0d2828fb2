"""mirror: copy a node to a target, then stay READY until completed or cancelled.

Once the copy is done the job waits as long as its speed asks for the bytes copied, then goes
`ready` (BLOCK_JOB_READY). job-complete ends it; block-job-cancel without force of a ready
mirror completes it too (without switching to the target), as QEMU does. There is no guest
writing to the source here, so a ready mirror has nothing more to copy.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from ...jobs.errors import JobError
from ...jobs.job import Emit
from ...jobs.manager import JobManager
from ...jobs.status import JobStatus
from ..chain import allocated_above
from ..datapath import copy, copy_by_status, copy_by_status_sync, on_host_files
from ..drivers.base import Node
from ..errors import BlockError, CopyFailed
from ..graph import BlockGraph
from .blockjob import BlockJob, DeferredCopies, dirty_bitmap, new_job_id, piece_at

DEFAULT_BUF_SIZE = 1 << 24
# As QEMU's mirror: at most this many requests in flight, each of at least MIN_REQUEST bytes
# (more for a larger buffer), and no more bytes in flight than the buffer holds. A failing
# target makes every request in flight fail: one BLOCK_JOB_ERROR each, as QSD sends them.
MAX_IN_FLIGHT = 16
MIN_REQUEST = 1 << 20
# Between formats without a speed limit, requests go one after another in trips to a worker
# thread of at most TRIP_REQUESTS requests and TRIP_NS (a pause or cancel waits that long).
# 64: a trip's round through the event loop costs little, and the target's write-behind still
# starts every few tens of MiB (at a trip's end, when its copies are settled). A mirror of a
# half-allocated 1 GiB qcow2: 16 trips of 64 in 216-233 ms, 64 of 16 in 292-339, 5 of 256 in
# 283-362.
TRIP_REQUESTS = 64
TRIP_NS = 20_000_000
# The longest run of zeroes one request of a job without a speed limit covers.
ZERO_RUN = 1 << 30


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MirrorJob(BlockJob):
    job_type = "mirror"
    flushes_target = True  # before it is ready

    def __init__(
        self, job_id: str, emit: Emit, source: Node, target: Node, *, sync: str,
        granularity: int, buf_size: int, zero_target: bool = False, **options: Any,
    ) -> None:
        super().__init__(job_id, emit, source, target, **options)
        self.sync = sync
        self.zero_target = zero_target
        self.granularity = granularity or bitmap_granularity(target)
        self.buf_size = buf_size or DEFAULT_BUF_SIZE
        self.should_complete = False

    async def run(self) -> None:
        await self._check_sizes()
        if self.buf_size > _physical_memory():
            # QEMU allocates the buffer when the job starts, and fails there.
            raise JobError("Cannot allocate memory")
        if self.sync != "none":
            ranges = await self._dirty_ranges()
            self.progress_total = sum(length for _, length in ranges)
            await self._copy(ranges)
            # The bytes copied are charged at once; the job keeps its pace before READY. (A
            # wake-up asked for while copying is spent: only one during the wait counts. A
            # cancellation is not: it ends the job at once.)
            self._wake = trio.Event()
            if not self.is_cancelled:
                await self.sleep_ns(self.limit.delay_ns(0))
        await self.pause_point()
        await self._flush_target()
        self.transition(JobStatus.READY)
        self.on_ready()
        while not self.should_complete:
            await self.sleep_ns(1 << 62)

    async def _flush_target(self) -> None:
        """What was copied made durable before READY, as QEMU's mirror does."""
        async def flush() -> None:
            self.io_begin()
            try:
                await self.target.flush()
            finally:
                self.io_end()
        await self._written(flush)

    async def _written(self, write: Callable[[], Awaitable[None]]) -> None:
        """WRITE done, or retried as the error policy says after each failure (a failed
        write's BLOCK_JOB_ERROR; 'report' raises its error)."""
        while True:
            try:
                await write()
                return
            except OSError as e:
                action = self.io_failed(CopyFailed("write", e, 0))
                if action == "report":
                    raise
            await self.retry_after(action)

    async def _check_sizes(self) -> None:
        if self.source.size != self.target.size:
            raise JobError("Source and target image have different sizes")

    async def _dirty_ranges(self) -> list[tuple[int, int]]:
        """What the job copies, as (offset, length) ranges in order (QEMU's dirty bitmap once
        initialised). A target to be zeroed first (sync full into a target that may hold
        data) gets all of the source, unless zero writes can free its space: then it is
        zeroed, and gets what the source's chain holds, as a target known to read as zeroes
        (a new image) does. sync=top copies what the source's own layer holds."""
        source = self.source
        if self.sync == "top":
            return await trio.to_thread.run_sync(
                allocated_ranges, source, source, self.granularity)
        if self.zero_target:
            if not self.target.can_zero_with_unmap():
                return [(0, source.size)]
            await self._zero_target()
        bottom = source
        while bottom.backing is not None:
            bottom = bottom.backing
        return await trio.to_thread.run_sync(allocated_ranges, source, bottom, self.granularity)

    async def _zero_target(self) -> None:
        """The whole target zeroed, its space freed, in QEMU's pieces (the largest multiple of
        the granularity an int holds), each a pause point; a failed piece goes to the error
        policy as a failed write does."""
        piece = (1 << 31) - 1
        piece -= piece % self.granularity
        offset = 0
        while offset < self.source.size:
            await self.pause_point()
            length = min(piece, self.source.size - offset)
            await self._written(functools.partial(
                trio.to_thread.run_sync, self.target.zero_sync, offset, length, True))
            offset += length

    async def _copy_range(self, offset: int, length: int) -> None:
        if not (self.source.cluster_size or self.target.cluster_size):
            await copy(self.source, self.target, offset, length)
        else:
            await copy_by_status(self.source, self.target, offset, length,
                                 granularity=self.granularity, unmap=True)

    async def _copy(self, ranges: list[tuple[int, int]]) -> None:
        request = max(self.granularity, min(self.buf_size, max(self.buf_size // 16, MIN_REQUEST)))
        request -= request % self.granularity
        # Requests between files run side by side in worker threads; with a null-co node
        # there is no I/O to overlap.
        in_flight = max(1, min(MAX_IN_FLIGHT, self.buf_size // request))
        if not on_host_files(self.source, self.target):
            in_flight = 1
        todo = await trio.to_thread.run_sync(self._requests, ranges, request)
        todo.reverse()  # taken from the end: the copy goes front to back
        formats = bool(self.source.cluster_size or self.target.cluster_size)
        while todo:
            await self.pause_point()
            failures: list[tuple[int, int, bool, CopyFailed]] = []
            self.io_begin()
            try:
                if in_flight == 1 and formats and not self.speed:
                    await self._in_turn(todo, failures)
                else:
                    batch = [todo.pop() for _ in range(min(in_flight, len(todo)))]
                    if len(batch) == 1:
                        await self._request(*batch[0], failures)
                    else:
                        async with trio.open_nursery() as nursery:
                            for offset, length, zero in batch:
                                nursery.start_soon(
                                    self._request, offset, length, zero, failures)
            finally:
                self.io_end()
            if not failures:
                continue
            actions = [self.io_failed(failure) for _, _, _, failure in failures]
            if "report" in actions:
                raise failures[actions.index("report")][3].error
            # What failed is copied again (from where each request got to) once the job goes
            # on: at once when ignored, after job-resume when stopped.
            for offset, length, zero, failure in sorted(failures, key=lambda f: -f[0]):
                todo.append((offset + failure.done, length - failure.done, zero))
                self.progress_current += failure.done
            await self.retry_after("stop" if "stop" in actions else "ignore")

    def _requests(
        self, ranges: list[tuple[int, int]], request: int
    ) -> list[tuple[int, int, bool]]:
        """RANGES cut into the job's requests, (offset, length, zero): REQUEST bytes each, and
        where the source reads as zeroes, consecutive requests joined into one (QEMU's mirror
        takes a run of zeroes in one step, as long as its dirty chunks: the buffer's size; a
        job without a speed limit takes up to ZERO_RUN at once, so that the time to READY
        goes with the extents, not the size). The scan costs a block status call per extent,
        not per request. Blocking."""
        todo: list[tuple[int, int, bool]] = []
        run_limit = max(request, self.buf_size - self.buf_size % request)
        if not self.speed:
            run_limit = max(run_limit, ZERO_RUN - ZERO_RUN % request)
        for start, length in ranges:
            end = start + length
            extents = self._extents(start, end)
            current = next(extents)
            for offset in range(start, end, request):
                stop = min(offset + request, end)
                while current[1] <= offset:
                    current = next(extents)
                zero = current[2]
                while zero and current[1] < stop:
                    current = next(extents)
                    zero = current[2]
                last = todo[-1] if todo else None
                if (zero and last is not None and last[2] and last[0] + last[1] == offset
                        and last[1] + stop - offset <= run_limit):
                    todo[-1] = (last[0], last[1] + stop - offset, True)
                else:
                    todo.append((offset, stop - offset, zero))
        return todo

    def _extents(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """The source's block status over [START, END): (start, end, reads as zeroes)."""
        offset = start
        while offset < end:
            extent = self.source.block_status(offset, end - offset)
            yield offset, offset + extent.length, extent.zero
            offset += extent.length

    async def _in_turn(self, todo: list[tuple[int, int, bool]],
                       failures: list[tuple[int, int, bool, CopyFailed]]) -> None:
        """The next requests one after another in one trip to a worker thread, for up to
        TRIP_NS (a format image serves one request at a time anyway: a trip each would cost
        more than many a copy, and the trip's end waits for the copier's last copies). A
        failure stops there: it joins FAILURES; the requests not tried go back to TODO."""
        batch = [todo.pop() for _ in range(min(TRIP_REQUESTS, len(todo)))]
        done, failure = await trio.to_thread.run_sync(self._requests_sync, batch)
        for _, length, zero in batch[:done]:
            self._copied(length, zero)
        if failure is not None:
            todo.extend(reversed(batch[done + 1:]))
            failures.append((*batch[done], failure))
        else:
            todo.extend(reversed(batch[done:]))

    def _requests_sync(self, batch: list[tuple[int, int, bool]]) -> tuple[
            int, CopyFailed | None]:
        """The requests of BATCH in turn until TRIP_NS have passed, the target's copies made
        by its copier process meanwhile (defer_copies_sync), all done before the trip ends:
        (how many were done, the failure that stopped the next). A failed copy counts as its
        request's failure, and the requests after it as not done (they are copied again)."""
        done, failure = len(batch), None
        deadline = time.monotonic_ns() + TRIP_NS
        with DeferredCopies(self.target) as copies:
            for n, (offset, length, _) in enumerate(batch):
                try:
                    copy_by_status_sync(self.source, self.target, offset, length,
                                        self.granularity, True)
                except CopyFailed as e:
                    done, failure = n, e
                    break
                if time.monotonic_ns() >= deadline:
                    done = n + 1
                    break
        if copies.failed is not None:
            at, error = copies.failed
            first = piece_at([offset for offset, _, _ in batch], at)
            into = at - batch[first][0]
            if first < done or (failure is not None and first == done and into < failure.done):
                done, failure = first, CopyFailed("write", error, into)
        return done, failure

    async def _request(
        self, offset: int, length: int, zero: bool,
        failures: list[tuple[int, int, bool, CopyFailed]],
    ) -> None:
        try:
            await self._copy_range(offset, length)
        except CopyFailed as failure:
            failures.append((offset, length, zero, failure))
            return
        self._copied(length, zero)

    def _copied(self, length: int, zero: bool) -> None:
        self.progress_current += length
        # Zeroes cost nothing against the speed limit where the target frees their space
        # (QEMU's accounting).
        self.limit.delay_ns(0 if zero and self.target.can_zero_with_unmap() else length)

    def source_bitmap(self) -> dict[str, Any]:
        # QEMU clears a dirty range as soon as it issues its copy, and issues up to the job's
        # buffer at once: nothing is left dirty here without writes by others.
        return dirty_bitmap(0, self.granularity, recording=True)

    def soft_cancel_completes(self) -> bool:
        return self.status in (JobStatus.READY, JobStatus.STANDBY)

    def request_cancel(self, force: bool) -> None:
        super().request_cancel(force)
        if not self.force_cancel:
            self.should_complete = True  # completes, without switching to the target

    def completable(self) -> bool:
        return True

    def do_complete(self) -> None:
        self.should_complete = True
        self.wake()

    def reports_paused(self) -> bool:
        # QSD shows a mirror that has finished its work as paused.
        return self.pause_count > 0 or self.status == JobStatus.PENDING


def bitmap_granularity(node: Node) -> int:
    """QEMU's default dirty bitmap granularity for a target: its cluster size, kept within
    4 KiB to 64 KiB; 64 KiB for a node without clusters."""
    cluster = node.cluster_size
    return min(max(cluster, 4096), 65536) if cluster else 65536


def allocated_ranges(top: Node, bottom: Node, unit: int) -> list[tuple[int, int]]:
    """What the layers from TOP down to BOTTOM hold, in whole pieces of UNIT, as (offset,
    length) in order: QEMU's dirty bitmap of a mirror or active commit, once initialised, and
    the copy bitmap of a backup with sync=top. Blocking."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    while offset < top.size:
        held, n = allocated_above(top, bottom, offset, top.size - offset)
        if held:
            start = offset - offset % unit
            end = min(-(-(offset + n) // unit) * unit, top.size)
            if ranges and ranges[-1][0] + ranges[-1][1] >= start:
                start = ranges[-1][0]
                ranges.pop()
            ranges.append((start, end - start))
        offset += n
    return ranges


def blockdev_mirror_job(
    graph: BlockGraph, jobs: JobManager, *, device: str, target: str, **options: Any
) -> MirrorJob:
    """A blockdev-mirror's checks of its nodes, then mirror_job's of the rest of OPTIONS."""
    source = graph.lookup(device)
    target_node = graph.lookup(target)
    if source is target_node:
        raise BlockError("Can't mirror node into itself")
    source.check_mirror_source()
    target_node.check_target()
    # A node the client names may hold anything: sync=full zeroes it first (QEMU's
    # blockdev-mirror always asks so).
    return mirror_job(jobs, source, target_node, zero_target=options.get("sync") == "full",
                      **options)


def mirror_job(
    jobs: JobManager, source: Node, target: Node, *, sync: str, job_id: str | None,
    granularity: int = 0, buf_size: int = 0, auto_finalize: bool = True,
    auto_dismiss: bool = True, on_source_error: str = "report",
    on_target_error: str = "report", zero_target: bool = False,
) -> MirrorJob:
    """A mirror's checks of its options in QEMU's order, then the job (not yet created).
    ZERO_TARGET: the target may hold data where the source reads zeroes."""
    if granularity and not 512 <= granularity <= 64 << 20:
        raise BlockError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise BlockError("Parameter 'granularity' expects a power of 2")
    if buf_size < 0:
        raise BlockError("Invalid parameter 'buf-size'")
    if sync in ("incremental", "bitmap"):
        raise BlockError(f"Sync mode '{sync}' not supported")
    return MirrorJob(
        new_job_id(jobs, job_id), jobs.emit, source, target, sync=sync,
        granularity=granularity, buf_size=buf_size, zero_target=zero_target,
        auto_finalize=auto_finalize,
        auto_dismiss=auto_dismiss, on_source_error=on_source_error,
        on_target_error=on_target_error,
    )
