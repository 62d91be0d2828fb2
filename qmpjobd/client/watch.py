"""`qmpjob watch`: one progress bar per job and running task, redrawn by rich. The rows are
fetched again twice a second and at once when a job's status changes (an event), never in a
tight loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from . import render
from .connection import Connection

if TYPE_CHECKING:
    from .outcomes import Outcomes

POLL = 0.5  # seconds between two looks at the jobs without an event


def watch(conn: Connection, outcomes: Outcomes | None,
          fetch: Callable[[], list[dict[str, Any]]]) -> None:
    """Draw until OUTCOMES has nothing left to wait for (with none: until interrupted)."""
    progress = Progress(
        TextColumn("{task.fields[ident]}"), TextColumn("{task.fields[type]}"),
        TextColumn("{task.fields[status]}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[age]}"), auto_refresh=False)
    bars: dict[tuple[str, str], TaskID] = {}
    live = Live(progress, refresh_per_second=4, transient=False)
    with live:
        while True:
            _redraw(progress, bars, fetch())
            live.refresh()
            if outcomes is not None and not outcomes.waiting:
                break
            event = conn.next_event(POLL)
            while event is not None:
                if outcomes is not None:
                    outcomes.seen(event)
                event = conn.next_event(0)
    if not live.console.is_terminal:
        live.console.line()  # (a terminal's last frame ends its line; a pipe's does not)


def _redraw(progress: Progress, bars: dict[tuple[str, str], TaskID],
            found: list[dict[str, Any]]) -> None:
    present = set()
    for row in found:
        key = (row["kind"], row["id"])
        present.add(key)
        fields = {
            "ident": row["id"], "type": row["type"], "status": row["status"],
            "speed": "" if row["speed"] is None else f"{render.size(row['speed'])}/s",
            "eta": "" if row["eta"] is None else "eta " + render.duration(row["eta"]),
            "age": "" if row["age"] is None else render.duration(row["age"]),
        }
        done = int(1000 * (row["progress"] or 0.0))
        if key not in bars:
            bars[key] = progress.add_task("", total=1000, completed=done, **fields)
        else:
            progress.update(bars[key], completed=done, **fields)
    for key in [key for key in bars if key not in present]:
        progress.remove_task(bars.pop(key))
