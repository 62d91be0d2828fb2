"""What the log says, and in which form: one line of text, or one JSON object a line
(`--log-format json`: time, level, event, and the client and job it concerns when there is one),
so that an operator learns what happened without a client attached."""

from __future__ import annotations

import json
import logging
import time


class JsonFormatter(logging.Formatter):
    """{"time": "2026-12-07T03:12:42.834512Z", "level": "info", "event": "...", "client": ...,
    "job": ...}: the last two when the record carries them (`extra={"client": ..., "job": ...}`),
    a traceback as "exception"."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        micro = int((record.created - seconds) * 1e6)
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micro:06d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        for key in ("client", "job"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def text_formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s qmpjobd %(levelname)s %(message)s")
