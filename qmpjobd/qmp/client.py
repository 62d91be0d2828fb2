"""The client's side of QMP, sans-IO: the bytes a client sends, and the messages it reads.

`ClientProtocol` turns what a daemon sends into messages (the greeting, replies, events), in
pieces of any size, and commands into bytes with ids of their own. It owns no socket and no
event loop: `qmpjob` drives it over a blocking socket for its one-shot subcommands, and over
trio for its live views. Only the standard library's json is used, so that a one-shot client
starts fast (the daemon's own splitter is built for hostile input and costs tens of
milliseconds to import).
"""

from __future__ import annotations

import codecs
import json

# typing itself would cost a one-shot client 3 ms to load (mypy reads this as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


# The most bytes one message may take while it is incomplete: a daemon that sends more without
# ending it is not speaking QMP.
MAX_MESSAGE = 64 << 20


class ProtocolError(Exception):
    """What the daemon sent is not QMP."""


class CommandFailed(Exception):
    """The daemon answered a command with an error: its class and description."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class ClientProtocol:
    """One connection's protocol state, from the client's side."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")()
        self._decoder = json.JSONDecoder()
        self._buffer = ""
        self._next_id = 0
        self.greeting: dict[str, Any] | None = None

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> tuple[str, bytes]:
        """The id a command's reply will carry, and the bytes to send."""
        self._next_id += 1
        request_id = f"qmpjob-{self._next_id}"
        message: dict[str, Any] = {"execute": name, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        return request_id, json.dumps(message).encode() + b"\n"

    def receive(self, data: bytes) -> list[dict[str, Any]]:
        """The whole messages DATA completes, in order (the greeting among them, once)."""
        return [message for message, _ in self.receive_text(data)]

    def receive_text(self, data: bytes) -> list[tuple[dict[str, Any], str]]:
        """receive()'s messages, each with its text as the daemon sent it."""
        try:
            self._buffer += self._text.decode(data)
        except UnicodeDecodeError as e:
            raise ProtocolError(f"the daemon sent bytes that are not UTF-8: {e}") from None
        messages: list[tuple[dict[str, Any], str]] = []
        position = 0
        end = len(self._buffer)
        while True:
            while position < end and self._buffer[position] in " \t\r\n":
                position += 1
            if position == end:
                break
            start = position
            try:
                message, position = self._decoder.raw_decode(self._buffer, position)
            except RecursionError:
                raise ProtocolError("the daemon sent a message nested too deep") from None
            except json.JSONDecodeError:
                # Incomplete (QMP's messages are objects: a cut one never parses), unless it
                # has grown past what any reply takes.
                if end - position > MAX_MESSAGE:
                    raise ProtocolError("the daemon sent a message too long to be QMP") from None
                break
            if not isinstance(message, dict):
                raise ProtocolError(f"the daemon sent {message!r}, not a QMP message")
            if self.greeting is None:
                if "QMP" not in message:
                    raise ProtocolError("the daemon did not greet with a QMP greeting")
                self.greeting = message
            messages.append((message, self._buffer[start:position]))
        self._buffer = self._buffer[position:]
        return messages


def reply_value(reply: dict[str, Any]) -> Any:
    """A reply's return value; its error raised as CommandFailed."""
    if "error" in reply:
        error = reply["error"]
        if not isinstance(error, dict):
            raise ProtocolError(f"an error reply that is not an object: {reply!r}")
        raise CommandFailed(str(error.get("class", "GenericError")), str(error.get("desc", "")))
    if "return" not in reply:
        raise ProtocolError(f"a reply without 'return' or 'error': {reply!r}")
    return reply["return"]
