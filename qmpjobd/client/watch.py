"""`qmpjob watch`'s drawing: one rich progress bar per job and running task. The rows are
fetched again twice a second, and at once when events come, never in a tight loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from . import render

if TYPE_CHECKING:
    from .outcomes import Outcomes

POLL = 0.5  # seconds between two looks at the jobs without an event


async def draw(outcomes: Outcomes | None,
               fetch: Callable[[], Awaitable[list[dict[str, Any]]]],
               events: Callable[[], Awaitable[list[dict[str, Any]]]]) -> None:
    """Draw what FETCH finds until OUTCOMES has nothing left to wait for (with none: until
    interrupted), and again whenever EVENTS has some."""
    progress = Progress(
        TextColumn("{task.fields[ident]}"), TextColumn("{task.fields[type]}"),
        TextColumn("{task.fields[status]}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[age]}"), auto_refresh=False)
    bars: dict[tuple[str, str], TaskID] = {}
    # Drawn from here only (no refresh thread of rich's): after each look.
    live = Live(progress, auto_refresh=False, transient=False)
    with live:
        while True:
            _redraw(progress, bars, await fetch())
            live.refresh()
            if outcomes is not None and not outcomes.waiting:
                break
            with trio.move_on_after(POLL):  # the next look: then, or once events come
                for event in await events():
                    if outcomes is not None:
                        outcomes.seen(event)
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
