"""Real QMP clients against qmpjobd (and the same against qemu-storage-daemon, to prove the client
works there too): qemu.qmp's asyncio QMPClient, and the qmp-shell program."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.protocol import Runstate

from qmpjobd.cli import SCHEMA_DEFINES
from qmpjobd.qapi import load_schema
from qmpjobd.qapi.tables import build_tables
from tests.conftest import SCHEMA
from tests.daemons import DaemonProcess, daemon_env, start_qmpjobd

TABLES = build_tables(load_schema(str(SCHEMA)), SCHEMA_DEFINES)
OURS_VERSION = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "qmpjobd 0.1.0"}


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """qmpjobd with its product schema, for the module's tests."""
    with start_qmpjobd(tmp_path_factory.mktemp("qmpjobd")) as daemon:
        yield daemon


def is_version(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"qemu", "package"}
        and set(value["qemu"]) == {"major", "minor", "micro"}
        and all(type(n) is int for n in value["qemu"].values())
        and isinstance(value["package"], str)
    )


# -- qemu.qmp's QMPClient ----------------------------------------------------------------------


def runstate(client: QMPClient) -> Runstate:
    return client.runstate  # (a call, so that type checkers do not narrow it for good)


async def _client_session(path: Path) -> dict[str, Any]:
    """Connect, run the control and job commands, disconnect; what the daemon answered."""
    client = QMPClient("test")
    await client.connect(str(path))
    results: dict[str, Any] = {}
    try:
        assert runstate(client) is Runstate.RUNNING
        assert client.greeting is not None
        results["greeting"] = client.greeting._asdict()
        results["query-version"] = await client.execute("query-version")
        results["query-commands"] = await client.execute("query-commands")
        results["query-qmp-schema"] = await client.execute("query-qmp-schema")
        results["query-jobs"] = await client.execute("query-jobs")
        with pytest.raises(ExecuteError) as pause:
            await client.execute("job-pause", {"id": "no-such-job"})
        results["job-pause"] = (pause.value.error_class, str(pause.value))
        # The client enabled oob (the greeting offers it): an exec-oob of a command without
        # allow-oob is refused for that reason, not as an unexpected member.
        with pytest.raises(ExecuteError) as oob:
            await client.execute("query-jobs", oob=True)
        results["exec-oob"] = str(oob.value)
        # Several requests in flight at once, matched to their replies by id.
        results["concurrent"] = await asyncio.gather(
            *(client.execute("query-jobs") for _ in range(20)),
            *(client.execute("query-version") for _ in range(20)),
        )
    finally:
        await client.disconnect()
    assert runstate(client) is Runstate.IDLE
    return results


def client_session(path: Path) -> dict[str, Any]:
    return asyncio.run(asyncio.wait_for(_client_session(path), timeout=60))


def test_qmpclient_against_qmpjobd(ours: DaemonProcess) -> None:
    got = client_session(ours.socket_path)
    assert got["greeting"] == {"QMP": {"version": OURS_VERSION, "capabilities": ["oob"]}}
    assert got["query-version"] == OURS_VERSION
    assert sorted(c["name"] for c in got["query-commands"]) == sorted(TABLES.commands)
    assert got["query-qmp-schema"] == TABLES.schema_info
    assert got["query-jobs"] == []
    assert got["job-pause"] == ("GenericError", "Job not found")
    assert got["exec-oob"] == "The command query-jobs does not support OOB"
    assert got["concurrent"] == [[]] * 20 + [OURS_VERSION] * 20
    # The disconnect was clean: the daemon serves the next client.
    assert client_session(ours.socket_path)["query-jobs"] == []


def test_qmpclient_against_qsd(qsd: DaemonProcess) -> None:
    got = client_session(qsd.socket_path)
    assert is_version(got["query-version"])
    assert got["greeting"] == {"QMP": {"version": got["query-version"], "capabilities": ["oob"]}}
    assert got["query-version"]["qemu"]["major"] == 7
    assert got["query-version"]["qemu"]["minor"] == 2
    assert got["query-jobs"] == []
    assert got["job-pause"] == ("GenericError", "Job not found")
    assert got["exec-oob"] == "The command query-jobs does not support OOB"
    assert got["concurrent"] == [[]] * 20 + [got["query-version"]] * 20
    # QSD serves one client at a time: this would wait forever had the first not disconnected.
    assert client_session(qsd.socket_path)["query-jobs"] == []


# -- qmp-shell ---------------------------------------------------------------------------------

