"""Under a service manager: sockets passed by a real socket-activation launcher
(systemd-socket-activate) served as monitors, by name with their own roles; readiness and
stopping told on NOTIFY_SOCKET; the unit files as systemd-analyze reads them; the JSON log an
operator reads (each job's start and end at info, every command at debug)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemons import QMPJOBD, QmpConnection, daemon_env, negotiated, ok, start_qmpjobd

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = shutil.which("systemd-socket-activate")
needs_launcher = pytest.mark.skipif(LAUNCHER is None, reason="needs systemd-socket-activate")
WAIT = 30.0


@contextmanager
def activated(paths: list[Path], names: str | None, *options: str, **env: str
              ) -> Iterator[subprocess.Popen[str]]:
    """The launcher listening on PATHS (named NAMES), to start qmpjobd with OPTIONS at the
    first client, ENV set for it (the launcher passes on only what it is told to, as systemd
    does); yielded once it listens (it says so on stderr)."""
    assert LAUNCHER is not None
    argv = [LAUNCHER, *(f"--listen={path}" for path in paths),
            *([f"--fdname={names}"] if names else []),
            *(f"--setenv={key}={value}" for key, value in env.items()), *QMPJOBD, *options]
    launcher = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=daemon_env())
    try:
        assert launcher.stderr is not None
        listening = 0
        while listening < len(paths):
            line = launcher.stderr.readline()
            assert line, "the launcher ended before it listened"
            listening += line.startswith("Listening on")
        yield launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.communicate(timeout=WAIT)


@needs_launcher
def test_every_passed_socket_is_a_monitor(tmp_path: Path) -> None:
    paths = [tmp_path / "a.sock", tmp_path / "b.sock"]
    with activated(paths, None, "--log", str(tmp_path / "log")) as daemon:
        first = negotiated(paths[1])  # the first client starts the daemon
        second = negotiated(paths[0])
        for conn in (first, second):
            assert ok(conn, "query-version")["package"].startswith("qmpjobd")
            assert "quit" in {c["name"] for c in ok(conn, "query-commands")}  # admin
        ok(first, "quit")
        assert daemon.wait(WAIT) == 0
        second.close()
        first.close()
    # The socket files are the service manager's: left where they are.
    assert all(path.is_socket() for path in paths)


@needs_launcher
def test_ready_is_told_before_the_first_client_is_served(tmp_path: Path) -> None:
    """Started by the launcher at its first client: READY=1 is on NOTIFY_SOCKET before that
    client's first reply (the greeting may come earlier: it never waits), STOPPING=1 at the
    end."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    path = tmp_path / "q.sock"
    try:
        with activated([path], None, "--log", str(tmp_path / "log"),
                       NOTIFY_SOCKET=str(tmp_path / "notify")) as daemon:
            conn = QmpConnection(path)
            assert conn.execute("qmp_capabilities") == {"return": {}}
            notify.setblocking(False)
            assert notify.recv(4096) == b"READY=1"  # already there: sent before that reply
            ok(conn, "quit")
            assert daemon.wait(WAIT) == 0
            conn.close()
        notify.settimeout(WAIT)
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        notify.close()


@needs_launcher
def test_passed_sockets_by_name_with_their_own_roles(tmp_path: Path) -> None:
    admin_path, viewer_path = tmp_path / "admin.sock", tmp_path / "ro.sock"
    with activated([admin_path, viewer_path], "admin:ro",
                   "--chardev", "socket,id=a,fd-name=admin", "--monitor", "chardev=a",
                   "--chardev", "socket,id=r,fd-name=ro", "--monitor",
                   "chardev=r,role=read-only") as daemon:
        viewer = negotiated(viewer_path)
        assert viewer.execute("quit")["error"]["desc"] == (
            "Command 'quit' needs the role 'admin'; this connection's role is 'read-only'")
        admin = negotiated(admin_path)
        ok(admin, "quit")
        assert daemon.wait(WAIT) == 0
        viewer.close()
        admin.close()


@needs_launcher
def test_a_name_not_passed_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    with activated([path], "qmp", "--chardev", "socket,id=a,fd-name=other",
                   "--monitor", "chardev=a") as daemon:
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        assert daemon.wait(WAIT) == 2
        assert daemon.stderr is not None
        error = daemon.stderr.read()
        client.close()
    assert error.splitlines()[-1] == (
        "qmpjobd: --chardev socket,id=a,fd-name=other: no socket named 'other' was passed "
        "(LISTEN_FDNAMES: qmp)")


def test_a_passed_descriptor_that_is_no_listening_socket(tmp_path: Path) -> None:
    # (The shell's pid is the daemon's: it execs it, as a launcher does.)
    shell = 'exec 3</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=qmp exec "$@"'
    done = subprocess.run(["sh", "-c", shell, "sh", *QMPJOBD], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=WAIT, env=daemon_env())
    assert done.returncode == 1
    assert done.stderr == ("qmpjobd: passed socket 'qmp' (fd 3) is not a listening Unix "
                           "stream socket\n")


