"""One connection's QMP state, sans-IO: greeting, negotiation, envelopes, the in-band queue.

The server feeds it what the framing layer parsed; `receive` answers either with a `Request` to
run or with the bytes of an error response. After a request ran, `reply`/`error_reply` turn the
result into bytes. It never touches a socket; of the commands it knows only their names and
whether each may run out of band (given at construction), not what they do.

What it reproduces of QEMU's monitor:
- Envelope members (`accept`): `execute` (or `exec-oob` once oob is enabled) must be a string,
  `arguments` an object, `id` anything; anything else is unexpected. When several members are
  wrong QEMU reports the first in its dictionary's walk order, so the checks go in that order.
- `id` is echoed untouched whenever the input was an object, even if the envelope was wrong.
- The command (`admit`): an unknown one is CommandNotFound; until `qmp_capabilities` succeeds
  only that command exists, and any CommandNotFound error in that mode reads "Expecting
  capabilities negotiation with 'qmp_capabilities'"; `exec-oob` of a command that does not
  allow it is refused.
- Once oob is enabled, in-band requests wait in a queue, served one at a time in order, while
  `exec-oob` requests run at once; at most INBAND_QUEUE in-band requests wait (the one being
  served included), and the connection is not read while the queue is full.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Final, NamedTuple

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
# QEMU's limit on in-band requests waiting once oob is enabled (the one being served included).
INBAND_QUEUE = 8


class Request(NamedTuple):
    command: str
    arguments: dict[str, object]
    id: object  # NO_ID when the input had none
    oob: bool  # sent with exec-oob


class Session:
    """The protocol state of one client connection."""

    def __init__(
        self, *, version: tuple[int, int, int], package: str, offer_oob: bool = True,
        pretty: bool = False, commands: Mapping[str, bool] | None = None,
    ) -> None:
        """COMMANDS: each command's name, and whether it may run out of band."""
        self.version = version
        self.package = package
        self.offered = CAPABILITIES if offer_oob else ()
        self.negotiated = False
        self.oob_enabled = False
        self._encode = encode_pretty if pretty else encode
        self._commands: Mapping[str, bool] = commands or {}
        # In-band requests waiting (each with the input bytes it holds), and whether one is
        # being served.
        self._inband: deque[tuple[object, int]] = deque()
        self._serving = False

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

    def admit(self, request: Request) -> QmpError | None:
        """The protocol's checks of the command itself, before its arguments are looked at:
        the error to answer REQUEST with, or None."""
        name = request.command
        allow_oob = self._commands.get(name)
        if allow_oob is None or (not self.negotiated and name != "qmp_capabilities"):
            return QmpError("CommandNotFound", f"The command {name} has not been found")
        if request.oob and not allow_oob:
            return generic(f"The command {name} does not support OOB")
        return None

    def receive(self, item: object) -> Request | bytes:
        """A parsed input value: the request to run, or the bytes of the error reply."""
        request = self.accept(item)
        if type(request) is bytes:
            return request
        assert type(request) is Request
        # The usual case at a glance (a known command, negotiated, in band or allowed out of
        # band); anything else takes admit's checks in QEMU's order.
        allow_oob = self._commands.get(request.command)
        if allow_oob is not None and self.negotiated and (allow_oob or not request.oob):
            return request
        error = self.admit(request)
        return request if error is None else self.error_reply(request.id, error)

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


    # -- the in-band queue (once oob is enabled) ---------------------------------------------

    def queues(self, item: object) -> bool:
        """Whether ITEM waits its turn in the in-band queue rather than running at once."""
        return self.oob_enabled and not self.is_oob(item)

    @property
    def inband_full(self) -> bool:
        """No more in-band requests may wait: stop reading until one has been served."""
        return len(self._inband) + self._serving >= INBAND_QUEUE

    def enqueue(self, item: object, held: int) -> None:
        """ITEM waits in the in-band queue, holding HELD bytes of input until it is served."""
        self._inband.append((item, held))

    def next_inband(self) -> tuple[object, int] | None:
        """The in-band request to serve now and the bytes it held (None if none waits);
        `served` says when it is done."""
        if self._serving or not self._inband:
            return None
        self._serving = True
        return self._inband.popleft()

    def served(self) -> None:
        self._serving = False


_EMPTY: Final[dict[str, object]] = {}
