"""Plain-text pieces of `qmpjob`'s output: sizes, durations, progress bars, aligned tables,
events as lines.
(The one-shot subcommands draw with these; only the live view loads rich.)"""

from __future__ import annotations

import json
import time

# typing itself would cost a one-shot client 3 ms to load (mypy reads this as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


BAR_WIDTH = 20


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch of a task record's time: 2026-12-07T02:57:14.781020Z, as the
    daemon writes them (read by hand: datetime would cost a one-shot client 2 ms to load)."""
    if not isinstance(text, str) or len(text) < 20 or text[-1] != "Z":
        return None
    try:
        year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
        second = float(text[17:-1])
    except ValueError:
        return None
    if not 0 <= second < 61:  # (and not nan)
        return None
    clock = int(text[11:13]) * 3600 + int(text[14:16]) * 60 + second
    # Days since 1970-01-01 of a proleptic Gregorian date (years counted from March).
    year -= month <= 2
    era, of_era = divmod(year, 400)
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = of_era * 365 + of_era // 4 - of_era // 100 + day_of_year
    return (era * 146097 + day_of_era - 719468) * 86400 + clock


def size(count: float) -> str:
    """COUNT bytes, in binary units: 512 B, 1.5 KiB, 3.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """SECONDS as 5s, 3m07s, 2h05m, 3d04h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def bar(fraction: float | None, width: int = BAR_WIDTH) -> str:
    """A progress bar with its percentage: '[#####.....]  50%' (blank when unknown)."""
    if fraction is None:
        return " " * (width + 7)
    fraction = min(1.0, max(0.0, fraction))
    filled = int(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as wide as their widest cell, two spaces apart; no trailing blanks."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def event_line(event: dict[str, Any]) -> str:
    """An event as a line: its time, its name, then its data's members as key=value."""
    stamp = event.get("timestamp", {})
    seconds = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    data = event.get("data", {})
    fields = " ".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                      for key, value in data.items())
    return f"{when}.{stamp.get('microseconds', 0):06d} {event['event']} {fields}".rstrip()
