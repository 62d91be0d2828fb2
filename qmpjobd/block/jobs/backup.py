"""backup: copy a node to a target of the same size, chunk by chunk, at the job's speed.

The first chunk goes at once; after each chunk the job charges the bytes to its rate limit and
sleeps as long as the speed asks, which is also where pause and cancel take effect (without a
speed a step is 64 MiB: datapath.py copies it in one worker-thread call). sync=full and top
copy everything (the nodes of this milestone have no backing files); sync=none copies nothing
and keeps the job running until it is cancelled. A chunk that fails is passed over and retried
in the next pass, as the error policy says (blockjob.py).
"""

from __future__ import annotations

from typing import Any

from ...jobs.job import Emit
from ..datapath import CopyFailed, copy
from ..drivers.base import Node
from .blockjob import BlockJob

CLUSTER = 65536
DEFAULT_CHUNK = 1 << 20
# An unthrottled backup without x-perf.max-chunk copies this much per step: fewer trips to a
# worker thread, still a pause point every few tens of milliseconds.
FAST_CHUNK = 64 << 20


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
        while todo:
            failed: list[tuple[int, int]] = []
            first: CopyFailed | None = None
            for start, end in todo:
                offset = start
                while offset < end:
                    await self.pause_point()
                    step = min(self.fast_chunk if not self.speed else self.chunk, end - offset)
                    try:
                        await self._copy(offset, step)
                        done = step
                    except CopyFailed as failure:
                        first = first or failure
                        # What was copied before the chunk that failed counts; that chunk is
                        # the next pass's.
                        done = failure.done - failure.done % self.chunk
                        bad = min(self.chunk, end - offset - done)
                        failed.append((offset + done, offset + done + bad))
                        offset += bad
                    offset += done
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

    async def _copy(self, offset: int, step: int) -> None:
        # The last cluster may hold fewer bytes than a cluster: copy only those.
        length = min(step, self.source.size - offset)
        self.io_begin()
        try:
            await copy(self.source, self.target, offset, length)
        finally:
            self.io_end()
