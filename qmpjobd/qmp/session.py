"""One connection's QMP state, sans-IO: greeting, capabilities negotiation, envelopes.

The server feeds it what the framing layer parsed; it answers either with a `Request` to run or
with the bytes of an error response. After a request ran, `reply`/`error_reply` turn the result
into bytes. It never touches a socket and knows nothing of the commands themselves.

What it reproduces of QEMU's monitor:
- Until `qmp_capabilities` succeeds only that command exists; any CommandNotFound error in that
  mode reads "Expecting capabilities negotiation with 'qmp_capabilities'".
- Envelope members: `execute` (or `exec-oob` once oob is enabled) must be a string, `arguments`
  an object, `id` anything; anything else is unexpected. When several members are wrong QEMU
  reports the first in its dictionary's walk order, so the checks go in that order.
- `id` is echoed untouched whenever the input was an object, even if the envelope was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..qobject import qdict_order
from .encode import encode, encode_pretty
from .errors import QmpError, generic
from .framing import FramingError
from .greeting import greeting


class _NoId:
    """The absence of an `id` member (None would be JSON null, a valid id)."""

    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Final = _NoId()

NOT_AN_OBJECT = "QMP input must be a JSON object"
NEGOTIATION_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"
CAPABILITIES = ("oob",)


@dataclass(slots=True)
class Request:
    command: str
    arguments: dict[str, object]
    id: object  # NO_ID when the input had none
    oob: bool  # sent with exec-oob


class Session:
    """The protocol state of one client connection."""

    def __init__(
        self, *, version: tuple[int, int, int], package: str, offer_oob: bool = True,
        pretty: bool = False,
    ) -> None:
        self.version = version
        self.package = package
        self.offered = ("oob",) if offer_oob else ()
        self.negotiated = False
        self.oob_enabled = False
        self._encode = encode_pretty if pretty else encode

    # -- output ----------------------------------------------------------------------------

    def greeting(self) -> bytes:
        return self._encode(greeting(self.version, self.package, list(self.offered)))

    def reply(self, request: Request, value: object) -> bytes:
        message: dict[str, object] = {"return": value}
        if request.id is not NO_ID:
            message["id"] = request.id
        return self._encode(message)

    def error_reply(self, request_id: object, error: QmpError) -> bytes:
        if not self.negotiated and error.cls == "CommandNotFound":
            error = QmpError("CommandNotFound", NEGOTIATION_FIRST)
        message: dict[str, object] = {}
        if request_id is not NO_ID:
            message["id"] = request_id
        message["error"] = error.to_wire()
        return self._encode(message)

    def encode(self, message: object) -> bytes:
        """Any other message (events) in this connection's format."""
        return self._encode(message)

    # -- input -----------------------------------------------------------------------------

    def accept(self, item: object) -> Request | bytes:
        """A parsed input value (or framing error): the request it makes, or the error reply."""
        if isinstance(item, FramingError):
            return self.error_reply(NO_ID, generic(item.desc))
        if type(item) is not dict:
            return self.error_reply(NO_ID, generic(NOT_AN_OBJECT))
        request_id = item.get("id", NO_ID)
        command = item.get("execute")
        arguments = item.get("arguments", _EMPTY)
        # The usual shape, checked at a glance; anything else takes QEMU's walk below.
        if (
            type(command) is str
            and type(arguments) is dict
            and len(item) == 1 + ("arguments" in item) + ("id" in item)
        ):
            return Request(command, arguments if arguments is not _EMPTY else {}, request_id, False)
        try:
            return self._check_envelope(item, request_id)
        except QmpError as error:
            return self.error_reply(request_id, error)

    def _check_envelope(self, item: dict[str, object], request_id: object) -> Request:
        exec_key: str | None = None
        for key in qdict_order(list(item)):
            value = item[key]
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if type(value) is not str:
                    raise generic(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise generic(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if type(value) is not dict:
                    raise generic("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise generic(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise generic("QMP input lacks member 'execute'")
        command = item[exec_key]
        arguments = item.get("arguments", {})
        assert isinstance(command, str) and isinstance(arguments, dict)
        return Request(command, arguments, request_id, exec_key == "exec-oob")

    @staticmethod
    def is_oob(item: object) -> bool:
        """Whether QEMU runs this input at once, ahead of queued requests: an object with
        `exec-oob` and no `execute` (even before oob is enabled, to refuse it at once)."""
        return type(item) is dict and "exec-oob" in item and "execute" not in item

    # -- negotiation -----------------------------------------------------------------------

    def negotiate(self, enable: list[str]) -> None:
        """qmp_capabilities: leave negotiation mode with the capabilities in ENABLE."""
        if self.negotiated:
            raise QmpError(
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
            )
        for capability in enable:
            if capability not in self.offered:
                raise generic(f"Capability '{capability}' not available")
        self.oob_enabled = "oob" in enable
        self.negotiated = True


_EMPTY: Final[dict[str, object]] = {}
