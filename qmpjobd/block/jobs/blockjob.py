"""What block jobs add to jobs: the BLOCK_JOB_* events and query-block-jobs' view."""

from __future__ import annotations

from typing import Any

from ...jobs.job import Emit, Job
from ..drivers.base import Node


class BlockJob(Job):
    """A job that reads a source node and writes a target node, holding both while it runs."""

    def __init__(
        self, job_id: str, emit: Emit, source: Node, target: Node, *, auto_finalize: bool,
        auto_dismiss: bool, lock_target: bool = True,
    ) -> None:
        super().__init__(job_id, emit, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        # The image's write lock, unless the job writes nothing (a stream without backing).
        self._locked = lock_target
        if lock_target:
            target.take_write()
        self.source = source
        self.target = target
        source.source_of.append(self.job_type)
        target.target_of = self.job_type
        self._holding = True

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.source.source_of.remove(self.job_type)
            self.target.target_of = None
            if self._locked:
                self.target.drop_write()

    def commit(self) -> None:
        self._release()

    def abort(self) -> None:
        self._release()

    def _event_data(self) -> dict[str, Any]:
        return {
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self.speed,
            "type": self.job_type,
        }

    def on_pending(self) -> None:
        self._emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def on_ready(self) -> None:
        self._emit("BLOCK_JOB_READY", self._event_data())

    def on_finalized(self) -> None:
        data = self._event_data()
        if self.error is None:
            self._emit("BLOCK_JOB_COMPLETED", data)
        elif self.cancelled:
            self._emit("BLOCK_JOB_CANCELLED", data)
        else:
            data["error"] = self.error
            self._emit("BLOCK_JOB_COMPLETED", data)

    def reports_paused(self) -> bool:
        """query-block-jobs' `paused`."""
        return self.pause_count > 0

    def block_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.reports_paused(),
            "speed": self.speed,
            "io-status": "ok",
            "ready": self.status in ("ready", "standby"),
            "status": self.status,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.error is not None:
            info["error"] = self.error
        return info
