"""backup: copy a node to a target of the same size, chunk by chunk, at the job's speed.

The first chunk goes at once; after each chunk the job charges the bytes to its rate limit and
sleeps as long as the speed asks, which is also where pause and cancel take effect. sync=full
and top copy everything (the nodes of this milestone have no backing files); sync=none copies
nothing and keeps the job running until it is cancelled.
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
        offset = 0
        size, total = self.source.size, self.progress_total
        while offset < total:
            await self.pause_point()
            step = min(self.fast_chunk if not self.speed else self.chunk, total - offset)
            length = min(step, size - offset)  # the bytes there are in the last cluster
            self.io_begin()
            try:
                await copy(self.source, self.target, offset, length)
            except CopyFailed as failure:
                self.io_end()
                done = failure.done - failure.done % CLUSTER  # progress counts whole clusters
                offset += done
                self.charge(done)
                action = self.io_failed(failure)
                if action == "report":
                    raise failure.error from None
                await self.retry_after(action)
                continue
            self.io_end()
            offset += step
            self.charge(step)
            if offset < total:
                await self.ratelimit_sleep()
