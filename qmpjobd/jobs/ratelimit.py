"""Rate limiting as QEMU's block jobs do it: bytes are charged to 100 ms slices.

Each slice may take `speed * 0.1 s` bytes (at least one). A job charges what it processed;
while the current slice's charge stays under its quota there is no delay, otherwise the job
waits until the slice, stretched in proportion to the charge, has run out, and the next charge
opens a new slice. With 64 KiB chunks at 262144 B/s that is one chunk every 250 ms, the pace
QSD keeps (docs/job-model.md, section 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable

SLICE_NS = 100_000_000


class RateLimit:
    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self.quota = 0.0  # bytes per slice; 0 means no limit
        self.slice_ns = SLICE_NS
        self._start = 0
        self._end = 0
        self._charged = 0

    def set_speed(self, speed: int) -> None:
        """Bytes per second; 0 for no limit."""
        self.quota = 0.0 if speed == 0 else max(speed * self.slice_ns / 1e9, 1.0)

    def delay_ns(self, charge: int) -> int:
        """Charge CHARGE bytes; how long to wait before processing more."""
        if not self.quota:
            return 0
        now = self._clock()
        if self._end < now:
            # The previous (possibly stretched) slice is over: start counting afresh.
            self._start, self._end, self._charged = now, now + self.slice_ns, 0
        self._charged += charge
        if self._charged < self.quota:
            return 0
        self._end = self._start + int(self._charged / self.quota * self.slice_ns)
        return self._end - now