@pytest.mark.parametrize("abstract", [False, True])
def test_readiness_and_stopping_are_told(tmp_path: Path, abstract: bool) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"qmpjobd-test-{os.getpid()}-{id(listener)}"
        listener.bind("\0" + name)
        address = "@" + name
    else:
        listener.bind(str(tmp_path / "notify"))
        address = str(tmp_path / "notify")
    listener.settimeout(WAIT)
    socket_path = tmp_path / "q.sock"
    daemon = subprocess.Popen([*QMPJOBD, "--socket", str(socket_path), "--log",
                               str(tmp_path / "log")], env=daemon_env(NOTIFY_SOCKET=address))
    try:
        assert listener.recv(4096) == b"READY=1"
        conn = negotiated(socket_path)  # ready: it serves
        ok(conn, "quit")
        assert listener.recv(4096) == b"STOPPING=1"
        assert daemon.wait(WAIT) == 0
        conn.close()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        listener.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_files_are_valid(tmp_path: Path) -> None:
    for unit in ("qmpjobd.socket", "qmpjobd.service"):
        text = (REPO / "contrib" / "systemd" / unit).read_text()
        # The program where this checkout's is (the units name /usr/local/bin's).
        text = text.replace("/usr/local/bin/qmpjobd", str(Path(QMPJOBD[0]).parent / "qmpjobd"))
        (tmp_path / unit).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "qmpjobd.socket",
                           "qmpjobd.service"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=WAIT)
    assert (done.returncode, done.stderr) == (0, ""), done


def test_the_json_log_tells_what_happened(tmp_path: Path) -> None:
    with start_qmpjobd(tmp_path, "--log-format", "json", "--log-level", "debug") as daemon, \
            daemon.connect() as conn:
        for node in ("src", "dst"):
            ok(conn, "blockdev-add", {"driver": "null-co", "node-name": node, "size": 64 << 20,
                                      "read-zeroes": True})
        ok(conn, "blockdev-backup", {"job-id": "good", "device": "src", "target": "dst",
                                     "sync": "full", "auto-dismiss": False})
        ok(conn, "blockdev-backup", {"job-id": "stopped", "device": "src", "target": "dst",
                                     "sync": "full", "speed": 1, "auto-dismiss": False})
        ok(conn, "job-cancel", {"id": "stopped"})
        while not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {
                "status": "concluded", "id": "stopped"} for e in conn.events):
            conn.events.append(conn.receive(WAIT))
        assert "error" in conn.execute("job-pause", {"id": "nothing"})
    entries = [json.loads(line) for line in (tmp_path / "qmpjobd.log").read_text().splitlines()]
    assert all(set(entry) <= {"time", "level", "event", "client", "job"} for entry in entries)
    assert all(entry["time"].endswith("Z") for entry in entries)
    info = [(entry.get("job"), entry["event"]) for entry in entries if entry["level"] == "info"]
    assert ("good", "job good (backup) started") in info
    assert ("good", "job good (backup) ended: success") in info
    assert ("stopped", "job stopped (backup) ended: Operation canceled") in info
    client = next(entry["client"] for entry in entries if "client" in entry)
    commands = [entry["event"].removeprefix(client + ": ") for entry in entries
                if entry["level"] == "debug" and entry.get("client") == client]
    assert commands[0].startswith("connected (uid ")
    assert "blockdev-backup: ok" in commands and "job-cancel: ok" in commands
    assert "job-pause: GenericError: Job not found" in commands
    assert commands[-1] == "disconnected"


def test_passed_sockets_on_the_command_line() -> None:
    """What parse_command_line makes of passed sockets (name, where it listens)."""
    from qmpjobd.cli import UsageError, parse_command_line

    passed = [("qmp", "/run/a.sock"), ("ro", "/run/b.sock")]
    every = parse_command_line([], passed)
    assert [(m.path, m.passed, m.access.role) for m in every.monitors] == [
        ("/run/a.sock", 0, 2), ("/run/b.sock", 1, 2)]
    assert not every.default_socket
    named = parse_command_line(["--chardev", "socket,id=r,fd-name=ro", "--monitor",
                                "chardev=r,role=read-only"], passed)
    assert [(m.path, m.passed, m.access.role) for m in named.monitors] == [("/run/b.sock", 1, 0)]
    # A chardev without a monitor: the passed sockets are not all served as admin's.
    filtered = parse_command_line(["--chardev", "socket,id=r,fd-name=ro,allow-uid=1000"],
                                  passed)
    assert all(m.passed is None for m in filtered.monitors)
    for options, message in (
            (["--chardev", "socket,id=a,fd-name=qmp", "--chardev", "socket,id=b,fd-name=qmp"],
             "--chardev socket,id=b,fd-name=qmp: the passed socket is another chardev's"),
            (["--chardev", "socket,id=a,fd-name=qmp,path=/x"],
             "--chardev socket,id=a,fd-name=qmp,path=/x: 'path' and 'fd-name' exclude each "
             "other"),
            (["--chardev", "socket,id=a,fd-name=qmp,mode=0666"],
             "--chardev socket,id=a,fd-name=qmp,mode=0666: 'mode' is the service manager's for "
             "a passed socket (SocketMode=)")):
        with pytest.raises(UsageError) as raised:
            parse_command_line(options, passed)
        assert str(raised.value) == message
