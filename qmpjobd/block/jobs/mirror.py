"""mirror: copy a node to a target, then stay READY until completed or cancelled.

Once the copy is done the job waits as long as its speed asks for the bytes copied, then goes
`ready` (BLOCK_JOB_READY). job-complete ends it; block-job-cancel without force of a ready
mirror completes it too (without switching to the target), as QEMU does. There is no guest
writing to the source here, so a ready mirror has nothing more to copy.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from ...jobs.errors import JobError
from ...jobs.job import Emit
from ..datapath import CopyFailed, copy, on_host_files
from ..drivers.base import Node
from .blockjob import BlockJob

DEFAULT_BUF_SIZE = 1 << 24
# As QEMU's mirror: at most this many requests in flight, each of at least MIN_REQUEST bytes
# (more for a larger buffer), and no more bytes in flight than the buffer holds. A failing
# target makes every request in flight fail: one BLOCK_JOB_ERROR each, as QSD sends them.
MAX_IN_FLIGHT = 16
MIN_REQUEST = 1 << 20


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MirrorJob(BlockJob):
    job_type = "mirror"

    def __init__(
        self, job_id: str, emit: Emit, source: Node, target: Node, *, sync: str,
        granularity: int, buf_size: int, **options: Any,
    ) -> None:
        super().__init__(job_id, emit, source, target, **options)
        self.sync = sync
        self.granularity = granularity or 65536
        self.buf_size = buf_size or DEFAULT_BUF_SIZE
        self.should_complete = False

    async def run(self) -> None:
        if self.source.size != self.target.size:
            raise JobError("Source and target image have different sizes")
        if self.buf_size > _physical_memory():
            # QEMU allocates the buffer when the job starts, and fails there.
            raise JobError("Cannot allocate memory")
        if self.sync != "none":
            self.progress_total = self.source.size
            await self._copy()
            # The bytes copied are charged at once; the job keeps its pace before READY. (A
            # wake-up asked for while copying is spent: only one during the wait counts. A
            # cancellation is not: it ends the job at once.)
            self._wake = trio.Event()
            if not self.is_cancelled:
                await self.sleep_ns(self.limit.delay_ns(0))
        await self.pause_point()
        self.transition("ready")
        self.on_ready()
        while not self.should_complete:
            await self.sleep_ns(1 << 62)

    async def _copy(self) -> None:
        size = self.source.size
        request = max(self.granularity, min(self.buf_size, max(self.buf_size // 16, MIN_REQUEST)))
        request -= request % self.granularity
        # Requests between files run side by side in worker threads; with a null-co node
        # there is no I/O to overlap.
        in_flight = max(1, min(MAX_IN_FLIGHT, self.buf_size // request))
        if not on_host_files(self.source, self.target):
            in_flight = 1
        todo = [(offset, min(request, size - offset)) for offset in range(0, size, request)]
        todo.reverse()  # taken from the end: the copy goes front to back
        while todo:
            await self.pause_point()
            batch = [todo.pop() for _ in range(min(in_flight, len(todo)))]
            failures: list[tuple[int, int, CopyFailed]] = []
            self.io_begin()
            try:
                if len(batch) == 1:
                    await self._request(*batch[0], failures)
                else:
                    async with trio.open_nursery() as nursery:
                        for offset, length in batch:
                            nursery.start_soon(self._request, offset, length, failures)
            finally:
                self.io_end()
            if not failures:
                continue
            actions = [self.io_failed(failure) for _, _, failure in failures]
            if "report" in actions:
                raise failures[actions.index("report")][2].error
            # What failed is copied again (from where each request got to) once the job goes
            # on: at once when ignored, after job-resume when stopped.
            for offset, length, failure in sorted(failures, reverse=True):
                todo.append((offset + failure.done, length - failure.done))
                self.progress_current += failure.done
            await self.retry_after("stop" if "stop" in actions else "ignore")

    async def _request(
        self, offset: int, length: int, failures: list[tuple[int, int, CopyFailed]]
    ) -> None:
        try:
            await copy(self.source, self.target, offset, length)
        except CopyFailed as failure:
            failures.append((offset, length, failure))
            return
        self.progress_current += length
        self.limit.delay_ns(length)

    def soft_cancel_completes(self) -> bool:
        return self.status in ("ready", "standby")

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
        return self.pause_count > 0 or self.status == "pending"
