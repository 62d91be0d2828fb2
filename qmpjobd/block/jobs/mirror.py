"""mirror: copy a node to a target, then stay READY until completed or cancelled.

Once the copy is done the job waits as long as its speed asks for the bytes copied, then goes
`ready` (BLOCK_JOB_READY). job-complete ends it; block-job-cancel without force of a ready
mirror completes it too (without switching to the target), as QEMU does. There is no guest
writing to the source here, so a ready mirror has nothing more to copy.
"""

from __future__ import annotations

import os

import trio

from ...jobs.errors import JobError
from ...jobs.job import Emit
from ..drivers.base import Node
from .blockjob import BlockJob

DEFAULT_BUF_SIZE = 1 << 24


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MirrorJob(BlockJob):
    job_type = "mirror"

    def __init__(
        self, job_id: str, emit: Emit, source: Node, target: Node, *, sync: str,
        granularity: int, buf_size: int, auto_finalize: bool, auto_dismiss: bool,
    ) -> None:
        super().__init__(
            job_id, emit, source, target, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss
        )
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
            # wake-up asked for while copying is spent: only one during the wait counts.)
            self._wake = trio.Event()
            await self.sleep_ns(self.limit.delay_ns(0))
        await self.pause_point()
        self.transition("ready")
        self.on_ready()
        while not self.should_complete:
            await self.sleep_ns(1 << 62)

    async def _copy(self) -> None:
        offset, size = 0, self.source.size
        chunk = max(self.granularity, min(self.buf_size, 1 << 20))
        while offset < size:
            length = min(chunk, size - offset)
            await self.pause_point()
            self.io_begin()
            data = await self.source.read(offset, length)
            await self.target.write(offset, data, length)
            self.io_end()
            offset += length
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
