"""Start a daemon (qemu-storage-daemon, the reference, or qmpjobd) and talk QMP to it.

Both take the same command line, so one harness starts either: a monitor on a Unix socket,
--pidfile and --daemonize. --daemonize returns once the socket listens, which makes it the
synchronisation point: no polling for the socket to appear.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qmpjobd.cli import SCHEMA_DEFINES

# The build conditions of Debian bookworm's QSD 7.2 are the ones qmpjobd evaluates its schema
# under (SCHEMA_DEFINES: every name the storage daemon's schema tests except CONFIG_BLKIO, as
# bookworm does not package libblkio). The tests hold them to the live QSD: with exactly this
# set our introspection of QSD's schema equals QSD's own reply (test_qapi_real_schemas.py), and
# each conditional member and enum value is present in QSD's reply iff its condition holds
# (test_qapi_visit.py::test_defines_match_qsd).
QSD_DEFINES = SCHEMA_DEFINES


class QmpConnection:
    """A blocking QMP client: negotiates, then sends one command at a time."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.stream = self.sock.makefile("rwb")
        self.greeting = self.receive()
        self.events: list[dict[str, Any]] = []

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message; with TIMEOUT, TimeoutError if none arrives within TIMEOUT seconds
        (the connection is then unusable: only for giving up)."""
        if timeout is not None:
            self.sock.settimeout(max(timeout, 0.001))
        try:
            line = self.stream.readline()
        finally:
            if timeout is not None:
                self.sock.settimeout(self.timeout)
        if not line:
            raise ConnectionError("the daemon closed the connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def send(self, message: object) -> None:
        self.stream.write(json.dumps(message).encode() + b"\n")
        self.stream.flush()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a command and return its reply (the whole message); events are kept aside."""
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.send(message)
        while True:
            reply = self.receive()
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


QMPJOBD = [sys.executable, "-m", "qmpjobd"]
QSD = ["qemu-storage-daemon"]


def ok(conn: QmpConnection, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """COMMAND's return value; the test fails (showing the reply) if it is an error."""
    reply = conn.execute(command, arguments)
    assert "return" in reply, reply
    return reply["return"]


def negotiated(path: Path) -> QmpConnection:
    """A connection to the monitor at PATH, past qmp_capabilities (close it yourself)."""
    conn = QmpConnection(path)
    ok(conn, "qmp_capabilities")
    return conn


class DaemonProcess:
    """A running daemon with a QMP monitor on a Unix socket."""

    def __init__(self, pid: int, socket_path: Path) -> None:
        self.pid = pid
        self.socket_path = socket_path

    @classmethod
    @contextmanager
    def start(
        cls, workdir: Path, *extra: str, program: list[str] = QSD,
        env: dict[str, str] | None = None,
    ) -> Iterator[DaemonProcess]:
        name = Path(program[-1]).name
        socket_path = workdir / f"{name}.sock"
        pidfile = workdir / f"{name}.pid"
        argv = [
            *program,
            "--chardev", f"socket,id=m0,path={socket_path},server=on,wait=off",
            "--monitor", "chardev=m0",
            "--pidfile", str(pidfile),
            "--daemonize",
            *extra,
        ]
        subprocess.run(argv, check=True, timeout=30, env=env)
        daemon = cls(int(pidfile.read_text()), socket_path)
        try:
            yield daemon
        finally:
            daemon.stop()

    def stop(self) -> None:
        """SIGTERM, then wait until it has exited."""
        self.wait(signal.SIGTERM)

    def wait(self, send: signal.Signals | None = None) -> None:
        """Wait (on a pidfd: it is not our child) until the daemon has exited."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            if send is not None:
                os.kill(self.pid, send)
            ready, _, _ = select.select([pidfd], [], [], 30)
            assert ready, f"daemon {self.pid} did not exit"
        finally:
            os.close(pidfd)

    @contextmanager
    def connect(self) -> Iterator[QmpConnection]:
        conn = QmpConnection(self.socket_path)
        try:
            reply = conn.execute("qmp_capabilities")
            assert reply == {"return": {}}, reply
            yield conn
        finally:
            conn.close()


QsdProcess = DaemonProcess  # the reference, started with the default program

_REPO = Path(__file__).resolve().parent.parent


def daemon_env(**extra: str) -> dict[str, str]:
    """The environment qmpjobd runs in under test: this checkout, every reply checked."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(_REPO)
    env["QMPJOBD_CHECK_REPLIES"] = "1"  # every reply is checked against its schema type
    env.update(extra)
    return env


def start_qmpjobd(workdir: Path, *extra: str) -> contextlib.AbstractContextManager[DaemonProcess]:
    """qmpjobd with its product schema, logging to WORKDIR/qmpjobd.log."""
    return DaemonProcess.start(
        workdir, "--log", str(workdir / "qmpjobd.log"), *extra, program=QMPJOBD,
        env=daemon_env(),
    )
