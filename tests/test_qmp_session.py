"""The session, sans-IO: parsed input in, requests and reply bytes out."""

from __future__ import annotations

import json

import pytest

from qmpjobd.qmp.errors import QmpError
from qmpjobd.qmp.framing import FramingError
from qmpjobd.qmp.session import NO_ID, Request, Session

NOT_OBJECT = "QMP input must be a JSON object"


def session(**kwargs: object) -> Session:
    return Session(version=(7, 2, 0), package="qmpjobd test", **kwargs)  # type: ignore[arg-type]


def lines(data: bytes) -> list[object]:
    assert data.endswith(b"\r\n")
    return [json.loads(line) for line in data.split(b"\r\n") if line]


def error_of(data: bytes | Request) -> object:
    assert isinstance(data, bytes)
    (message,) = lines(data)
    return message


def test_greeting() -> None:
    assert lines(session().greeting()) == [
        {
            "QMP": {
                "version": {
                    "qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "qmpjobd test"
                },
                "capabilities": ["oob"],
            }
        }
    ]
    (greeting,) = lines(session(offer_oob=False).greeting())
    assert greeting == {"QMP": {"version": greeting["QMP"]["version"], "capabilities": []}}  # type: ignore[index]


def test_requests() -> None:
    s = session()
    assert s.accept({"execute": "query-jobs"}) == Request("query-jobs", {}, NO_ID, False)
    request = s.accept({"execute": "job-pause", "arguments": {"id": "j"}, "id": [1, {"a": None}]})
    assert request == Request("job-pause", {"id": "j"}, [1, {"a": None}], False)
    assert s.accept({"id": None, "execute": "x"}) == Request("x", {}, None, False)


@pytest.mark.parametrize(
    ("item", "reply"),
    [
        (FramingError("JSON parse error, expecting value"),
         {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}),
        ([1], {"error": {"class": "GenericError", "desc": NOT_OBJECT}}),
        ("execute", {"error": {"class": "GenericError", "desc": NOT_OBJECT}}),
        ({"id": 3}, {"id": 3, "error": {"class": "GenericError",
                                         "desc": "QMP input lacks member 'execute'"}}),
        ({"execute": 1, "id": 7}, {"id": 7, "error": {
            "class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}),
        ({"execute": "q", "arguments": []}, {"error": {
            "class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}),
        ({"execute": "q", "arguments": None}, {"error": {
            "class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}),
        ({"execute": "q", "control": 1}, {"error": {
            "class": "GenericError", "desc": "QMP input member 'control' is unexpected"}}),
        ({"exec-oob": "q"}, {"error": {
            "class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}),
        # Two problems: QEMU reports the first in its dictionary's walk order (observed on QSD).
        ({"execute": "query-jobs", "foo": 1, "arguments": []}, {"error": {
            "class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}),
    ],
)
def test_envelope_errors(item: object, reply: object) -> None:
    assert error_of(session().accept(item)) == reply


def test_oob_envelopes() -> None:
    s = session()
    s.negotiate(["oob"])
    assert s.oob_enabled
    assert s.accept({"exec-oob": "x", "id": 1}) == Request("x", {}, 1, True)
    assert error_of(s.accept({"execute": "query-jobs", "exec-oob": "x"})) == {"error": {
        "class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}
    assert Session.is_oob({"exec-oob": "x"})
    assert not Session.is_oob({"exec-oob": "x", "execute": "y"})


def test_negotiation() -> None:
    s = session(offer_oob=False)
    with pytest.raises(QmpError, match="Capability 'oob' not available"):
        s.negotiate(["oob"])
    assert not s.negotiated
    # Until negotiated, a missing command reads as a request to negotiate first.
    missing = QmpError("CommandNotFound", "The command query-jobs has not been found")
    assert error_of(s.error_reply(NO_ID, missing)) == {"error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    s.negotiate([])
    assert s.negotiated and not s.oob_enabled
    assert error_of(s.error_reply(5, missing)) == {"id": 5, "error": missing.to_wire()}
    with pytest.raises(QmpError) as again:
        s.negotiate([])
    assert again.value.to_wire() == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"}


def test_replies_echo_the_id_exactly() -> None:
    s = session()
    big = 2**80 + 1
    request = s.accept({"execute": "q", "id": big})
    assert isinstance(request, Request)
    data = s.reply(request, {"x": "é"})
    assert data.isascii() and data.endswith(b"\r\n") and data.count(b"\n") == 1
    assert str(big).encode() in data
    assert lines(data) == [{"return": {"x": "é"}, "id": big}]