SHELL_INPUT = "\n".join(
    [
        "query-jobs",
        "query-version",
        "job-pause id=x",
        "job-pause",
        "job-pause id=123",
        "job-pause id=x extra=1",
        "job-cancel id=x force=true",
        "job-dismiss id=x",
        'job-finalize id={"a":1}',
        "qmp_capabilities",
        "no-such-command",
        "query-jobs bad",  # refused by the shell itself, on stderr
        "",  # prints pending events: there are none
        "query-jobs",
    ]
) + "\n"

SHELL_REPLIES: list[Any] = [
    {"return": []},
    {"return": OURS_VERSION},
    {"error": {"class": "GenericError", "desc": "Job not found"}},
    {"error": {"class": "GenericError", "desc": "Parameter 'id' is missing"}},
    {"error": {"class": "GenericError",
               "desc": "Invalid parameter type for 'id', expected: string"}},
    {"error": {"class": "GenericError", "desc": "Parameter 'extra' is unexpected"}},
    {"error": {"class": "GenericError", "desc": "Parameter 'force' is unexpected"}},
    {"error": {"class": "GenericError", "desc": "Job not found"}},
    {"error": {"class": "GenericError",
               "desc": "Invalid parameter type for 'id', expected: string"}},
    {"error": {"class": "CommandNotFound",
               "desc": "Capabilities negotiation is already complete, command ignored"}},
    {"error": {"class": "CommandNotFound",
               "desc": "The command no-such-command has not been found"}},
    {"return": []},
]

PROMPT = "(QEMU) "


def run_shell(daemon: DaemonProcess, home: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """qmp-shell on DAEMON's socket with SHELL_INPUT on stdin; HOME keeps its history file."""
    result = subprocess.run(
        [sys.executable, "-m", "qemu.qmp.qmp_shell", *options, str(daemon.socket_path)],
        input=SHELL_INPUT, capture_output=True, text=True, timeout=60,
        env={**daemon_env(), "HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "Error while parsing command line: Expected a key=value pair, got 'bad'\n"
        "command format: <command-name> [arg-name1=arg1] ... [arg-nameN=argN\n"
    )
    return result


def shell_replies(stdout: str) -> tuple[str, list[Any]]:
    """The banner and the replies (parsed) of a plain (not pretty) qmp-shell run."""
    banner, *after_prompts = stdout.split(PROMPT)
    # One prompt per input line, then the newline printed at EOF.
    assert len(after_prompts) == SHELL_INPUT.count("\n") + 1
    assert after_prompts[-1] == "\n"
    replies = [json.loads(text) for text in after_prompts[:-1] if text]
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in after_prompts if text)
    return banner, replies


def without_versions(text: str) -> str:
    text = re.sub(r"Connected to QEMU \d+\.\d+\.\d+", "Connected to QEMU <version>", text)
    return re.sub(r'("(?:major|minor|micro|package)": )[^,\n]+', r"\1<version>", text)


def test_qmp_shell_against_qmpjobd(ours: DaemonProcess, tmp_path: Path) -> None:
    banner, replies = shell_replies(run_shell(ours, tmp_path).stdout)
    assert banner == "Welcome to the QMP low-level shell!\nConnected to QEMU 7.2.0\n\n"
    assert replies == SHELL_REPLIES


def test_qmp_shell_same_as_qsd(qsd: DaemonProcess, ours: DaemonProcess, tmp_path: Path) -> None:
    theirs = run_shell(qsd, tmp_path).stdout
    mine = run_shell(ours, tmp_path).stdout
    # The shell prints what it got, in the daemon's key order: the same text but for versions.
    assert without_versions(mine) == without_versions(theirs)
    (their_banner, their_replies), (my_banner, my_replies) = map(shell_replies, (theirs, mine))
    assert without_versions(my_banner) == without_versions(their_banner)
    assert is_version(their_replies[1]["return"])
    their_replies[1]["return"] = OURS_VERSION
    assert my_replies == their_replies


def test_qmp_shell_pretty_same_as_qsd(
    qsd: DaemonProcess, ours: DaemonProcess, tmp_path: Path
) -> None:
    theirs = run_shell(qsd, tmp_path, "--pretty").stdout
    mine = run_shell(ours, tmp_path, "--pretty").stdout
    assert '(QEMU) {\n    "error": {\n        "class": "GenericError",\n' in mine
    assert '        "desc": "Job not found"\n    }\n}\n' in mine
    assert without_versions(mine) == without_versions(theirs)
    assert mine.count('"<version>"') == 0 and without_versions(mine).count("<version>") == 5
